"""SIGTERM and Ctrl-C (preemption.py): a flag from the moment the command line starts, acted on
at safe points; a second Ctrl-C stops at once; the command line's exit statuses and single
line when a signal comes before the first step."""
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from sce_jax import checkpoint, exits, preemption
from tests.conftest import make_cifar_archive

CFG = ml_collections.ConfigDict(dict(every_steps=2, keep=2))
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sigterm_sets_the_flag(tmp_path):
  mngr = checkpoint.manager(tmp_path, CFG)
  signals = preemption.Preemption(1)
  try:
    assert not signals.reached(mngr, 1)
    preemption.check()
    os.kill(os.getpid(), signal.SIGTERM)
    assert signals.reached(mngr, 2)
    with pytest.raises(preemption.Stopped) as e:  # Had it come before the first step.
      preemption.check()
    assert e.value.signum == signal.SIGTERM and str(e.value) == (
        "Preempted (SIGTERM) before the first step: stopped at once, nothing new was saved; "
        "rerun the same command to start again.")
  finally:
    signals.close()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  preemption.check()  # Forgotten with the handlers.


def test_sigint_saves_then_a_second_stops_at_once(tmp_path):
  """A first Ctrl-C asks for a save; the handler then steps aside, so that a second one ends the
  process at once (here a child process, killed by SIGINT)."""
  mngr = checkpoint.manager(tmp_path, CFG)
  signals = preemption.Preemption(1)
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert signals.reached(mngr, 1)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    assert str(signals.stop(1, checkpoint.step_dir(mngr, 1))) == (
        f"Interrupted (Ctrl-C): saved step 1 to {tmp_path}/checkpoints/1; rerun the same "
        "command to resume from it.")
  finally:
    signals.close()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  script = ("import os, signal, time\nfrom sce_jax import preemption\n"
            "p = preemption.Preemption(1)\nos.kill(os.getpid(), signal.SIGINT)\n"
            "assert p.reached(None, 1)\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)\n")
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert out.returncode == -signal.SIGINT, out.stderr[-2000:]


# --- The command line, started on CIFAR-10's Python archive (README's offline command), signalled
# before its first step.


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
  path = tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz"
  make_cifar_archive(path, {"train": 4, "test": 1})
  return path


def _start(archive, workdir):
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": str(ROOT)}
  return subprocess.Popen(
      [sys.executable, "-m", "sce_jax.main", "--config=configs/cifar10_r18.py:smoke",
       f"--config.data.path={archive}", f"--config.data.cache_dir={workdir.parent / 'cache'}",
       f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc, what):
  deadline = time.time() + 120
  while not condition():
    assert proc.poll() is None, f"ended before {what}: {proc.stderr.read()[-3000:]}"
    assert time.time() < deadline, f"no {what} in time"
    time.sleep(0.005)


def _catches_sigterm(pid) -> bool:
  """Whether the process has a handler of SIGTERM (its SigCgt mask in /proc): Python installs
  none of its own, preemption.install does, first thing in sce_jax/main.py, before JAX is
  imported."""
  try:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
  except OSError:
    return False
  mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
  return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


@pytest.mark.slow  # end to end, 10-20 s each
@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("moment, signum, status", [
    ("import", signal.SIGINT, exits.INTERRUPTED),
    ("lock", signal.SIGINT, exits.INTERRUPTED),
    ("lock", signal.SIGTERM, exits.PREEMPTED)])
def test_signal_before_the_first_step(archive, tmp_path, moment, signum, status):
  """A Ctrl-C or SIGTERM while the command line imports JAX, or once it holds the workdir's lock
  (data opened, the network being built and compiled): the run stops at the next stage's end
  with one line and the lock released, never a traceback, a segmentation fault, or a run that
  trains on."""
  workdir = tmp_path / "work"
  proc = _start(archive, workdir)
  if moment == "import":
    _wait_for(lambda: _catches_sigterm(proc.pid), proc, "signal handler")
  else:
    _wait_for((workdir / "lock.json").exists, proc, "lock")
  proc.send_signal(signum)
  _, stderr = proc.communicate(timeout=120)
  lines = [line.split("] ", 1)[-1] for line in stderr.splitlines()]
  assert proc.returncode == status, stderr[-3000:]
  assert lines[-1] == str(preemption.Stopped(signum)), stderr[-3000:]
  assert not any(word in stderr for word in ("Traceback", "Exception ignored", "KeyboardInterr"))
  start_up = ("data.labels=auto", "Decoded the 'train' split", "sce pretraining", "Parameters: ")
  assert all(line.startswith(start_up) for line in lines[:-1]), stderr  # And nothing else.
  assert not (workdir / "lock.json").exists()
  assert not list((workdir / "checkpoints").glob("*")) if moment == "lock" else (
      not workdir.exists())


def test_chaos_schedule_kills_during_saves_and_after_checkpoints():
  """benchmarks/chaos.py's schedule, whatever the seed: a kill during a save from 1 kill on,
  a training kill (which waits for a checkpoint) from 2, every moment from 3; the default seed
  and --kills 3 once drew three start-up kills, testing no resume from a checkpoint."""
  chaos = pytest.importorskip("benchmarks.chaos")
  for seed in range(20):
    for kills in range(1, 8):
      plan = chaos.schedule(kills, random.Random(seed))
      moments = [moment for moment, _, _ in plan]
      assert len(plan) == kills and moments[0] == "save"
      assert kills < 2 or "training" in moments
      assert kills < 3 or set(moments) == set(chaos.ORDER)
      assert all(name in chaos.SIGNALS and 0 <= fraction < 1 for _, name, fraction in plan)
