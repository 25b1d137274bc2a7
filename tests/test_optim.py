"""LARS order of operations, AdamW as torch's with eztorch's exclusions, clipping and frozen
parameters, schedules (docs/SCE.md sections 3, 5 and 10)."""
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sce_jax import optim
from tests.helpers import load_config


def numpy_lars(params, grads_seq, lrs, wd, momentum, eta):
  """The authors' LARS in float64: decay + trust ratio on ndim > 1, momentum, then lr."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  buf = {k: np.zeros_like(v) for k, v in params.items()}
  for grads, lr in zip(grads_seq, lrs):
    for k, p in params.items():
      d = grads[k].astype(np.float64)
      if p.ndim > 1:
        d = d + wd * p
        pn, dn = np.linalg.norm(p), np.linalg.norm(d)
        d = d * (eta * pn / dn if pn > 0 and dn > 0 else 1.0)
      buf[k] = momentum * buf[k] + d
      params[k] = p - lr * buf[k]
  return params


def _run(tx, params, grads_seq):
  state = tx.init(params)
  for g in grads_seq:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_lars_applies_lr_after_momentum():
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(8, 4)).astype(np.float32),
            "b": rng.normal(size=(4,)).astype(np.float32)}
  grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
               for _ in range(6)]
  lrs = [0.5, 1.0, 2.0, 1.5, 0.7, 0.1]  # a changing learning rate makes the order visible
  schedule = lambda count: jnp.asarray(lrs)[count]
  kw = dict(weight_decay=1e-2, momentum=0.9)
  ours = _run(optim.lars(schedule, trust_coefficient=1e-3, **kw), params, grads_seq)
  want = numpy_lars(params, grads_seq, lrs, wd=1e-2, momentum=0.9, eta=1e-3)
  for k in params:
    np.testing.assert_allclose(ours[k], want[k], rtol=1e-5, atol=1e-6)
  # optax.lars scales by the learning rate before its momentum trace: a different optimiser.
  masks = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  theirs = _run(optax.lars(schedule, weight_decay_mask=masks, trust_ratio_mask=masks, **kw),
                params, grads_seq)
  assert not np.allclose(theirs["b"], want["b"], rtol=1e-3)


def test_sgd_is_torch_sgd_with_coupled_decay():
  rng = np.random.default_rng(1)
  p = {"w": rng.normal(size=(3, 3)).astype(np.float32)}
  grads = [{"w": rng.normal(size=(3, 3)).astype(np.float32)} for _ in range(3)]
  ours = _run(optim.sgd(0.1, weight_decay=0.01), p, grads)
  w, buf = p["w"].astype(np.float64), 0.0
  for g in grads:
    buf = 0.9 * buf + g["w"] + 0.01 * w
    w = w - 0.1 * buf
  np.testing.assert_allclose(ours["w"], w, rtol=1e-5)


def authors_lr(base_lr, warmup, total, steps):
  """The lr of each of the first `steps` steps under the authors' LinearWarmupCosineAnnealingLR
  (CEA-LIST/SCE sce/schedulers, from pl_bolts), in float64: its chainable get_lr, stepped after
  every optimiser step (the scheduler's `interval: step`), from last_epoch 0 at the first step.
  Its branch for last_epoch past `total` is left out: never reached here."""
  lrs = []
  for t in range(steps):
    if t == 0 and warmup != 0:
      lr = 0.0  # warmup_start_lr
    elif t < warmup:
      lr = lr + base_lr / (warmup - 1)
    elif t == warmup:
      lr = base_lr
    else:
      lr = ((1 + np.cos(np.pi * (t - warmup) / (total - warmup)))
            / (1 + np.cos(np.pi * (t - warmup - 1) / (total - warmup))) * lr)
    lrs.append(lr)
  return np.array(lrs)


@pytest.mark.parametrize("warmup_epochs", [0, 0.1, 0.2, 2])
def test_lr_schedule_is_the_authors(warmup_epochs):
  """Linear scaling, then the authors' warmup and cosine at every step of a 100-step run with
  warmups of 0, 1, 2 and 20 steps: 0 at the first step, the peak at the last warmup step
  (optax's warmup_cosine_decay_schedule is a step behind: (W - 1) / W of it) and at the first
  cosine step. float32 against float64: a handful of roundings of 6e-8 relative to values at
  most the peak, so 1e-6 of the peak bounds the gap."""
  cfg = ml_collections.ConfigDict(dict(base_lr=0.3, warmup_epochs=warmup_epochs, min_lr=0.0))
  fn = optim.lr_schedule(cfg, global_batch=512, steps_per_epoch=10, total_steps=100)
  peak, warmup = 0.3 * 512 / 256, int(warmup_epochs * 10)
  ours = np.array([float(fn(t)) for t in range(100)])
  np.testing.assert_allclose(ours, authors_lr(peak, warmup, 100, 100), rtol=0, atol=1e-6 * peak)
  if warmup:
    assert ours[0] == 0.0
  if warmup > 1:  # A single warmup step is the first one, at 0.
    assert ours[warmup - 1] == pytest.approx(peak, rel=1e-6)
  assert ours[warmup] == pytest.approx(peak, rel=1e-6)
  assert float(fn(100)) == pytest.approx(0.0, abs=1e-7)


def test_ema_schedule():
  schedule = lambda total, **kw: optim.ema_schedule(ml_collections.ConfigDict(kw), total)
  cos = schedule(101, m0=0.99, m_schedule="cosine", m_final=1.0)
  assert float(cos(0)) == pytest.approx(0.99)
  assert float(cos(50)) == pytest.approx(0.995)
  assert float(cos(100)) == pytest.approx(1.0)
  to_0999 = schedule(101, m0=0.99, m_schedule="cosine", m_final=0.999)  # solo-learn MoCo v2+
  assert [float(to_0999(t)) for t in (0, 50, 100)] == pytest.approx([0.99, 0.9945, 0.999])
  const = schedule(9, m0=0.99, m_schedule="constant", m_final=1.0)
  assert float(const(7)) == pytest.approx(0.99)


def vit_params(rng):
  """A ViT-like tree: matrices, a bias, a LayerNorm scale, the position and class tokens."""
  shapes = {"pos_embed": (1, 5, 4), "cls_token": (1, 1, 4), "patch_embed": {"kernel": (2, 2, 3, 4)},
            "blocks_0": {"qkv": {"kernel": (4, 12), "bias": (12,)}, "norm1": {"scale": (4,)}}}
  return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def test_adamw_is_torch_adamw_without_decay_on_norms_biases_and_tokens():
  """torch.optim.AdamW stated in float64 (decay p -= lr wd p first, bias-corrected moments, eps
  outside the square root) with a changing lr, weight decay only on the matrices (eztorch:
  exclude_wd_norm, exclude_wd_bias, keys_without_decay [pos_embed, cls_token])."""
  rng = np.random.default_rng(2)
  params = vit_params(rng)
  grads_seq = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
               for _ in range(5)]
  lrs, wd, (b1, b2), eps = [0.1, 0.3, 0.2, 0.05, 0.4], 0.05, (0.9, 0.999), 1e-8
  ours = _run(optim.adamw(lambda count: jnp.asarray(lrs)[count], weight_decay=wd), params,
              grads_seq)
  decayed = {"patch_embed/kernel", "blocks_0/qkv/kernel"}
  flat = lambda tree: flax.traverse_util.flatten_dict(tree, sep="/")
  for name, p in flat(params).items():
    p, m, v = p.astype(np.float64), 0.0, 0.0
    for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
      g = flat(grads)[name].astype(np.float64)
      if name in decayed:
        p = p - lr * wd * p
      m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
      p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    # float32 against float64: 0.999 is stored as 0.99900001, so the float32 bias correction
    # 1 - 0.999^t is off by up to 1.2e-5 of itself, and every update (<= lr in size) by half
    # that; over the 5 steps (sum of lr 1.05) that is <= 1e-5.
    np.testing.assert_allclose(flat(ours)[name], p, rtol=1e-5, atol=1.5e-5, err_msg=name)


def test_clipping_sees_the_trained_parameters_and_frozen_ones_stay():
  """optim.clip_norm scales the SCE gradients by clip / their global norm (torch's
  clip_grad_norm_ over the parameters that train: not the probe's, not the frozen ones'); the
  sin-cos table and the frozen patch projection do not move, not even by weight decay."""
  c = load_config("cifar10_vit")
  c.optim.update(name="sgd", momentum=0.0, weight_decay=0.1, clip_norm=0.5)
  c.model.update(pos_embed="sincos", freeze_patch_embed=True)
  rng = np.random.default_rng(3)
  params = {"trunk": vit_params(rng),
            "projector": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)},
            "probe": {"kernel": rng.normal(size=(4, 10)).astype(np.float32)}}
  grads = jax.tree.map(lambda p: 10 * rng.normal(size=p.shape).astype(np.float32), params)
  tx = optim.make_optimizer(c, lambda count: 0.2, total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  trunk, frozen = grads["trunk"], ("pos_embed", "patch_embed")
  trained = [grads["projector"]] + [v for k, v in trunk.items() if k not in frozen]
  scale = 0.5 / optax.tree.norm(trained)
  for k in frozen:
    jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0.0), updates["trunk"][k])
  want = -0.2 * (scale * trunk["cls_token"] + 0.1 * params["trunk"]["cls_token"])
  np.testing.assert_allclose(updates["trunk"]["cls_token"], want, rtol=1e-5)
  want = -0.2 * (scale * grads["projector"]["kernel"] + 0.1 * params["projector"]["kernel"])
  np.testing.assert_allclose(updates["projector"]["kernel"], want, rtol=1e-5)
  assert np.abs(updates["probe"]["kernel"]).max() > 10 * 0.2 * float(scale)  # not clipped


@pytest.mark.parametrize("name", ["cifar10_r18", "cifar100_r18", "imagenet_r50",
                                  "imagenet_vit_s16"])
def test_linear_eval_protocols(name):
  """docs/SCE.md 7. Small datasets: lr 30 whatever the batch, x 0.1 from epoch 60 and again
  from epoch 80 of 100. ImageNet: lr 0.1 x batch / 256 (0.4 at 1024), cosine to 0 over 90;
  for a ViT, MoCo v3's lr 3 x batch / 256 (12 at 1024)."""
  lin = load_config(name).eval.linear
  assert (lin.momentum, lin.weight_decay) == (0.9, 0.0)
  fn = optim.linear_eval_schedule(lin, steps_per_epoch=10, total_steps=lin.epochs * 10)
  lr = lambda epoch: float(fn(int(epoch * 10)))
  if name.startswith("imagenet"):
    peak = 12.0 if "vit" in name else 0.4
    assert (lin.batch_size, lin.epochs) == (1024, 90)
    assert lr(0) == pytest.approx(peak) and lr(45) == pytest.approx(peak / 2)
    assert lr(90) == pytest.approx(0.0, abs=1e-6)
  else:
    assert (lin.batch_size, lin.epochs) == (256, 100)
    assert [lr(e) for e in (0, 59.9, 60, 79.9, 80, 99.9)] == pytest.approx(
        [30, 30, 3, 3, 0.3, 0.3])
