"""Where a run's wall time goes: goodput, the productive fraction of it.

Parts (seconds): `productive` (training steps), `compile` (the first step of a process: its
compile, or its load from the persistent cache, and one step), `restore` (reading a
checkpoint), `data_wait` (the loop waiting for its next batch; with JAX's asynchronous
dispatch part of it may overlap the previous step on the accelerator, so it is an upper bound
of the accelerator's idle time), `evaluation`, `save` (starting a checkpoint; orbax writes it in
the background), `restart_lost` (steps run again after a restart: those after the restored
checkpoint that an earlier attempt had logged), `other` (the rest: start-up, imports, opening
the data, initialisation). Times of a run add up over its restarts (metrics.jsonl keeps each
attempt's last totals); the wall time of a killed attempt after its last log line is not known
and is not counted.
"""
import contextlib
import json
import time

from etils import epath

PARTS = ("productive", "compile", "restore", "data_wait", "evaluation", "save", "restart_lost")
_STARTED = [time.time()]  # when this module was imported: the process's start (main.py)


def _take_start():
  """The process's start for its first Clock, each later one's own creation (an evaluation
  after pretraining in the same process)."""
  now = time.time()
  return _STARTED.pop() if _STARTED else now


class Clock:
  """Seconds of each part of PARTS, from the start of the process and over earlier attempts
  of the run whose metrics.jsonl is `metrics_file` (their totals and their furthest step).
  Its names are unprefixed, as steps_per_sec: every loop.Run has its own metrics.jsonl."""

  def __init__(self, metrics_file=None):
    self.started = _take_start()
    self.seconds = dict.fromkeys(PARTS, 0.0)
    self.before = dict.fromkeys((*PARTS, "wall"), 0.0)
    self.logged = 0  # the furthest step an earlier attempt logged: later steps are new
    path = metrics_file and epath.Path(metrics_file)
    if path and path.exists():
      for record in map(json.loads, path.read_text().splitlines()):
        self.logged = max(self.logged, record["step"])
        if "wall_s" in record:
          self.before = {k: record[f"{k}_s"] for k in self.before}

  def add(self, part, seconds):
    self.seconds[part] += seconds

  @contextlib.contextmanager
  def timing(self, part):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.add(part, time.perf_counter() - start)

  def accounted(self):
    """Seconds of this process's parts so far."""
    return sum(self.seconds.values())

  def step_part(self, step):
    """Where the time of training step `step` goes: recomputed, or new."""
    return "restart_lost" if step <= self.logged else "productive"

  def totals(self):
    """{goodput, <part>_s for PARTS and 'other', wall_s}, over the run's attempts."""
    wall = self.before["wall"] + time.time() - self.started
    parts = {k: self.before[k] + self.seconds[k] for k in PARTS}
    parts["other"] = wall - sum(parts.values())
    return {"goodput": parts["productive"] / max(wall, 1e-9),
            **{f"{k}_s": v for k, v in parts.items()}, "wall_s": wall}

  def summary(self):
    t = self.totals()
    return (f"goodput {t['goodput']:.1%} of {t['wall_s']:.0f} s: " + ", ".join(
        f"{k} {t[f'{k}_s']:.1f} s" for k in (*PARTS, "other")))
