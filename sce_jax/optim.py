"""Optimisers and schedules (docs/SCE.md sections 3, 5 and 10), built from optax pieces.

`optax.lars` scales by the learning rate *before* its momentum trace; the authors' LARS (and
PyTorch's SGD) accumulate the raw update and apply the learning rate after it:
    buf = momentum * buf + trust * (g + wd * p);   p -= lr_t * buf
With a changing learning rate the two differ, so we chain the optax transformations in the
authors' order (tests/test_optim.py checks it against a float64 NumPy LARS). AdamW is optax's,
which is torch's (decay decoupled and scaled by the learning rate), with eztorch's exclusions.
"""
import jax
import jax.numpy as jnp
import optax

from sce_jax.models import trunks


# optim.name values; sce.m_schedule values; eval.linear.schedule values.
OPTIMIZERS = ("sgd", "lars", "adamw")
# Parameters without weight decay besides norms and biases (ndim <= 1), each family's
# (trunks.NO_DECAY: the ViT's position embedding and class token, docs/SCE.md 10).
NO_DECAY = trunks.NO_DECAY
M_SCHEDULES = ("constant", "cosine")
WD_SCHEDULES = ("constant", "cosine")
# optim.clip_scope: clip_norm bounds the global norm of the gradients, or each tensor's (DINO).
CLIP_SCOPES = ("global", "tensor")
LINEAR_SCHEDULES = ("cosine", "step")


def scaled_lr(base_lr, batch_size):
  """The linear scaling rule (docs/SCE.md section 3): base_lr is per 256 images."""
  return base_lr * batch_size / 256


def lr_schedule(optim_cfg, *, global_batch, steps_per_epoch, total_steps):
  """Linear scaling (`scaled_lr`), then the authors' warmup and cosine (docs/SCE.md 3), per step.

  Their LinearWarmupCosineAnnealingLR, stepped after each of the W warmup steps, gives step t
  peak * t / (W - 1): 0 at the first step, the peak at the last warmup step, where
  optax.warmup_cosine_decay_schedule is still at peak * (W - 1) / W. Then step t >= W has
  peak * (1 + cos(pi * (t - W) / (T - W))) / 2, or with optim.min_lr DINO's
  min_lr + (peak - min_lr) * (1 + cos(...)) / 2 (utils.cosine_scheduler: the same steps).
  """
  peak = scaled_lr(optim_cfg.base_lr, global_batch)
  warmup = int(optim_cfg.warmup_epochs * steps_per_epoch)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup - 1),
       optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1),
                                   alpha=optim_cfg.min_lr / peak)], [warmup])


def wd_schedule(optim_cfg, total_steps):
  """The weight decay: optim.weight_decay, or (wd_schedule 'cosine') DINO's
  utils.cosine_scheduler from it to weight_decay_end over the run, per step:
  end + (wd - end) * (1 + cos(pi * t / T)) / 2."""
  wd, end = optim_cfg.weight_decay, optim_cfg.weight_decay_end
  if optim_cfg.wd_schedule == "constant":
    return wd
  return lambda step: end + (wd - end) * (1 + jnp.cos(jnp.pi * step / total_steps)) / 2


def linear_eval_schedule(lin_cfg, *, steps_per_epoch, total_steps):
  """The linear probe's lr (docs/SCE.md 7): base_lr, scaled by the batch if lin_cfg.scale_lr;
  then a cosine to 0 (ImageNet), or x decay_factor at each epoch of lin_cfg.milestones (small
  datasets)."""
  peak = (scaled_lr(lin_cfg.base_lr, lin_cfg.batch_size) if lin_cfg.scale_lr
          else lin_cfg.base_lr)
  if lin_cfg.schedule == "cosine":
    return optax.cosine_decay_schedule(peak, total_steps)
  return optax.piecewise_constant_schedule(
      peak, {int(m * steps_per_epoch): lin_cfg.decay_factor for m in lin_cfg.milestones})


def ema_schedule(sce_cfg, total_steps):
  """Target momentum m(step): cosine from m0 to m_final (1 in SCE and BYOL; 0.999 in solo-learn's
  MoCo v2+) over the run, or constant m0 (docs/SCE.md 3)."""
  m0, m1 = sce_cfg.m0, sce_cfg.m_final
  if sce_cfg.m_schedule == "constant":
    return lambda step: jnp.asarray(m0, jnp.float32)

  def momentum(step):
    frac = jnp.asarray(step, jnp.float32) / max(total_steps - 1, 1)
    return m1 - (m1 - m0) * (jnp.cos(jnp.pi * frac) + 1.0) / 2.0
  return momentum


