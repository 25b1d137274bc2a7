"""Checkpoints of the TrainState: orbax CheckpointManager, one item 'state'.

Layout: <workdir>/checkpoints/<step>/state (`checkpoints_dir`, `step_dir`, `find_state`);
`read_numpy` reads it back without a model (for evaluation and weight conversion). Each step's
metadata also holds a checksum of every array, verified when the step is restored, and no state
with a NaN or inf is ever saved. Saves are asynchronous and atomic: orbax writes into a temporary
directory and renames it when complete, so a step directory that exists is whole, and a run killed
mid-save leaves the previous one as the latest. A failed save is reported at once: one that cannot
start (a read-only or missing directory) by `save` itself, since orbax creates the step's directory
before it returns; one that fails while writing (a full disk) by `check` as soon as it is known.
Preemption (SIGTERM) and Ctrl-C are preemption.py's.
"""
import contextlib
import hashlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from sce_jax import logs, sharding
from sce_jax import workdir as workdir_lib

ITEM = "state"
DIRECTORY = "checkpoints"  # under the workdir; one subdirectory per saved step
CHECKSUMS = "sce_jax_checksums"  # key of each step's custom metadata: {array name: hex digest}


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be saved or restored; the message names the directory and the
  fix."""


def checkpoints_dir(workdir) -> epath.Path:
  """<workdir>/checkpoints, the manager's directory."""
  return epath.Path(workdir) / DIRECTORY


def manager(workdir, ckpt_cfg) -> ocp.CheckpointManager:
  """Saves at multiples of ckpt_cfg.every_steps, at a preemption and when forced; keeps the
  last ckpt_cfg.keep. (No save of the first step, which orbax's default policy adds.) The
  step's directory is made before `save` returns: made in the background (orbax's default), a
  failure there leaves orbax's threads waiting 300 s for it at exit."""
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_cfg.keep, create=True, enable_async_checkpointing=True,
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
      save_decision_policy=policies.AnySavePolicy([
          policies.FixedIntervalPolicy(ckpt_cfg.every_steps),
          policies.PreemptionCheckpointingPolicy()]))
  # The handler named up front lets a fresh manager read a step's array metadata.
  return ocp.CheckpointManager(checkpoints_dir(workdir), options=options,
                               item_handlers={ITEM: ocp.StandardCheckpointHandler()})


def _names(tree) -> list[str]:
  """'params/trunk/conv1/kernel', ... of the leaves of `tree`, in jax.tree.leaves order."""
  return [jax.tree_util.keystr(path, simple=True, separator="/")
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _plain(x):
  """A PRNG key array as its key data (what orbax saves); other arrays as they are."""
  return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


@jax.jit
def _finite(state):
  """Per leaf of `state`, whether all its values are finite: one reduction on the device."""
  return jnp.stack([jnp.all(jnp.isfinite(x)) if jax.dtypes.issubdtype(x.dtype, jnp.inexact)
                    else jnp.array(True) for x in jax.tree.leaves(state)])


def _whole(x):
  """A jax array's whole value on the host: a device's copy where it is replicated, else its
  shards gathered (sharding.params='fsdp'; from every process where it spans several)."""
  if not isinstance(x, jax.Array):
    return x
  return x.addressable_data(0) if x.sharding.is_fully_replicated else sharding.to_host(x)


def checksums(tree) -> dict[str, str]:
  """{array name: SHA-256 of its bytes (16 hex digits)} of a tree of jax arrays (of any
  sharding: the whole array's) or of host arrays, computed on the host: 0.3 s on one CPU core
  for a ResNet-50 ImageNet state (742 arrays, 122M values, 490 MB), after the device-to-host
  copy."""
  host = (np.ascontiguousarray(_whole(x)) for x in map(_plain, jax.tree.leaves(tree)))
  return {name: hashlib.sha256(x).hexdigest()[:16] for name, x in zip(_names(tree), host)}


def last_saved(mngr) -> str:
  """The latest complete checkpoint, for messages."""
  step = mngr.latest_step()
  return (f"{step_dir(mngr, step)} (step {step})" if step is not None
          else "none (no checkpoint was saved)")


def diverged(mngr, what) -> str:
  """The message of a run that stops because `what` is not finite."""
  return (f"{what}: training diverged. The last good checkpoint is {last_saved(mngr)}; a "
          "restart resumes from it. Lower optim.base_lr or check the data.")


@contextlib.contextmanager
def _save_errors(mngr):
  try:
    yield
  except Exception as e:  # orbax and TensorStore raise many types (ValueError, OSError).
    raise CheckpointError(
        f"Saving a checkpoint in {mngr.directory} failed ({logs.brief(e)}). The last complete "
        f"checkpoint is {last_saved(mngr)}; free space on that disk (or fix its permissions "
        "or quota) and rerun to resume from it.") from e


def save(mngr, step, state):
  """Starts an asynchronous save of `state` at `step`, with its checksums; logs one line. The
  caller decides when (mngr.should_save, preemption, the last step).

  Raises FloatingPointError, saving nothing, if any value of the state is NaN or inf (the loss
  can be finite while, say, the target's weights are not), and CheckpointError if the save
  cannot start, or the previous one failed.
  """
  finite = np.asarray(_whole(_finite(state)))
  bad = [name for name, ok in zip(_names(state), finite) if not ok]
  if bad:
    raise FloatingPointError(diverged(
        mngr, f"The state at step {step} holds NaN or inf in {len(bad)} arrays ({bad[0]}, ...) "
        "and is not saved"))
  with _save_errors(mngr):
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True,
              custom_metadata={CHECKSUMS: checksums(state)})
  logging.info("Saving step %d to %s.", step, step_dir(mngr, step))


