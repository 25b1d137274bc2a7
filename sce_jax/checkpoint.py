"""Checkpoints of the TrainState: orbax CheckpointManager, one item 'state' (issue 4).

Layout: <workdir>/checkpoints/<step>/state (sce_jax.convert reads the same). Saves are
asynchronous and atomic: orbax writes into a temporary directory and renames it when complete,
so a step directory that exists is whole, and a run killed mid-save leaves the previous one as
the latest. Preemption (SIGTERM) is handled by the training loop through `Preemption`.
"""
import signal

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored; the message names the directory."""


def directory(workdir) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


def manager(workdir, ckpt_cfg) -> ocp.CheckpointManager:
  """Saves at multiples of ckpt_cfg.every_steps, at a preemption and when forced; keeps the
  last ckpt_cfg.keep. (No save of the first step, which orbax's default policy adds.)"""
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_cfg.keep, create=True, enable_async_checkpointing=True,
      save_decision_policy=policies.AnySavePolicy([
          policies.FixedIntervalPolicy(ckpt_cfg.every_steps),
          policies.PreemptionCheckpointingPolicy()]))
  return ocp.CheckpointManager(directory(workdir), item_names=("state",), options=options)


def save(mngr, step, state):
  """Starts an asynchronous save of `state` at `step`; the caller decides when
  (mngr.should_save, preemption, the last step)."""
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)


def restore(mngr, abstract_state):
  """The latest checkpoint restored into the shardings of `abstract_state`, or None if none.

  abstract_state: jax.ShapeDtypeStruct leaves with shardings, e.g. jax.eval_shape(parts.init,
  rng). An unreadable latest checkpoint is an error naming the directory to delete: resuming
  silently from an older one would then collide with the bad step's directory at a later save.
  """
  step = mngr.latest_step()
  if step is None:
    return None
  try:
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  except Exception as e:  # orbax raises many types (ValueError, OSError, tensorstore errors).
    older = [s for s in mngr.all_steps() if s < step]
    fallback = (f"delete it to resume from step {max(older)}" if older
                else "delete it (or the whole workdir) to start afresh")
    raise CheckpointError(
        f"The latest checkpoint, {directory_of(mngr, step)}, cannot be restored; {fallback}. "
        f"Cause: {type(e).__name__}: {e}") from e
  logging.info("Restored the checkpoint of step %d from %s.", step, directory_of(mngr, step))
  return restored.state


def directory_of(mngr, step) -> epath.Path:
  return mngr.directory / str(step)


class Preemption:
  """Whether the run should save and stop at this step boundary (TPU preemption, SIGTERM).

  One process: a SIGTERM handler sets a flag. Several processes: JAX's preemption service
  (started by jax.distributed.initialize; it catches SIGTERM itself) agrees on one step at
  which every process stops, which orbax reads in `reached_preemption`.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._request)

  def _request(self, signum, frame):
    del frame
    logging.warning("Signal %d: saving a checkpoint at the next step, then stopping.", signum)
    self.requested = True

  def reached(self, mngr, step) -> bool:
    return self.requested or mngr.reached_preemption(step)

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
