"""A run's own files in its workdir, beside checkpoints/ (checkpoint.py) and metrics.jsonl
(metrics.py): the lock held while a run trains or evaluates there, and the config it was
started with.

Two runs on one workdir would delete each other's checkpoints and interleave their metrics: the
lock (`lock.json`: host, process id, SLURM job) makes the second one stop with an error naming
the first. A lock left by a run that died without releasing it is taken over when its process
is gone from this host, or when it is this SLURM job's own earlier run (requeued); one held on
another host is refused, since that host cannot be asked, and the error says which file to
delete if that run is over.
"""
import contextlib
import json
import os
import socket
import time

import flax.traverse_util
import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

LOCK = "lock.json"
CONFIG = "config.json"


class WorkdirError(RuntimeError):
  """A workdir another run is training in; the message names that run."""


def _me() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _create(path, text) -> bool:
  """Writes a new file; False if it exists. Atomic (O_EXCL) on a file system; on a bucket (no
  such primitive) it checks first, which only two runs started within a second can defeat."""
  if "://" in str(path):
    if path.exists():
      return False
    path.write_text(text)
    return True
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(text)
  return True


def _gone(holder) -> bool:
  """Whether the run that wrote `holder` has certainly stopped: its process is gone from this
  host, or it ran on another host as an earlier run of this SLURM job (requeued)."""
  me = _me()
  if holder.get("host") != me["host"]:
    return bool(holder.get("slurm_job")) and holder["slurm_job"] == me["slurm_job"]
  try:
    os.kill(holder["pid"], 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # Alive, another user's.
    return False
  return False


def _acquire(path):
  """None once this process holds the lock at `path`, else the reason it cannot."""
  for _ in range(2):  # A stale lock is removed once, then created again atomically.
    if _create(path, json.dumps(_me())):
      return None
    try:
      holder = json.loads(path.read_text())
    except (OSError, ValueError):
      holder = {}  # Gone meanwhile, or written by a run killed before it finished the write.
    if holder and not _gone(holder):
      return (f"{path.parent} is in use by process {holder.get('pid')} on "
              f"{holder.get('host')} (since {holder.get('since')}); stop that run or pass "
              f"another --workdir. If it is no longer running, delete {path}.")
    logging.warning("Taking over %s from process %s on %s, which is no longer running.", path,
                    holder.get("pid"), holder.get("host"))
    path.unlink(missing_ok=True)
  return f"{path} keeps being created by another run; pass another --workdir."


@contextlib.contextmanager
def lock(workdir, mode="train"):
  """Holds <workdir>/lock.json (pretraining) or lock_<mode>.json (an evaluation, which writes
  its own files: two of one mode collide, an evaluation beside the pretraining does not) while
  the block runs (process 0 takes it for all processes); WorkdirError if another run holds
  it."""
  path = epath.Path(workdir) / (LOCK if mode == "train" else f"lock_{mode}.json")
  error = None
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    error = _acquire(path)
  if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(
      np.int32(error is not None)):
    error = error or f"process 0 could not lock {path}; its log says why."
  if error:
    raise WorkdirError(error)
  try:
    yield
  finally:
    if jax.process_index() == 0:
      with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text())["pid"] == os.getpid():  # Not taken over meanwhile.
          path.unlink()


def record_config(workdir, config, resumed):
  """Writes the run's config to <workdir>/config.json when it starts afresh; when it resumes a
  checkpoint, warns (one line) about the values that differ from that file: the run goes on
  with the new ones. data.arrays (in-memory images, set by code) is not a setting and is left
  out."""
  if jax.process_index() > 0:
    return
  values = config.to_dict()
  values.get("data", {}).pop("arrays", None)
  values = json.loads(json.dumps(values))  # Tuples as lists, as they are read back.
  path = epath.Path(workdir) / CONFIG
  if not (resumed and path.exists()):
    path.write_text(json.dumps(values, indent=2) + "\n")
    return
  before, now = (flax.traverse_util.flatten_dict(v, sep=".")
                 for v in (json.loads(path.read_text()), values))
  changed = [f"{k} {before.get(k, '(absent)')} -> {now.get(k, '(absent)')}"
             for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
  if changed:
    logging.warning("The config differs from the one this workdir was started with (%s): "
                    "%s. The run goes on with the new values.", path, "; ".join(changed))