def check(mngr):
  """Raises CheckpointError as soon as an asynchronous save has failed (a full disk, a quota);
  never waits for a save in progress. Cheap (a thread's state): the loops call it after every
  step, so a failed save stops the run at the first step after it ended."""
  if not mngr.is_saving_in_progress():
    wait(mngr)


def wait(mngr):
  """Waits for the save in progress; CheckpointError if it failed."""
  with _save_errors(mngr):
    mngr.wait_until_finished()


def _bad_latest(mngr, step, problem) -> CheckpointError:
  older = [s for s in mngr.all_steps() if s < step]
  fallback = (f"delete it to resume from step {max(older)}" if older
              else "delete it (or the whole workdir) to start afresh")
  return CheckpointError(f"The latest checkpoint, {step_dir(mngr, step)}, {problem}; "
                         f"{fallback}.")


def _check_shapes(mngr, step, abstract_state):
  """CheckpointError if the arrays saved at `step` are not those of `abstract_state` (another
  width, trunk or queue size): a config mismatch, not a corrupt checkpoint."""
  try:
    saved = mngr.item_metadata(step)[ITEM]
    saved = getattr(saved, "tree", saved)
    saved = dict(zip(_names(saved), (tuple(m.shape) for m in jax.tree.leaves(saved))))
  except Exception as e:  # orbax raises many types (ValueError, OSError, tensorstore errors).
    raise _bad_latest(mngr, step, f"cannot be restored ({logs.brief(e)})") from e
  plain = jax.eval_shape(lambda t: jax.tree.map(_plain, t), abstract_state)
  wanted = dict(zip(_names(plain), (tuple(x.shape) for x in jax.tree.leaves(plain))))
  differ = [f"{n} is {saved.get(n, 'absent')} there, {wanted.get(n, 'absent')} here"
            for n in sorted(set(saved) | set(wanted)) if saved.get(n) != wanted.get(n)]
  if differ:
    raise CheckpointError(
        f"The latest checkpoint, {step_dir(mngr, step)}, was saved with another config: "
        f"{differ[0]} (and {len(differ) - 1} more arrays differ). Run with the config it was "
        f"saved with ({mngr.directory.parent / workdir_lib.CONFIG}), or use another --workdir; "
        "the checkpoint is fine, do not delete it.")


def restore(mngr, abstract_state):
  """The latest checkpoint restored into the shardings of `abstract_state` and verified against
  its checksums, or None if there is none.

  abstract_state: jax.ShapeDtypeStruct leaves with shardings, e.g. jax.eval_shape(parts.init,
  rng). Each CheckpointError names the step directory and the fix: a checkpoint of another
  config is reported as such before anything is read; an unreadable or corrupt latest step is
  to be deleted, because resuming silently from an older one would then collide with the bad
  step's directory at a later save.
  """
  step = mngr.latest_step()
  if step is None:
    return None
  _check_shapes(mngr, step, abstract_state)
  try:
    state = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state
  except Exception as e:  # orbax raises many types (ValueError, OSError, tensorstore errors).
    raise _bad_latest(mngr, step, f"cannot be restored ({logs.brief(e)})") from e
  where = step_dir(mngr, step)
  stored = (mngr.metadata(step).custom_metadata or {}).get(CHECKSUMS)
  if stored is None:
    logging.warning("%s holds no checksums (saved by an older sce_jax): restored unverified.",
                    where)
  else:
    actual = checksums(state)
    bad = [name for name in actual if stored.get(name) != actual[name]]
    if bad:
      raise _bad_latest(mngr, step, f"is corrupt: {len(bad)} of its arrays ({bad[0]}, ...) "
                        "differ from the checksums stored when it was saved")
  logging.info("Restored step %d from %s%s.", step, where,
               "" if stored is None else " (checksums verified)")
  return state


def step_dir(mngr, step) -> epath.Path:
  """The directory of `mngr`'s saved step `step`."""
  return mngr.directory / str(step)


def find_state(path) -> pathlib.Path:
  """The saved state's (orbax item's) directory under a workdir, a checkpoints dir (its latest
  step), a step dir, or that directory itself; ValueError if there is none."""
  path = pathlib.Path(path)
  if (path / DIRECTORY).is_dir():
    path = path / DIRECTORY
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
  item = find_state(path)
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(item)
  wanted = select(getattr(metadata, "item_metadata", metadata))
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  return checkpointer.restore(item, args=ocp.args.PyTreeRestore(
      item=wanted, restore_args=args, partial_restore=True))
