"""The step-boundary protocol (sce_jax/loop.py) on a toy loop: what pretraining, the linear probe
and fine-tuning share. The cases are those in which the two loops of before disagreed: when a
failed save is found, whether a step's metrics are checked before its save, what is cleaned up
and the start step."""
import resource
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sce_jax import checkpoint, loop, metrics, preemption

CKPT = ml_collections.ConfigDict(dict(every_steps=4, keep=3))


class Batches:
  """The data stream of a toy run: batch s is a function of s alone, as the real streams are,
  so a stream restarted at a step yields what the uninterrupted one does."""

  def __init__(self, start, nan_at=None, size=4):
    self.step, self.nan_at, self.size, self.closed = start, nan_at, size, False

  def __next__(self):
    self.step += 1
    x = np.random.default_rng(self.step).normal(size=self.size).astype(np.float32)
    return x * np.nan if self.step == self.nan_at else x

  def close(self):
    self.closed = True


@jax.jit
def step_fn(state, batch):
  loss = jnp.mean((state["w"] - batch) ** 2)
  return {"w": state["w"] - 0.1 * (state["w"] - batch)}, {"loss": loss}


def init(size):
  return jax.jit(lambda rng: {"w": jax.random.normal(rng, (size,))})


def train(rundir, num_steps=10, evaluators=(), nan_at=None, size=4):
  """(state, batches) of a toy run to num_steps in rundir, resumed from its checkpoint."""
  made = []
  try:
    with loop.Run(rundir, CKPT, what="toy", num_steps=num_steps, batch_size=4,
                  log_every=1) as run:
      state, start, _ = run.restore(init(size), jax.random.key(0))
      made.append(Batches(start, nan_at, size))
      return run.train(state, start, step_fn, made[0], evaluators), made[0]
  finally:
    assert made and made[0].closed  # cleaned up, however the loop ended


def test_itstime():
  assert [s for s in range(1, 11) if loop.itstime(s, 3, 10)] == [3, 6, 9]
  assert [s for s in range(1, 10) if loop.itstime(s, 3, 9)] == [3, 6]  # the end does the last
  assert not any(loop.itstime(s, every, 10) for s in range(1, 11) for every in (0, -1))


def test_preempted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
  """Saves at the interval and at the preemption, then Preempted naming the step; the rerun
  starts at the saved step and ends with the same state, checkpoints and losses."""
  whole, _ = train(tmp_path / "whole")
  with monkeypatch.context() as patch:
    patch.setattr(preemption.Preemption, "reached", lambda self, mngr, step: step == 6)
    with pytest.raises(preemption.Preempted, match="saved step 6 to .*split/checkpoints/6"):
      train(tmp_path / "split")
  assert max(metrics.read(tmp_path / "split")) == 6  # the last step is logged before its save
  split, batches = train(tmp_path / "split")
  np.testing.assert_array_equal(whole["w"], split["w"])
  steps = lambda run: checkpoint.manager(tmp_path / run, CKPT).all_steps()
  assert steps("whole") == [4, 8, 10] and steps("split") == [6, 8, 10]  # the last 3 kept
  losses = lambda run: {s: r["loss"] for s, r in metrics.read(tmp_path / run).items()}
  assert losses("whole") == losses("split") and sorted(losses("whole")) == list(range(1, 11))
  assert batches.step == 10


def test_a_diverged_step_is_not_saved(tmp_path):
  """A NaN loss at step 8, a save step, stops the run before step 8 is saved, naming the step
  and the last good checkpoint (4)."""
  with pytest.raises(FloatingPointError, match=(
      r"The toy loss is nan at step 8: training diverged. The last good checkpoint is "
      r".*/checkpoints/4 \(step 4\)")):
    train(tmp_path, nan_at=8)
  assert checkpoint.manager(tmp_path, CKPT).all_steps() == [4]


def test_a_failed_save_stops_the_run_at_the_next_step(tmp_path):
  """A save that fails (a file-size limit fails the write like a full disk) stops the run as
  soon as it has ended, at the latest when the next save starts: one line naming the directory
  and the fix."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Else the signal kills the test.
  resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # The state takes 256 KB.
  try:
    with pytest.raises(checkpoint.CheckpointError) as e:
      train(tmp_path, size=64 * 1024)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)
  message = str(e.value)
  assert message.startswith(f"Saving a checkpoint in {tmp_path}/checkpoints failed (")
  assert "File too large" in message and "\n" not in message
  # Toy steps take microseconds: the save of step 4 may end only when step 8's save waits for it.
  assert 4 <= max(metrics.read(tmp_path)) <= 8
  assert checkpoint.manager(tmp_path, CKPT).all_steps() == []


def test_evaluators_at_their_cadence_and_at_the_end(tmp_path):
  """every > 0: at its multiples and at the end; 0: at the end; < 0: never; a run resumed with
  nothing left to train evaluates once more, at its step."""
  seen = {}

  def evaluator(name, every):
    def run(state):
      seen.setdefault(name, []).append(float(state["w"][0]))
      return [(f"{name}_value", float(state["w"][0]))]
    return loop.Evaluator(name, every, run)

  evaluators = [evaluator("three", 3), evaluator("end", 0), evaluator("never", -1)]
  train(tmp_path, num_steps=7, evaluators=evaluators)
  records = metrics.read(tmp_path)
  assert [s for s in sorted(records) if "three_value" in records[s]] == [3, 6, 7]
  assert [s for s in sorted(records) if "end_value" in records[s]] == [7]
  assert "never" not in seen and len(seen["three"]) == 3 and len(seen["end"]) == 1
  train(tmp_path, num_steps=7, evaluators=evaluators)
  assert len(seen["three"]) == 4 and len(seen["end"]) == 2
