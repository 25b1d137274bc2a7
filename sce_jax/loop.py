"""The step-boundary protocol of every training loop: pretraining, the linear probe, fine-tuning.

One owner for what happens between two steps, so that the loops cannot drift apart:

* start: the latest checkpoint of the run's directory restored (checksums verified) or a fresh
  state; the start step is the restored checkpoint's, and the data stream restarts there, so a
  stopped and resumed run computes what an uninterrupted one does; a stop requested during the
  start-up (preemption.py) is preemption.Stopped, before the first step, nothing saved;
* after each step, in this order: a failed asynchronous save stops the run (checkpoint.check);
  at a log step, a save or the last step the pending metrics are fetched in one transfer, the
  loss checked for NaN/inf and the last step's metrics written with throughput and ETA; a save
  at the checkpoint interval, the last step and a preemption; at a preemption (SIGTERM) or
  Ctrl-C, preemption.Preempted once the save has started; the evaluators whose cadence has come;
* at the end: the evaluators with a cadence >= 0, the last save waited for (a failed one is an
  error), then cleanup in reverse order of set-up, every step of it run.

Throughout, the run's wall time is accounted for (goodput.py): the first step (its compile, or
its load from the persistent compilation cache, compile_cache.py) and the time to it, each log
step's totals and goodput in metrics.jsonl, and a last line with them.
"""
import contextlib
import dataclasses
import datetime
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from absl import logging
from etils import epath

from sce_jax import checkpoint, compile_cache, goodput, logs, metrics, preemption


def last_step(total_steps, max_steps) -> int:
  """Where a run stops: its schedules' total_steps, or max_steps (> 0, smoke runs) if smaller;
  the schedules still see total_steps."""
  return min(total_steps, max_steps) if max_steps > 0 else total_steps


def itstime(step, every, total) -> bool:
  """Whether a periodic action is due after `step` (big_vision's rule): every `every` steps
  (> 0), not at the last step `total`, which the end of the loop handles."""
  return every > 0 and step % every == 0 and step != total


@dataclasses.dataclass
class Evaluator:
  """A periodic evaluation: run(state) yields (name, value) pairs; every: its cadence in steps
  (> 0: every that many steps and at the end; 0: at the end only; < 0: never)."""
  name: str
  every: int
  run: Callable[[Any], Iterable[tuple[str, float]]]


class _Log:
  """Collects each step's metrics on the device; `flush` fetches them in one transfer, checks
  the losses, writes the last step's metrics with throughput and ETA, and logs one line."""

  def __init__(self, writer, mngr, clock, *, what, prefix, start, num_steps, batch_size):
    self.writer, self.mngr, self.clock, self.prefix = writer, mngr, clock, prefix
    self.what = f"{what} " if what else ""
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
            self.mngr, f"The {self.what}loss is {m['loss']} at step {step}"))
    step, m = pending[-1]
    now = time.time()
    steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.num_steps - step) / max(steps_per_sec, 1e-9)
    self.writer.write(step, {**{self.prefix + k: v for k, v in m.items()},
                             "steps_per_sec": steps_per_sec,
                             "images_per_sec": steps_per_sec * self.batch_size,
                             "eta_seconds": eta, **self.clock.totals()})
    logging.info("%sstep %d/%d: loss %.4f, %.1f img/s, ETA %s", self.what, step,
                 self.num_steps, m["loss"], steps_per_sec * self.batch_size,
                 datetime.timedelta(seconds=round(eta)))
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)

  def close(self):
    if self.bar is not None:
      self.bar.close()


