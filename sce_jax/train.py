"""Pretraining: the run assembled from the config (`build`), then the loop of `loop.py`.

Resuming is exact: the state holds the step, the queue and the rng, and the data stream restarts
at the restored step, so a stopped and resumed run computes what an uninterrupted one does. The
workdir is locked while the run trains in it.
"""
import functools
from typing import Callable, NamedTuple

import jax
from absl import logging
from clu import parameter_overview

from sce_jax import evaluators, loop, methods, optim, preemption, pretrained, schema
from sce_jax import sharding, train_step
from sce_jax import state as state_lib
from sce_jax import workdir as workdir_lib
from sce_jax.data import augment, pipeline, resident, sources
from sce_jax.models import SCENet, feature_dim, make_models


class Parts(NamedTuple):
  """What a run needs, assembled once from the config."""
  online: SCENet
  target: SCENet       # None: a method without EMA target
  views: tuple        # presets.ViewSpec of each crop
  pairs: list         # losses.crop_pairs of the views
  steps_per_epoch: int
  total_steps: int    # what the schedules see: epochs x steps_per_epoch
  num_steps: int      # where this run stops: total_steps, or config.max_steps if smaller
  init: Callable      # rng -> TrainState, placed on the mesh as state.shardings says
  step: Callable      # (state, batch) -> (state, metrics), jitted, state donated


