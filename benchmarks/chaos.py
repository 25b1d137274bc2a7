"""A soak of the command line's stop and resume: kills at random moments, restarts, equality.

A CPU run of the smoke config (a tiny network; --epochs over a generated CIFAR-10 Python archive
of 200 training images, 6 steps an epoch, a checkpoint every 8 steps) is killed --kills times,
each at a moment and with a signal drawn by a seeded schedule, and started again each time with
the same command, as a job scheduler would, until it finishes. Moments: during the start-up
(imports, data, compilation: a random time before the first step), during training (a random
time after a step), and during a save (as soon as orbax's temporary step directory appears).
Signals: SIGTERM (a preemption), SIGINT (Ctrl-C), two SIGINTs 0.2 s apart, SIGKILL. Then the
final state is compared array by array with that of one uninterrupted run.

The moments are taken in turn (`schedule`): whatever the seed, one kill is during a save, two
also kill training after a checkpoint, three also the start-up.

Written to --json: every kill (moment, signal, seconds after the start, exit status, the latest
checkpoint after it, the one the run resumed from), `resumed_from_checkpoint` (how many runs
started from a checkpoint), `bitwise_equal` (the final states are), `unattended` (every exit
status is the one its signal should give, none an error, a crash or a hang, and the last run
finished: no restart needed a human), `goodput` of the uninterrupted run and of the killed one,
with the seconds of each part (sce_jax/goodput.py: the last totals in each metrics.jsonl). Not a
timed test; tests/ holds the quick checks.

  python benchmarks/chaos.py --kills 10 --json chaos.json
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# pylint: disable=g-import-not-at-top,wrong-import-position
from sce_jax import checkpoint, exits, logs  # noqa: E402
from tests.conftest import make_cifar_archive  # noqa: E402

SIGNALS = ("SIGTERM", "SIGINT", "SIGINT x2", "SIGKILL")
# The exit statuses each signal may give (exits.py; negative: killed by that signal): SIGINT
# before the first step stops at once (130), after it saves and stops (75); a second Ctrl-C
# finds SIGINT's default action (-2), unless the run had already stopped after the first.
EXPECTED = {"SIGTERM": {exits.PREEMPTED},
            "SIGINT": {exits.PREEMPTED, exits.INTERRUPTED},
            "SIGINT x2": {exits.PREEMPTED, exits.INTERRUPTED, -signal.SIGINT},
            "SIGKILL": {-signal.SIGKILL}}
EXIT_TIMEOUT_S = 600  # after the signal: a run stopping at a safe point waits for a compile


def command(archive, workdir, epochs):
  return [sys.executable, "-m", "sce_jax.main", "--config=configs/cifar10_r18.py:smoke",
          f"--config.data.path={archive}", f"--config.data.cache_dir={archive.parent / 'cache'}",
          f"--config.epochs={epochs}", "--config.max_steps=-1", f"--workdir={workdir}"]


def environment():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def latest_step(workdir):
  steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
  return max(steps, default=None)


def logged_steps(workdir) -> int:
  path = workdir / "metrics.jsonl"
  return len(path.read_text().splitlines()) if path.exists() else 0


def saves(workdir) -> set:
  """The saves under way: orbax's temporary step directories, by name and time of creation."""
  folder = workdir / "checkpoints"
  try:
    return {(p.name, p.stat().st_mtime_ns) for p in folder.iterdir()
            if ".orbax-checkpoint-tmp" in p.name}
  except OSError:  # No folder yet, or a directory renamed while it was listed.
    return set()


class Launch:
  """One start of the command, its stderr in a file."""

  def __init__(self, cmd, log_path):
    self.log_path, self.start = log_path, time.monotonic()
    with open(log_path, "w") as log:
      self.proc = subprocess.Popen(cmd, cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL,
                                   stderr=log)

  def elapsed(self):
    return time.monotonic() - self.start

  def wait_for(self, condition, timeout) -> bool:
    """Whether `condition()` held before the process ended (or `timeout` passed)."""
    deadline = time.monotonic() + timeout
    while self.proc.poll() is None and time.monotonic() < deadline:
      if condition():
        return True
      time.sleep(0.002)
    return False

  def finish(self, timeout):
    """(exit status, whether it hung): SIGKILL after `timeout`."""
    try:
      return self.proc.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
      self.proc.kill()
      return self.proc.wait(), True

  def last_line(self):
    lines = self.log_path.read_text().strip().splitlines()
    return lines[-1].split("] ", 1)[-1] if lines else ""


