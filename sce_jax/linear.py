"""Linear evaluation of a frozen trunk (docs/SCE.md section 7).

A linear head trained with SGD on the features of the frozen online trunk in inference mode,
sharded over the `data` mesh like the rest: batches split over the devices, trunk and head
replicated. The trunk runs on every step, because the training crops are random. A 90- or
100-epoch probe checkpoints and resumes like pretraining.
"""
import hashlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from sce_jax import checkpoint, evaluate, metrics, models, optim, sharding
from sce_jax.data import augment, crop, pipeline
from sce_jax.data.presets import ViewSpec


def linear_head(num_classes):
  """Docs 7: weights N(0, 0.01), zero bias."""
  return nn.Dense(num_classes, kernel_init=nn.initializers.normal(0.01), name="head")


def make_linear_step(head, tx, features_fn, mesh):
  """The jitted probe step: step(params, opt_state, frozen, inputs, labels, key).

  features_fn(frozen, key, inputs) -> (B, D) features, under stop-gradient; `frozen` (the trunk
  variables) is an argument, not a closure, so the weights are not baked into the program.
  With features_fn = lambda frozen, key, x: x the step trains on given features.
  Returns (params, opt_state, {'loss', 'top1'}).
  """

  def step(params, opt_state, frozen, inputs, labels, key):
    feats = jax.lax.stop_gradient(features_fn(frozen, key, inputs)).astype(jnp.float32)

    def loss_fn(params):
      logits = head.apply({"params": params}, feats)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    top1 = jnp.mean(jnp.argmax(logits, -1) == labels)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, "top1": top1}

  replicated, rows = sharding.replicated(mesh), sharding.rows(mesh)
  return jax.jit(step, in_shardings=(replicated, replicated, replicated, rows, rows, replicated),
                 out_shardings=replicated, donate_argnums=(0, 1))


def _check_trunk(rundir, trunk_variables):
  """A probe resumes only on the weights it started with: <rundir>/trunk_sha256.txt names them.
  Probing other weights (the workdir's pretraining went on) needs the old probe out of the way."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(trunk_variables):
    digest.update(np.asarray(leaf).tobytes())
  record = rundir / "trunk_sha256.txt"
  if record.exists() and record.read_text() != digest.hexdigest():
    raise checkpoint.CheckpointError(
        f"{rundir} holds a linear probe of other trunk weights; delete it (or pass another "
        "--workdir) to probe these.")
  if jax.process_index() == 0:
    rundir.mkdir(parents=True, exist_ok=True)
    record.write_text(digest.hexdigest())


def linear_eval(config, trunk_variables, mesh, splits, workdir):
  """Linear evaluation (docs/SCE.md 7) of the frozen trunk; returns linear_top1 / linear_top5.

  The protocol is config.eval.linear's (`optim.linear_eval_schedule`). Training crops: the
  host's random resized crop (scale 0.08-1) for ImageNet-size data; for small sets
  (`crop.is_small`) the host passes whole images and the accelerator takes a random crop of the
  4-padded image. Both then flip (p 0.5) and normalise on the accelerator. The probe is a run of
  its own in <workdir>/linear: checkpoints (config.checkpoint's interval, the last step, and at
  a preemption or Ctrl-C, after which it raises checkpoint.Preempted), metrics.jsonl and the
  trunk's hash. Run again on the
  same weights, it resumes from its latest checkpoint and computes what an uninterrupted probe
  does: the head's state is checkpointed, each step's key is derived from the step and the data
  stream restarts at that step.
  """
  lin, data = config.eval.linear, config.data
  small = crop.is_small(data.image_size)
  view = (ViewSpec(data.image_size, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=0.0, gray=0.0)
          if small else ViewSpec(data.image_size, scale=(0.08, 1.0), jitter=0.0, gray=0.0))
  trunk = models.make_trunk(config.model)

  def features_fn(frozen, key, images):
    crop_key, aug_key = jax.random.split(key)
    if small:
      images = augment.random_pad_crop(crop_key, images, 4)
    x = augment.augment_view(aug_key, images, view, data.mean, data.std)
    return trunk.apply(frozen, x, train=False)

  steps_per_epoch = max(splits.train.num_examples // lin.batch_size, 1)
  total_steps = int(lin.epochs * steps_per_epoch)
  lr_fn = optim.linear_eval_schedule(lin, steps_per_epoch=steps_per_epoch,
                                     total_steps=total_steps)
  tx = optim.sgd(lr_fn, weight_decay=lin.weight_decay, momentum=lin.momentum)
  head = linear_head(splits.num_classes)
  dim = models.feature_dim(config.model.trunk, config.model.width)
  init_key, key = jax.random.split(jax.random.key(config.seed))

  def init(rng):
    params = head.init(rng, jnp.zeros((1, dim)))["params"]
    return {"params": params, "opt_state": tx.init(params)}

  init = jax.jit(init, out_shardings=sharding.replicated(mesh))
  rundir = epath.Path(workdir) / "linear"
  _check_trunk(rundir, trunk_variables)
  mngr = checkpoint.manager(rundir, config.checkpoint)
  state = checkpoint.restore(mngr, jax.eval_shape(init, init_key))
  start = mngr.latest_step() or 0
  if state is None:
    state = init(init_key)
  params, opt_state = state["params"], state["opt_state"]
  frozen = jax.device_put(trunk_variables, sharding.replicated(mesh))
  step_fn = make_linear_step(head, tx, features_fn, mesh)

  num_steps = min(total_steps, lin.max_steps) if lin.max_steps > 0 else total_steps
  batches = pipeline.train_iterator(splits.train, data, global_batch_size=lin.batch_size,
                                    views=(view,), seed=config.seed, start_step=start,
                                    sharding=sharding.rows(mesh))
  writer = metrics.Writer(rundir)
  preemption = checkpoint.Preemption()
  try:
    for step in range(start + 1, num_steps + 1):
      batch = next(batches)
      params, opt_state, step_metrics = step_fn(params, opt_state, frozen, batch["views"][0],
                                                batch["label"], jax.random.fold_in(key, step))
      preempted = preemption.reached(mngr, step)
      if preempted or step == num_steps or mngr.should_save(step):
        checkpoint.save(mngr, step, {"params": params, "opt_state": opt_state})
      if preempted or step == num_steps or step % config.log_every_steps == 0:
        writer.write(step, {**{f"linear_{k}": v for k, v in step_metrics.items()},
                            "linear_lr": lr_fn(step - 1)})
      checkpoint.check(mngr)
      if preempted:
        raise preemption.stop(mngr, step)
    checkpoint.wait(mngr)  # A failed last save is an error.
  finally:
    batches.close()  # stops the host pipeline (grain workers) of the infinite stream
    preemption.close()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()

  feats, labels = evaluate.extract_features(trunk, trunk_variables, splits.eval, data,
                                            batch_size=config.eval.batch_size, mesh=mesh)
  params = jax.device_get(params)
  top1, top5 = evaluate.topk_accuracy(feats @ params["kernel"] + params["bias"], labels)
  return {"linear_top1": top1, "linear_top5": top5}
