"""The pretraining loop: restore or initialise, step, log, checkpoint, evaluate.

Resuming is exact: the state holds the step, the queue and the rng, and the data iterator
restarts at the restored step, so a stopped and resumed run computes what an uninterrupted one
does. Losses are checked for NaN/inf before every log and every save, so no checkpoint holds a
diverged state.
"""
import sys
import time

import jax
import numpy as np
from absl import logging
from clu import parameter_overview

from sce_jax import checkpoint, evaluate, metrics, sharding, train_step
from sce_jax.data import device, pipeline, sources


class _Log:
  """Collects each step's metrics on the device; `flush` fetches them in one transfer, checks
  the losses and writes the last step's metrics with throughput and ETA."""

  def __init__(self, writer, mngr, *, start, num_steps, batch_size):
    self.writer, self.mngr = writer, mngr
    self.num_steps, self.batch_size = num_steps, batch_size
    self.pending = []
    self.last_step, self.last_time = start, time.time()
    self.bar = None
    if jax.process_index() == 0 and sys.stdout.isatty():
      import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm.tqdm(total=num_steps, initial=start, unit="step", dynamic_ncols=True)

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
        latest = self.mngr.latest_step()
        where = (f"{checkpoint.directory_of(self.mngr, latest)} (step {latest})"
                 if latest is not None else "none (no checkpoint was saved)")
        raise FloatingPointError(
            f"The loss is {m['loss']} at step {step}: training diverged. The last good "
            f"checkpoint is {where}; a restart resumes from it. Lower optim.base_lr or check "
            "the data.")
    step, m = pending[-1]
    now = time.time()
    steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    self.writer.write(step, {**m, "steps_per_sec": steps_per_sec,
                             "images_per_sec": steps_per_sec * self.batch_size,
                             "eta_seconds": (self.num_steps - step) / max(steps_per_sec, 1e-9)})
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _knn(config, state, mesh, splits, writer, step):
  results = evaluate.knn_eval(config, evaluate.trunk_variables(state), mesh, splits)
  logging.info("kNN at step %d: %s", step, results)
  writer.write(step, results)


def train(config, workdir, mesh=None, splits=None):
  """Pretrains `config` in `workdir`, resuming from its latest checkpoint; returns the state.

  splits: the opened data (`sources.Splits`), by default opened from config.data. Stops after
  config.max_steps (if > 0) or the epochs, or at a preemption (SIGTERM) after a save. kNN
  monitoring every config.eval.every_epochs epochs (> 0), and at the end (>= 0).
  """
  mesh = mesh or sharding.make_mesh()
  splits = splits or sources.Splits(config.data)
  resident = device.load(splits.train, mesh) if config.data.on_device else None
  parts = train_step.build(config, mesh, num_classes=splits.num_classes,
                           steps_per_epoch=splits.train.num_examples // config.batch_size,
                           on_device=resident is not None)
  steps_per_epoch, num_steps = parts.steps_per_epoch, parts.num_steps
  rng = jax.random.key(config.seed)
  mngr = checkpoint.manager(workdir, config.checkpoint)
  state = checkpoint.restore(mngr, jax.eval_shape(parts.init, rng))
  if state is None:
    state = parts.init(rng)
  start = int(state.step)
  if jax.process_index() == 0:
    parameter_overview.log_parameter_overview(state.params)
  logging.info("Training steps %d to %d (%d steps an epoch, %d in the schedules).", start + 1,
               num_steps, steps_per_epoch, parts.total_steps)

  writer = metrics.Writer(workdir)
  log = _Log(writer, mngr, start=start, num_steps=num_steps, batch_size=config.batch_size)
  knn_every = max(config.eval.every_epochs, 0) * steps_per_epoch
  preemption = checkpoint.Preemption()
  if resident is not None:
    batches = device.train_batches(resident, global_batch_size=config.batch_size,
                                   seed=config.seed, start_step=start, mesh=mesh)
  else:
    batches = pipeline.train_iterator(
        splits.train, config.data, global_batch_size=config.batch_size, views=parts.views,
        seed=config.seed, start_step=start, sharding=sharding.rows(mesh))
  try:
    for step in range(start + 1, num_steps + 1):
      state, step_metrics = parts.step(state, next(batches))
      log.add(step, step_metrics)
      preempted = preemption.reached(mngr, step)
      last = preempted or step == num_steps
      save = last or mngr.should_save(step)
      if save or step % config.log_every_steps == 0:
        log.flush()
      if save:
        checkpoint.save(mngr, step, state)
      if preempted:
        logging.warning("Preempted: saved step %d to %s; a restart resumes from it.", step,
                        checkpoint.directory_of(mngr, step))
        return state
      if knn_every and step % knn_every == 0 and not last:
        _knn(config, state, mesh, splits, writer, step)
    if config.eval.every_epochs >= 0:
      _knn(config, state, mesh, splits, writer, int(state.step))
    return state
  finally:
    batches.close()
    preemption.close()
    log.close()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
