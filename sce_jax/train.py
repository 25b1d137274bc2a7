"""The pretraining loop: restore or initialise, step, log, checkpoint, evaluate.

Resuming is exact: the state holds the step, the queue and the rng, and the data iterator
restarts at the restored step, so a stopped and resumed run computes what an uninterrupted one
does. Losses are checked for NaN/inf before every log and the whole state before every save,
so no checkpoint holds a diverged state. The workdir is locked while the run trains in it.
"""
import contextlib
import datetime
import time

import jax
import numpy as np
from absl import logging
from clu import parameter_overview

from sce_jax import checkpoint, evaluate, logs, metrics, sharding, train_step
from sce_jax import config as sce_config
from sce_jax import workdir as workdir_lib
from sce_jax.data import device, pipeline, sources


class _Log:
  """Collects each step's metrics on the device; `flush` fetches them in one transfer, checks
  the losses, writes the last step's metrics with throughput and ETA, and logs one line."""

  def __init__(self, writer, mngr, *, start, num_steps, batch_size):
    self.writer, self.mngr = writer, mngr
    self.num_steps, self.batch_size = num_steps, batch_size
    self.pending = []
    self.last_step, self.last_time = start, time.time()
    self.bar = logs.progress_bar(num_steps, start)

  def add(self, step, step_metrics):
    self.pending.append((step, step_metrics))
    if self.bar is not None:
      self.bar.update(1)

  def flush(self):
    if not self.pending:
      return
    pending, self.pending = jax.device_get(self.pending), []
    for step, m in pending:
      if not np.isfinite(m["loss"]):
        raise FloatingPointError(checkpoint.diverged(
            self.mngr, f"The loss is {m['loss']} at step {step}"))
    step, m = pending[-1]
    now = time.time()
    steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.num_steps - step) / max(steps_per_sec, 1e-9)
    self.writer.write(step, {**m, "steps_per_sec": steps_per_sec,
                             "images_per_sec": steps_per_sec * self.batch_size,
                             "eta_seconds": eta})
    logging.info("step %d/%d: loss %.4f, %.1f img/s, ETA %s", step, self.num_steps, m["loss"],
                 steps_per_sec * self.batch_size, datetime.timedelta(seconds=round(eta)))
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _knn(config, state, mesh, splits, writer, step):
  results = evaluate.knn_eval(config, evaluate.trunk_variables(state), mesh, splits)
  logging.info("kNN at step %d: %s", step, results)
  writer.write(step, results)


def _describe(config, splits, parts, mesh, start, workdir, on_device):
  """The run in one line (the whole config is logged at --verbosity=1)."""
  data = config.data
  source = data.path if data.source == "folder" else f"{data.source} {data.name}"
  if on_device:
    source += ", held on the devices"
  if start >= parts.num_steps:
    logging.info("%s holds step %d, the last of this config: nothing to train. Pass a new "
                 "--workdir for a fresh run, or more --config.epochs (or max_steps) to go on.",
                 workdir, start)
    return
  logging.info(
      "SCE pretraining of %s (width %d, %s) on %d images of %d classes (%s); batch %d on %d %s "
      "device(s); steps %d to %d (%d an epoch, %d in the schedules); workdir %s.",
      config.model.trunk, config.model.width, config.model.dtype, splits.train.num_examples,
      splits.num_classes, source, config.batch_size, mesh.devices.size, jax.default_backend(),
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
  raises checkpoint.Preempted. kNN monitoring every config.eval.every_epochs epochs (> 0), and
  at the end (>= 0). Holds the workdir's lock throughout (workdir.WorkdirError if another run
  does); config.json records the config of a fresh start, and a resumed run with other values
  is warned about.
  """
  mesh = mesh or sharding.make_mesh()
  splits = splits or sources.Splits(config.data)
  sce_config.check_data_size(config, splits.train.num_examples)
  with workdir_lib.lock(workdir):
    return _train(config, workdir, mesh, splits)


def _train(config, workdir, mesh, splits):
  resident = device.load(splits.train, mesh) if config.data.on_device else None
  parts = train_step.build(config, mesh, num_classes=splits.num_classes,
                           steps_per_epoch=splits.train.num_examples // config.batch_size,
                           on_device=resident is not None)
  rng = jax.random.key(config.seed)
  mngr = checkpoint.manager(workdir, config.checkpoint)
  with contextlib.ExitStack() as cleanup:  # Every callback runs, in reverse order.
    cleanup.callback(mngr.close)
    cleanup.callback(checkpoint.wait, mngr)  # A failed last save is an error.
    state = checkpoint.restore(mngr, jax.eval_shape(parts.init, rng))
    workdir_lib.record_config(workdir, config, resumed=state is not None)
    if state is None:
      state = parts.init(rng)
    start = int(state.step)
    _describe(config, splits, parts, mesh, start, workdir, on_device=resident is not None)
    _count_parameters(state.params)

    writer = metrics.Writer(workdir)
    cleanup.callback(writer.close)
    log = _Log(writer, mngr, start=start, num_steps=parts.num_steps,
               batch_size=config.batch_size)
    cleanup.callback(log.close)
    knn_every = max(config.eval.every_epochs, 0) * parts.steps_per_epoch
    preemption = checkpoint.Preemption()
    cleanup.callback(preemption.close)
    if resident is not None:
      batches = device.train_batches(resident, global_batch_size=config.batch_size,
                                     seed=config.seed, start_step=start, mesh=mesh)
    else:
      batches = pipeline.train_iterator(
          splits.train, config.data, global_batch_size=config.batch_size, views=parts.views,
          seed=config.seed, start_step=start, sharding=sharding.rows(mesh))
    cleanup.callback(batches.close)
    for step in range(start + 1, parts.num_steps + 1):
      state, step_metrics = parts.step(state, next(batches))
      log.add(step, step_metrics)
      preempted = preemption.reached(mngr, step)
      last = preempted or step == parts.num_steps
      save = last or mngr.should_save(step)
      checkpoint.check(mngr)
      if save or step % config.log_every_steps == 0:
        log.flush()
      if save:
        checkpoint.save(mngr, step, state)
      if preempted:
        raise preemption.stop(mngr, step)
      if knn_every and step % knn_every == 0 and not last:
        _knn(config, state, mesh, splits, writer, step)
    if config.eval.every_epochs >= 0:
      _knn(config, state, mesh, splits, writer, int(state.step))
    return state