def _decayed(params):
  """LARS and AdamW exclude norms and biases (ndim <= 1) and NO_DECAY from weight decay (and
  LARS from its trust ratio)."""
  return jax.tree.map_with_path(
      lambda path, p: p.ndim > 1 and getattr(path[-1], "key", None) not in NO_DECAY, params)


def lars(learning_rate, *, weight_decay, momentum=0.9, trust_coefficient=1e-3):
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=_decayed),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), _decayed),
      optax.trace(decay=momentum),
      optax.scale_by_learning_rate(learning_rate))


def adamw(learning_rate, *, weight_decay, betas=(0.9, 0.999), eps=1e-8):
  """torch.optim.AdamW (bias-corrected moments, eps outside the square root, decay
  lr x wd x p) with the eztorch ViT runs' exclusions (`_decayed`)."""
  return optax.adamw(learning_rate, b1=betas[0], b2=betas[1], eps=eps,
                     weight_decay=weight_decay, mask=_decayed)


def sgd(learning_rate, *, weight_decay, momentum=0.9, nesterov=False):
  """PyTorch SGD with coupled weight decay on every tensor (the CIFAR setting); nesterov: TF's
  MomentumOptimizer(use_nesterov=True), SimCLR's fine-tuning (docs/SCE.md 9)."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.trace(decay=momentum, nesterov=nesterov),
      optax.scale_by_learning_rate(learning_rate))


def clip_by_tensor_norm(max_norm):
  """DINO's utils.clip_gradients: each tensor's gradient times max_norm / (|g| + 1e-6) where
  that is below 1."""
  def clip(g, _):
    return g * jnp.minimum(1.0, max_norm / (jnp.sqrt(jnp.sum(jnp.square(g))) + 1e-6))
  return optax.stateless_with_tree_map(clip)


def make_optimizer(config, lr_fn, total_steps):
  """SCE parameters by config.optim, their gradients first clipped to optim.clip_norm (> 0):
  the global norm (optax's, as torch's clip_grad_norm_ over the trained parameters), or each
  tensor's (clip_scope 'tensor', DINO); the trunk family's `frozen` ones (a ViT's, docs/SCE.md
  10) left as they are; DINO's head's last layer (`last_layer`) untouched for its first
  optim.freeze_last_layer epochs; the online probe by its own SGD with a cosine lr."""
  o = config.optim
  wd_fn = wd_schedule(o, total_steps)

  def main(shift=0):
    """The optimiser, its schedules `shift` steps on (for a transform that starts late)."""
    lr = (lambda n: lr_fn(n + shift)) if shift else lr_fn
    wd = (lambda n: wd_fn(n + shift)) if shift and callable(wd_fn) else wd_fn
    if o.name == "lars":
      tx = lars(lr, weight_decay=wd, momentum=o.momentum, trust_coefficient=o.trust_coefficient)
    elif o.name == "adamw":
      tx = adamw(lr, weight_decay=wd, betas=tuple(o.betas), eps=o.eps)
    else:
      tx = sgd(lr, weight_decay=wd, momentum=o.momentum)
    if o.clip_norm > 0:
      clip = (optax.clip_by_global_norm if o.clip_scope == "global" else clip_by_tensor_norm)
      tx = optax.chain(clip(o.clip_norm), tx)
    return tx

  probe_lr = optax.cosine_decay_schedule(scaled_lr(config.probe.lr, config.batch_size),
                                         total_steps)
  probe = optax.sgd(probe_lr, momentum=0.9)
  fixed = trunks.family(config.model).frozen(config.model)
  transforms = {"sce": main(), "probe": probe, "frozen": optax.set_to_zero()}
  # DINO's cancel_gradients_last_layer sets the layer's gradients to None in the first epochs:
  # torch's AdamW then skips it (no moments, no step count, no decay), as this mask does; its
  # optimiser starts at step F with the schedules' values at F.
  freeze = round(o.freeze_last_layer * total_steps / config.epochs)
  if freeze > 0 and config.model.projector.bottleneck_dim > 0:
    transforms["last_layer"] = optax.transforms.conditionally_mask(
        main(shift=freeze), lambda n: n >= freeze)

  def label(params):
    out = {k: "probe" if k == "probe" else "sce" for k in params}
    if fixed:
      out["trunk"] = {k: "frozen" if k in fixed else "sce" for k in params["trunk"]}
    if "last_layer" in transforms:
      out["projector"] = {k: "last_layer" if k == "last_layer" else "sce"
                          for k in params["projector"]}
    return out
  return optax.multi_transform(transforms, label)
