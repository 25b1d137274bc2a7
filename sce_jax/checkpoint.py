"""Checkpoints of the TrainState: orbax CheckpointManager, one item 'state'.

Layout: <workdir>/checkpoints/<step>/state; `read_numpy` reads it back without a model (for
evaluation and weight conversion). Saves are asynchronous and atomic: orbax writes into a
temporary directory and renames it when complete, so a step directory that exists is whole,
and a run killed mid-save leaves the previous one as the latest. Preemption (SIGTERM) is
handled by the training loop through `Preemption`.
"""
import pathlib
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

ITEM = "state"


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
  return ocp.CheckpointManager(directory(workdir), item_names=(ITEM,), options=options)


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


def item_directory(path) -> pathlib.Path:
  """The saved state under a workdir, a checkpoints dir (its latest step), a step dir, or the
  item dir itself."""
  path = pathlib.Path(path)
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if (path / ITEM).is_dir():
    return path / ITEM
  if (path / "_METADATA").exists():
    return path
  mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step()
  mngr.close()
  if step is None or not (path / str(step) / ITEM).is_dir():
    raise ValueError(f"No sce_jax checkpoint found in {path} (expected <workdir>/checkpoints/"
                     f"<step>/{ITEM}, a step directory, or an orbax item directory).")
  return path / str(step) / ITEM


def read_numpy(path, select):
  """Part of a saved TrainState as NumPy arrays, without building a model.

  select(metadata) -> the subtree of the saved tree's metadata to read (e.g. the weights
  without the optimiser state and the queue); what it leaves out is not read.
  """
  item = item_directory(path)
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(item)
  wanted = select(getattr(metadata, "item_metadata", metadata))
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  return checkpointer.restore(item, args=ocp.args.PyTreeRestore(
      item=wanted, restore_args=args, partial_restore=True))


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