def build(config, mesh, *, num_classes, steps_per_epoch, float_views=False, on_device=False,
          views=None):
  """Models, optimiser, schedules, state initialiser and the jitted step for `config`.

  The step takes uint8 crops and runs the accelerator augmentations of config.data.views on
  them; with on_device it takes `resident.train_batches`, with data.host_stage='decode' the
  host's decoded images, and crops them itself; with
  float_views it takes network-ready float views as they are (tests). views: ViewSpecs in place
  of config.data.views' preset (benchmarks).
  """
  data = config.data
  views, pairs = schema.crops(config, views)
  total_steps = int(config.epochs * steps_per_epoch)
  num_steps = loop.last_step(total_steps, config.max_steps)
  online, target = make_models(config, num_classes,
                               methods.get(config.method).EMA_TARGET)
  lr_fn = optim.lr_schedule(config.optim, global_batch=config.batch_size,
                            steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  ema_fn = optim.ema_schedule(config.sce, total_steps)
  tx = optim.make_optimizer(config, lr_fn, total_steps)
  # Initialisation runs once, but XLA:CPU spends ~50 s optimising a ResNet-18's random
  # initialisers at its default level against ~5 s at level 0 (measured on 2 cores).
  cold = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  init = functools.partial(state_lib.init_state, config, online, target, tx,
                           image_size=data.image_size)
  state_sharding = state_lib.shardings(jax.eval_shape(init, jax.random.key(0)), mesh,
                                       config.sharding)
  init = jax.jit(init, out_shardings=state_sharding, compiler_options=cold)
  stage = dict(specs=views, mean=data.mean, std=data.std)
  prepare, batch_sharding = None, None  # float_views
  if on_device:
    prepare = functools.partial(resident.prepare, **stage)
    batch_sharding = resident.batch_sharding(mesh)
  elif not float_views:
    prepare = functools.partial(augment.crop_and_augment if data.host_stage == "decode" else
                                augment.augment_batch, **stage)
  step = train_step.make_train_step(config, mesh, online, target, tx, lr_fn, ema_fn, pairs,
                                    prepare, batch_sharding, state_sharding,
                                    steps_per_epoch=steps_per_epoch)
  return Parts(online, target, views, pairs, steps_per_epoch, total_steps, num_steps, init,
               step)


def _describe(config, splits, parts, mesh, start, workdir, on_device):
  """The run in one line (the whole config is logged at --verbosity=1)."""
  data = config.data
  source = (f"mixture {data.mixture}" if data.mixture else
            data.path if data.source == "folder" else f"{data.source} {data.name}")
  if on_device:
    source += ", held on the devices"
  if start >= parts.num_steps:
    logging.info("%s holds step %d, the last of this config: nothing to train. Pass a new "
                 "--workdir for a fresh run, or more --config.epochs (or max_steps) to go on.",
                 workdir, start)
    return
  k = config.optim.accum_steps
  micro = f" in {k} micro-batches" if k > 1 else ""
  logging.info(
      "%s pretraining of %s (%d-d features, %s) on %d images (%s; %s); batch %d%s on "
      "%d %s device(s); steps %d to %d (%d an epoch, %d in the schedules); workdir %s.",
      config.method, config.model.trunk, feature_dim(config.model), config.model.dtype,
      splits.train.num_examples,
      f"{splits.num_classes} classes" if splits.num_classes else "unlabelled", source,
      config.batch_size, micro, mesh.devices.size, jax.default_backend(),
      start + 1, parts.num_steps, parts.steps_per_epoch, parts.total_steps, workdir)


def _count_parameters(params):
  """One line (the table at --verbosity=1)."""
  counts = {name: parameter_overview.count_parameters(p) for name, p in params.items()}
  logging.info("Parameters: %s (%s).", f"{sum(counts.values()):,}",
               ", ".join(f"{name} {n:,}" for name, n in counts.items()))
  if logging.vlog_is_on(1):
    logging.vlog(1, "%s", parameter_overview.get_parameter_overview(params))


def train(config, workdir, mesh=None, splits=None):
  """Pretrains `config` in `workdir`, resuming from its latest checkpoint; returns the state.

  splits: the opened data (`sources.Splits`), by default opened from config.data. Stops after
  config.max_steps (if > 0) or the epochs; at a preemption (SIGTERM) or a Ctrl-C it saves and
  raises preemption.Preempted (preemption.Stopped, saving nothing, before the first step). The
  evaluators of config.eval (`evaluators.periodic`) run at their cadence and at the end; when
  any does, the eval split is opened (and checked against the training split) before anything
  compiles. Holds the workdir's lock throughout (workdir.WorkdirError if another run does);
  config.json records the config of a fresh start, and a resumed run with other values is
  warned about.
  """
  mesh = mesh or sharding.make_mesh()
  splits = splits or sources.Splits(config.data)
  schema.check_data_size(config, splits.train.num_examples)
  steps_per_epoch = splits.train.num_examples // config.batch_size
  labelled = sources.labelled(splits, config.data, config.eval.data)
  periodic = evaluators.periodic(config, mesh, splits, labelled, steps_per_epoch)
  if any(ev.every >= 0 for ev in periodic):
    labelled.open_eval()
  preemption.check()
  with workdir_lib.lock(workdir):
    imported = pretrained.read(config, workdir)  # None when resuming
    preemption.check()
    held = resident.load(splits.train, mesh) if config.data.on_device else None
    preemption.check()
    parts = build(config, mesh, num_classes=splits.num_classes,
                  steps_per_epoch=steps_per_epoch, on_device=held is not None)
    with loop.Run(workdir, config.checkpoint, what="", num_steps=parts.num_steps,
                  batch_size=config.batch_size, log_every=config.log_every_steps) as run:
      state, start, resumed = run.restore(parts.init, jax.random.key(config.seed))
      if imported is not None and not resumed:
        state = pretrained.start_from(state, imported)
      workdir_lib.record_config(workdir, config, resumed=resumed)
      _describe(config, splits, parts, mesh, start, workdir, on_device=held is not None)
      _count_parameters(state.params)
      if held is not None:
        batches = resident.train_batches(held, global_batch_size=config.batch_size,
                                         seed=config.seed, start_step=start, mesh=mesh)
      else:
        batches = pipeline.train_iterator(
            splits.train, config.data, global_batch_size=config.batch_size,
            views=parts.views, seed=config.seed, start_step=start,
            sharding=sharding.rows(mesh))
      return run.train(state, start, parts.step, batches, periodic)
