"""Linear evaluation of a frozen trunk (docs/SCE.md section 7).

A linear head trained with SGD on the features of the frozen online trunk in inference mode,
sharded over the `data` mesh like the rest: batches split over the devices, trunk and head
replicated. The trunk runs on every step, because the training crops are random. A 90- or
100-epoch probe is a run of its own (`loop.Run` in <workdir>/linear): it checkpoints and resumes
like pretraining.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
from etils import epath

from sce_jax import loop, models, optim, sharding
from sce_jax.data import augment, crop, pipeline
from sce_jax.data.presets import ViewSpec
from sce_jax.evaluators import common, supervised
from sce_jax.models import inits


def linear_head(num_classes):
  """Docs 7: weights N(0, 0.01), zero bias."""
  return nn.Dense(num_classes, kernel_init=inits.linear_probe, name="head")


def make_linear_step(head, tx, lr_fn, features_fn, mesh, key):
  """The jitted probe step: step(state, frozen, inputs, labels) -> (state, metrics), the
  supervised step (`supervised.make_step`) of `head` on features_fn(frozen, key, inputs), the
  frozen trunk's features. With features_fn = lambda frozen, key, x: x the step trains on given
  features."""
  return supervised.make_step(
      lambda params, _, feats: (head.apply({"params": params}, feats), None), tx, lr_fn,
      lambda frozen, key, x: features_fn(frozen, key, x).astype(jnp.float32), mesh, key)


def init(head, tx, dim):
  """rng -> a fresh probe state {'step', 'params', 'opt_state'}."""

  def fn(rng):
    params = head.init(rng, jnp.zeros((1, dim)))["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  return fn


def evaluate(config, trunk_variables, mesh, splits, workdir):
  """Linear evaluation (docs/SCE.md 7) of the frozen trunk; returns linear_top1 / linear_top5.

  The protocol is config.eval.linear's (`optim.linear_eval_schedule`). Training crops: the
  host's random resized crop (scale 0.08-1) for ImageNet-size data; for small sets
  (`crop.is_small`) the host passes whole images and the accelerator takes a random crop of the
  4-padded image. Both then flip (p 0.5) and normalise on the accelerator. The probe is a run of
  its own in <workdir>/linear (`loop.Run`: checkpoints, metrics.jsonl, a preemption or Ctrl-C
  raises preemption.Preempted after saving) beside the trunk's checksums; run again on the same
  weights, it resumes from its latest checkpoint and computes what an uninterrupted probe does.
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
  dim = models.feature_dim(config.model)
  init_key, key = jax.random.split(jax.random.key(config.seed))
  rundir = epath.Path(workdir) / "linear"
  common.pin_trunk(rundir, trunk_variables, "a linear probe")
  frozen = jax.device_put(trunk_variables, sharding.replicated(mesh))
  step = make_linear_step(head, tx, lr_fn, features_fn, mesh, key)
  num_steps = loop.last_step(total_steps, lin.max_steps)
  with loop.Run(rundir, config.checkpoint, what="linear probe", num_steps=num_steps,
                batch_size=lin.batch_size, log_every=config.log_every_steps,
                prefix="linear_") as run:
    state, start, _ = run.restore(
        jax.jit(init(head, tx, dim), out_shardings=sharding.replicated(mesh)), init_key)
    batches = pipeline.train_iterator(splits.train, data, global_batch_size=lin.batch_size,
                                      views=(view,), seed=config.seed, start_step=start,
                                      sharding=sharding.rows(mesh))
    state = run.train(state, start,
                      lambda s, b: step(s, frozen, b["views"][0], b["label"]), batches)

  feats, labels = common.extract_features(trunk, trunk_variables, splits.eval, data,
                                          batch_size=config.eval.batch_size, mesh=mesh)
  top1, top5 = supervised.head_accuracy(state["params"], feats, labels)
  return {"linear_top1": top1, "linear_top5": top5}