def uninterrupted(cmd, log_dir):
  """The reference run; (seconds, seconds from its start to its first logged step)."""
  workdir = pathlib.Path(cmd[-1].split("=", 1)[1])
  launch = Launch(cmd, log_dir / "reference.log")
  launch.wait_for(lambda: logged_steps(workdir) > 0, EXIT_TIMEOUT_S)
  first_step = launch.elapsed()
  status, hung = launch.finish(3600)
  if status != 0 or hung:
    sys.exit(f"the uninterrupted run failed ({status}): {launch.last_line()}")
  return launch.elapsed(), first_step


# The moments in the order a schedule takes them: whatever the seed, one kill is during a save,
# two also kill a training run that holds a checkpoint, three also one during the start-up.
ORDER = ("save", "training", "start-up")


def schedule(kills, rng):
  """[(moment, signal, fraction)] of `kills` kills: the moments in turn (`ORDER`), so that
  every moment is tested once there are 3 kills; the signals and times drawn from `rng`."""
  return [(ORDER[i % len(ORDER)], rng.choice(SIGNALS), rng.random()) for i in range(kills)]


def soak(cmd, log_dir, kills, rng, start_up_s):
  """Kills and restarts until `kills` kills are done and a last run finishes; the records.
  A training kill waits for a checkpoint to exist and a step after it, so that the restart
  resumes from one; `resumed_from` records the checkpoint each run started from."""
  workdir = pathlib.Path(cmd[-1].split("=", 1)[1])
  records, plan = [], schedule(kills, rng)
  while True:
    resumed_from = latest_step(workdir)
    launch = Launch(cmd, log_dir / f"run{len(records):03d}.log")
    if len(records) == kills:
      status, hung = launch.finish(3600)
      records.append(dict(moment="none", signal="none", status=status, hung=hung,
                          expected=status == 0 and not hung, latest_step=latest_step(workdir),
                          resumed_from=resumed_from, seconds=round(launch.elapsed(), 2),
                          last_line=launch.last_line()))
      return records
    moment, name, fraction = plan[len(records)]
    before = logged_steps(workdir)
    if moment == "start-up":  # Or the first step, if that comes first.
      reached = launch.wait_for(lambda: launch.elapsed() > fraction * start_up_s or
                                logged_steps(workdir) > before, EXIT_TIMEOUT_S)
    elif moment == "training":  # After a step that follows a checkpoint.
      reached = launch.wait_for(lambda: latest_step(workdir) is not None, EXIT_TIMEOUT_S)
      saved = logged_steps(workdir)
      reached = reached and launch.wait_for(lambda: logged_steps(workdir) > saved,
                                            EXIT_TIMEOUT_S)
      time.sleep(3 * fraction)
    else:
      stale = saves(workdir)  # Left by a run killed while it saved.
      reached = launch.wait_for(lambda: saves(workdir) - stale, EXIT_TIMEOUT_S)
    reached = reached and launch.proc.poll() is None
    at = launch.elapsed()
    if reached:
      launch.proc.send_signal(getattr(signal, name.split()[0]))
      if name == "SIGINT x2":
        time.sleep(0.2)
        if launch.proc.poll() is None:
          launch.proc.send_signal(signal.SIGINT)
    status, hung = launch.finish(EXIT_TIMEOUT_S)
    records.append(dict(
        moment=moment, signal=name if reached else "none (ended first)", status=status,
        hung=hung, expected=(status in EXPECTED[name] if reached else status == 0) and not hung,
        latest_step=latest_step(workdir), resumed_from=resumed_from, seconds=round(at, 2),
        last_line=launch.last_line()))
    print(f"kill {len(records):3d}: {moment:9s} {records[-1]['signal']:18s} at {at:6.1f} s -> "
          f"exit {status:4d}, latest checkpoint {records[-1]['latest_step']}", flush=True)
    if not reached and status == 0:
      return records  # Finished before the kill could land.