@dataclasses.dataclass
class Run:
  """A resumable training run in `rundir`: what a loop needs besides its step and its data.

  what: the run's name in its log lines and messages ('' for pretraining, 'linear probe');
  prefix: of its metric names in metrics.jsonl; num_steps: where it stops; batch_size: for the
  throughput.
  """
  rundir: Any
  ckpt_cfg: Any
  what: str
  num_steps: int
  batch_size: int
  log_every: int
  prefix: str = ""

  def __post_init__(self):
    self.mngr = checkpoint.manager(self.rundir, self.ckpt_cfg)
    self.clock = goodput.Clock(epath.Path(self.rundir) / "metrics.jsonl")
    self._cleanup = contextlib.ExitStack()  # Every callback runs, in reverse order.
    self._cleanup.callback(self.mngr.close)
    self._cleanup.callback(self.mngr.wait_until_finished)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return self._cleanup.__exit__(*exc)

  def restore(self, init: Callable, rng) -> tuple[Any, int, bool]:
    """(state, start step, resumed): the latest checkpoint, or init(rng) at step 0."""
    abstract, began = jax.eval_shape(init, rng), time.perf_counter()
    state = checkpoint.restore(self.mngr, abstract)
    if state is None:  # looking for none is start-up
      return init(rng), 0, False
    self.clock.add("restore", time.perf_counter() - began)
    return state, self.mngr.latest_step(), True

  def train(self, state, start: int, step_fn: Callable, batches: Iterator,
            evaluators: Iterable[Evaluator] = ()):
    """Runs step_fn(state, batch) -> (state, metrics) from `start` + 1 to num_steps on
    `batches` (closed here), then the final evaluations; returns the state.

    Raises preemption.Preempted after saving at a preemption or Ctrl-C (preemption.Stopped if
    it came before the first step), FloatingPointError at a non-finite loss or state,
    checkpoint.CheckpointError at a failed save.
    """
    preemption.check()
    cleanup = self._cleanup
    cleanup.callback(checkpoint.wait, self.mngr)  # A failed last save is an error.
    cleanup.callback(batches.close)  # stops a host pipeline (grain workers)
    writer = cleanup.enter_context(contextlib.closing(metrics.Writer(self.rundir)))
    clock = self.clock
    log = _Log(writer, self.mngr, clock, what=self.what, prefix=self.prefix, start=start,
               num_steps=self.num_steps, batch_size=self.batch_size)
    cleanup.callback(log.close)
    signals = preemption.Preemption(jax.process_count())
    cleanup.callback(signals.close)
    evaluators = list(evaluators)
    for step in range(start + 1, self.num_steps + 1):
      began, accounted = time.perf_counter(), clock.accounted()
      with clock.timing("data_wait"):
        batch = next(batches)
      if step == start + 1:
        state, step_metrics = _first_step(step_fn, state, batch, writer, clock, self.what, step)
      else:
        state, step_metrics = step_fn(state, batch)
      log.add(step, step_metrics)
      preempted = signals.reached(self.mngr, step)
      save = preempted or step == self.num_steps or self.mngr.should_save(step)
      checkpoint.check(self.mngr)
      if save or itstime(step, self.log_every, self.num_steps):
        log.flush()
      if save:
        with clock.timing("save"):
          checkpoint.save(self.mngr, step, state)
      if preempted:
        raise signals.stop(step, checkpoint.step_dir(self.mngr, step))
      for ev in evaluators:
        if itstime(step, ev.every, self.num_steps):
          _evaluate(ev, state, writer, step, clock)
      # The rest of the iteration is the step's (with JAX's asynchronous dispatch, a log
      # step's fetch of the metrics waits for the steps before it).
      clock.add(clock.step_part(step),
                time.perf_counter() - began - (clock.accounted() - accounted))
    for ev in evaluators:
      if ev.every >= 0:
        _evaluate(ev, state, writer, max(start, self.num_steps), clock)
    writer.write(max(start, self.num_steps), clock.totals())
    logging.info("%s%s.", f"{self.what.capitalize()}: " if self.what else "Run: ",
                 clock.summary())
    return state


def _first_step(step_fn, state, batch, writer, clock, what, step):
  """The first step of a process, waited for: its compile (or load from the persistent cache)
  and one step, logged and written with the time from the process's start to its end."""
  with compile_cache.Watch() as cache, clock.timing("compile"):
    state, step_metrics = jax.block_until_ready(step_fn(state, batch))
  since_start = time.time() - clock.started
  source = ("loaded from the persistent compilation cache" if cache.hit else
            "compiled (saved to the persistent compilation cache)" if cache.used else
            "compiled")
  logging.info("%sirst step %s in %.1f s; %.1f s after the start.",
               f"{what.capitalize()}: f" if what else "F", source, clock.seconds["compile"],
               since_start)
  writer.write(step, {"time_to_first_step_s": since_start,
                      "compile_cache_hit": float(cache.hit)})
  return state, step_metrics


def _evaluate(ev, state, writer, step, clock):
  with clock.timing("evaluation"):
    results = dict(ev.run(state))
  logging.info("%s at step %d: %s", ev.name, step,
               ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
  writer.write(step, results)