def goodput(workdir):
  """The run's last goodput totals (goodput.py) from its metrics.jsonl."""
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return next(r for r in map(json.loads, reversed(lines)) if "goodput" in r)


def same_state(a, b):
  """Whether the latest checkpoints of workdirs a and b hold bitwise the same arrays."""
  read = lambda w: checkpoint.read_numpy(w, lambda metadata: metadata)
  x, y = read(a), read(b)
  leaves_x, tree_x = jax.tree.flatten(x)
  leaves_y, tree_y = jax.tree.flatten(y)
  return tree_x == tree_y and all(
      p.dtype == q.dtype and p.shape == q.shape and np.array_equal(p, q, equal_nan=True)
      for p, q in zip(map(np.asarray, leaves_x), map(np.asarray, leaves_y)))


def main_():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=10)
  parser.add_argument("--epochs", type=int, default=50, help="6 steps each (300 by default)")
  parser.add_argument("--seed", type=int, default=0, help="of the kill schedule")
  parser.add_argument("--json", help="write the results here")
  parser.add_argument("--dir", help="keep the workdirs and logs here (default: a temporary "
                      "folder, deleted)")
  args = parser.parse_args()
  logs.quiet()  # orbax's warnings as the final states are read
  root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="sce_chaos_"))
  log_dir = root / "logs"
  log_dir.mkdir(parents=True, exist_ok=True)
  archive = root / "cifar-10-python.tar.gz"
  if not archive.exists():
    make_cifar_archive(archive, {"train": 20, "test": 1})
  for name in ("reference", "chaos"):
    shutil.rmtree(root / name, ignore_errors=True)
  started = time.monotonic()
  reference_s, start_up_s = uninterrupted(command(archive, root / "reference", args.epochs),
                                          log_dir)
  print(f"uninterrupted: {reference_s:.0f} s, first step after {start_up_s:.0f} s", flush=True)
  records = soak(command(archive, root / "chaos", args.epochs), log_dir, args.kills,
                 random.Random(args.seed), start_up_s)
  equal = same_state(root / "reference", root / "chaos")
  result = dict(
      date=datetime.date.today().isoformat(), machine=f"{platform.node()}: {os.cpu_count()} "
      f"CPUs, {platform.processor() or platform.machine()}", command=" ".join(sys.argv),
      steps=latest_step(root / "reference"), seed=args.seed,
      kills=sum(r["signal"] not in ("none", "none (ended first)") for r in records),
      restarts=len(records) - 1,
      resumed_from_checkpoint=sum(r["resumed_from"] is not None for r in records),
      runs=records, bitwise_equal=equal,
      unattended=all(r["expected"] for r in records) and records[-1]["status"] == 0,
      reference_seconds=round(reference_s, 1),
      goodput={name: goodput(root / name) for name in ("reference", "chaos")},
      total_seconds=round(time.monotonic() - started, 1))
  print("\n| # | moment | signal | at (s) | exit | latest checkpoint |\n|---|---|---|---|---|---|")
  for i, r in enumerate(records):
    print(f"| {i} | {r['moment']} | {r['signal']} | {r['seconds']} | {r['status']} | "
          f"{r['latest_step']} |")
  print(f"\nbitwise_equal: {equal}; unattended: {result['unattended']}; "
        f"{result['kills']} kills, {result['restarts']} restarts "
        f"({result['resumed_from_checkpoint']} from a checkpoint), {result['total_seconds']} s")
  for name, g in result["goodput"].items():
    print(f"goodput, {name}: {g['goodput']:.1%} of {g['wall_s']:.0f} s (" + ", ".join(
        f"{k[:-2]} {v:.1f} s" for k, v in g.items() if k.endswith("_s") and k != "wall_s") +
          ")")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
  if not args.dir:
    shutil.rmtree(root, ignore_errors=True)
  return 0 if equal and result["unattended"] else 1


if __name__ == "__main__":
  sys.exit(main_())
