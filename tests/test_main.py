"""The training program: exact resume, divergence, a failed save, and the command line end to
end (Ctrl-C, exit codes, the workdir lock, what it prints)."""
import hashlib
import json
import logging
import math
import os
import pathlib
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time

import jax
import pytest

from sce_jax import checkpoint, exits, metrics, sharding, train
from sce_jax import workdir as workdir_lib
from tests.helpers import load_config

pytestmark = pytest.mark.slow  # end to end: a developer's inner loop skips them

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPARED = ("loss", "probe_loss", "pos_sim", "target_entropy", "grad_norm", "lr")


def smoke_config(cifar_root, max_steps=-1, knn_every_epochs=-1):
  """The smoke config on the 200-image slice: 6 steps an epoch, 12 in the schedules."""
  c = load_config("cifar10_r18", "smoke")
  c.data.path = str(cifar_root)
  c.max_steps = max_steps
  c.eval.knn.every_epochs = knn_every_epochs
  c.log_every_steps = 1
  c.checkpoint.every_steps = 8
  return c


@pytest.fixture(scope="module")
def mesh():
  """One device: the sharded runs are the command line's and test_multihost's."""
  return sharding.make_mesh(jax.devices()[:1])


def test_resume_is_exact_and_divergence_stops(cifar_root, tmp_path, mesh, caplog):
  """An uninterrupted run of 8 steps with kNN monitoring every epoch (6 steps) and at the end,
  and one stopped after 4 and resumed to 8 (crossing an epoch boundary at 6), log the same
  metrics step for step; the resumed run verifies the checksums and warns that max_steps
  changed. Then a diverging continuation stops at its first NaN loss, naming the step and the
  last checkpoint. (One test: the runs are the expensive part.)"""
  whole, split = tmp_path / "whole", tmp_path / "split"
  train.train(smoke_config(cifar_root, max_steps=8, knn_every_epochs=1), whole, mesh)
  train.train(smoke_config(cifar_root, max_steps=4), split, mesh)
  first = metrics.read(split)
  assert json.loads((split / workdir_lib.CONFIG).read_text())["max_steps"] == 4
  caplog.clear()
  caplog.set_level(logging.INFO)
  train.train(smoke_config(cifar_root, max_steps=8), split, mesh)
  assert f"Restored step 4 from {split}/checkpoints/4 (checksums verified)." in caplog.text
  assert "this workdir was started with" in caplog.text and "max_steps 4 -> 8." in caplog.text
  assert not (split / workdir_lib.LOCK).exists()

  assert sorted(first) == [1, 2, 3, 4]
  config = smoke_config(cifar_root, max_steps=12)
  assert checkpoint.manager(split, config.checkpoint).all_steps() == [4, 8]
  a, b = metrics.read(whole), metrics.read(split)
  assert sorted(a) == sorted(b) == list(range(1, 9))
  for step in range(1, 9):
    assert {k: a[step][k] for k in COMPARED} == {k: b[step][k] for k in COMPARED}, step
  assert {k: first[s][k] for s in first for k in COMPARED} == {
      k: a[s][k] for s in first for k in COMPARED}
  assert all(b[s]["images_per_sec"] > 0 and b[s]["eta_seconds"] >= 0 for s in b)
  # kNN monitoring reads the state without changing the run.
  assert [s for s in a if "knn_top1" in a[s]] == [6, 8]
  assert all(0 <= a[s]["knn_top1"] <= a[s]["knn_top5"] <= 1 for s in (6, 8))
  assert not any("knn_top1" in b[s] for s in b)

  config.sce.temp = 0.0  # infinite logits: the loss of step 9 is NaN
  with pytest.raises(FloatingPointError) as e:
    train.train(config, split, mesh)
  assert str(e.value).startswith(
      f"The loss is nan at step 9: training diverged. The last good checkpoint is "
      f"{split}/checkpoints/8 (step 8); a restart resumes from it.")
  assert checkpoint.manager(split, config.checkpoint).all_steps() == [4, 8]


def test_accumulated_smoke_run_resumes_exactly(cifar_root, tmp_path, mesh, caplog):
  """The smoke run with optim.accum_steps=2 (32 images: 2 micro-batches of 16; a ResNet-18
  with BatchNorm and shuffle-BN; one device, as the other resume test: the accumulated step on
  8 devices is test_train_step's) trains 4 steps, checkpointing at 2; a run resumed from the
  step-2 checkpoint alone logs the same metrics for steps 3 and 4."""
  config = smoke_config(cifar_root, max_steps=4)
  config.optim.accum_steps = 2
  config.checkpoint.every_steps = 2
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  caplog.set_level(logging.INFO)
  train.train(config, whole, mesh)
  assert "; batch 32 in 2 micro-batches on 1 cpu device(s);" in caplog.text
  shutil.copytree(whole / "checkpoints" / "2", resumed / "checkpoints" / "2")
  train.train(config, resumed, mesh)
  a, b = metrics.read(whole), metrics.read(resumed)
  assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [3, 4]
  for step in (3, 4):
    assert {k: a[step][k] for k in COMPARED} == {k: b[step][k] for k in COMPARED}, step
  assert all(math.isfinite(a[s][k]) for s in a for k in COMPARED)


def test_a_failed_save_stops_the_run_before_the_next(cifar_root, tmp_path, mesh):
  """A checkpoint that cannot be written stops the run in one line as soon as the save has
  ended, not at the next save. A full disk needs root to make; a file-size limit fails the same
  write (EFBIG, 'File too large', instead of ENOSPC)."""
  config = smoke_config(cifar_root, max_steps=24)  # Saves at 8, 16, 24; logs every step.
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Else the signal kills the test.
  resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # The state takes ~500 KB.
  try:
    with pytest.raises(checkpoint.CheckpointError) as e:
      train.train(config, tmp_path, mesh)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)
  message = str(e.value)
  assert message.startswith(f"Saving a checkpoint in {tmp_path}/checkpoints failed (")
  assert "checkpoints/8.orbax-checkpoint-tmp" in message and "File too large" in message
  assert message.endswith("). The last complete checkpoint is none (no checkpoint was saved); "
                          "free space on that disk (or fix its permissions or quota) and rerun "
                          "to resume from it.")
  assert "\n" not in message
  assert 8 <= max(metrics.read(tmp_path)) < 16
  assert not (tmp_path / workdir_lib.LOCK).exists()


# --- The command line, as a user runs it, here without TensorFlow (grain input, JSONL only).


@pytest.fixture(scope="module")
def no_tf(tmp_path_factory):
  """A PYTHONPATH entry on which `import tensorflow` (and tensorflow_datasets) fails."""
  path = tmp_path_factory.mktemp("no_tf")
  for name in ("tensorflow", "tensorflow_datasets"):
    (path / f"{name}.py").write_text("raise ImportError('TensorFlow is blocked in this test')\n")
  return path


def command(cifar_root, workdir, *flags):
  return [sys.executable, "-m", "sce_jax.main", "--config=configs/cifar10_r18.py:smoke",
          f"--config.data.path={cifar_root}", f"--workdir={workdir}", *flags]


def environment(no_tf):
  return {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu",
          "PYTHONPATH": str(no_tf)}


def run(cmd, no_tf, returncode=0, env=(), timeout=240):
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env={**environment(no_tf), **dict(env)}, timeout=timeout)
  assert out.returncode == returncode, out.stderr[-3000:]
  return out.stderr


def messages(stderr):
  """The log lines without absl's prefix ('I1128 10:59:48.31 123 file.py:12] ')."""
  return [line.split("] ", 1)[-1] for line in stderr.splitlines()]


def test_command_line_interrupt_resume_evaluate(cifar_root, no_tf, tmp_path):
  """Smoke pretraining: a second run on its workdir is refused, naming the first; Ctrl-C saves
  and exits with exits.PREEMPTED; a rerun resumes from that step, printing a few lines; its
  final checkpoint is evaluated by kNN and by a linear probe."""
  workdir = tmp_path / "work"
  # 6 million steps: the run cannot end before the signal, however fast the machine.
  long_run = ("--config.epochs=1000000", "--config.max_steps=-1")
  with open(tmp_path / "train.log", "w") as log_file:
    proc = subprocess.Popen(command(cifar_root, workdir, *long_run), cwd=ROOT,
                            env=environment(no_tf), stdout=subprocess.DEVNULL, stderr=log_file)
    log = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (log.exists() and log.read_text()) and proc.poll() is None:
      assert time.time() < deadline, "no step logged in time"
      time.sleep(0.2)
    second = run(command(cifar_root, workdir, *long_run), no_tf, exits.ERROR)
    assert messages(second)[-1].startswith(
        f"Error: {workdir} is in use by process {proc.pid} on {socket.gethostname()} (since ")
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
  stderr = (tmp_path / "train.log").read_text()
  assert proc.returncode == exits.PREEMPTED, stderr[-3000:]
  mngr = checkpoint.manager(workdir, smoke_config(cifar_root).checkpoint)
  stopped = mngr.latest_step()
  assert 4 <= stopped < 6_000_000
  assert messages(stderr)[-1] == (
      f"Interrupted (Ctrl-C): saved step {stopped} to {workdir}/checkpoints/{stopped}; rerun "
      "the same command to resume from it.")
  assert max(metrics.read(workdir)) == stopped  # the last step is logged before its save

  stderr = run(command(cifar_root, workdir, *long_run, f"--config.max_steps={stopped + 4}"),
               no_tf)
  lines = messages(stderr)
  assert f"Restored step {stopped} from {workdir}/checkpoints/{stopped} (checksums verified)." in (
      lines)
  # The default output: the labels chosen, a warning (max_steps changed), the restore, the
  # summary, the parameter count, the first step's compile, a line per log step (every 4) and
  # per checkpoint (every 8, and the last), the goodput.
  kinds = ("data.labels=auto", "The config differs", "Restored step", "sce pretraining",
           "Parameters: ", "First step ", "step ", "Saving step ", "Run: goodput ")
  assert all(line.startswith(kinds) for line in lines), stderr
  assert len(lines) <= 11
  assert max(metrics.read(workdir)) == stopped + 4
  assert checkpoint.manager(workdir, smoke_config(cifar_root).checkpoint).latest_step() == (
      stopped + 4)

  run(command(cifar_root, workdir, "--mode=knn"), no_tf)
  knn = json.loads((workdir / "eval_knn.json").read_text())
  assert knn["checkpoint"] == str(workdir) and 0 <= knn["knn_top5"] <= 1
  assert knn["knn_top1"] <= knn["knn_top5"]

  run(command(cifar_root, workdir, "--mode=linear"), no_tf)
  linear = json.loads((workdir / "eval_linear.json").read_text())
  assert 0 <= linear["linear_top1"] <= linear["linear_top5"] <= 1
  assert (workdir / "linear" / "metrics.jsonl").read_text().splitlines()


def test_restart_loads_the_step_from_the_compile_cache_and_accounts_for_its_time(
    cifar_root, no_tf, tmp_path):
  """Two starts of a smoke run in fresh processes, the second a restart that resumes it: the
  second loads its step from the persistent compilation cache (JAX's cache-hit event) and says
  so; both write time_to_first_step_s and, at every log step and at the end, goodput and the
  seconds of each part of the wall time (goodput.py), which add up to it and add up over the
  restart."""
  workdir, cache = tmp_path / "work", tmp_path / "xla"
  flags = (f"--config.compile_cache_dir={cache}", "--config.log_every_steps=2")
  # Cache even a fast compile; one device: the cache does not depend on the device count, and
  # one compiles several times faster than eight.
  env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_NUM_CPU_DEVICES": "1"}
  # Two cold starts, the first compiling: a hang guard for a loaded box (15 min per start
  # was seen with 7 agents on 2 cores).
  first = run(command(cifar_root, workdir, *flags, "--config.max_steps=2"), no_tf, env=env,
              timeout=1200)
  assert any(m.startswith("First step compiled (saved to the persistent compilation cache)")
             for m in messages(first)), first
  assert any(cache.iterdir())
  second = run(command(cifar_root, workdir, *flags, "--config.max_steps=4"), no_tf, env=env,
               timeout=1200)
  assert any(m.startswith("First step loaded from the persistent compilation cache in ")
             for m in messages(second)), second
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  firsts = [r for r in lines if "time_to_first_step_s" in r]
  assert [(r["step"], r["compile_cache_hit"]) for r in firsts] == [(1, 0.0), (3, 1.0)]
  assert all(r["time_to_first_step_s"] > 0 for r in firsts)
  totals = [r for r in lines if "goodput" in r]
  assert [r["step"] for r in totals] == [2, 2, 4, 4]  # log steps and each start's end
  parts = ("productive", "compile", "restore", "data_wait", "evaluation", "save",
           "restart_lost", "other")
  for r in totals:  # a log step's record is written before its own step's time is added
    assert 0 <= r["goodput"] < 1 and all(r[f"{k}_s"] >= 0 for k in parts[:-1])
    assert math.isclose(sum(r[f"{k}_s"] for k in parts), r["wall_s"], rel_tol=1e-9)
    assert math.isclose(r["goodput"], r["productive_s"] / r["wall_s"], rel_tol=1e-9)
  assert totals[2]["wall_s"] > totals[1]["wall_s"] and totals[2]["restore_s"] > 0
  assert totals[1]["goodput"] > 0 and totals[3]["goodput"] > 0  # the ends count their steps
  assert totals[0]["restore_s"] == totals[1]["restore_s"] == 0  # a fresh start
  assert totals[1]["restart_lost_s"] == totals[3]["restart_lost_s"] == 0  # nothing run twice
  assert messages(second)[-1].startswith("Run: goodput ")


def test_command_line_transfer_and_finetune(cifar_root, no_tf, tmp_path):
  """The issue's commands on a smoke checkpoint and a CIFAR-10-like archive pair (without
  TensorFlow): --mode=transfer with datasets=cifar10=ARCHIVE writes transfer/results.json and
  prints the table; --mode=finetune with a 1 % label fraction writes its top-1."""
  pytest.importorskip("sklearn")
  for split in ("train", "test"):
    with tarfile.open(tmp_path / f"cifar10_jpg_{split}.tar.gz", "w:gz") as tar:
      tar.add(cifar_root / split, arcname=split)
  archive, workdir = tmp_path / "cifar10_jpg_train.tar.gz", tmp_path / "work"
  cache = f"--config.data.cache_dir={tmp_path / 'cache'}"
  run(command(archive, workdir, cache, "--config.max_steps=2"), no_tf)

  stderr = run(command(archive, workdir, cache, "--mode=transfer",
                       f"--config.eval.transfer.datasets=cifar10={archive}"), no_tf)
  entry = json.loads((workdir / "transfer" / "results.json").read_text())["cifar10"]
  assert entry["metric"] == "top1" and 0 <= entry["value"] <= 1 and entry["weight_decay"] > 0
  assert entry["sizes"] == {"train": 160, "val": 40, "trainval": 200, "test": 100}
  assert "| cifar10 | top-1 |" in stderr and "| 94.8 |" in stderr
  evaluated = json.loads((workdir / "eval_transfer.json").read_text())
  assert evaluated["transfer_cifar10"] == entry["value"]
  provenance = evaluated["provenance"]  # what the number depends on (README, Results)
  assert provenance["protocol"]["sets"]["cifar10"] == {"split": "folder", "C": "1 / weight decay"}
  assert provenance["split_sizes"]["cifar10"] == entry["sizes"]
  digests = json.loads((workdir / "transfer" / "trunk_checksums.json").read_text())
  assert provenance["trunk_sha256"] == hashlib.sha256(
      json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]
  assert "jax" in provenance["versions"]

  run(command(archive, workdir, cache, "--mode=finetune",
              "--config.eval.finetune.fraction=0.01"), no_tf)
  tuned = json.loads((workdir / "eval_finetune.json").read_text())
  assert 0 <= tuned["finetune_top1"] <= tuned["finetune_top5"] <= 1
  assert tuned["provenance"]["protocol"]["eval.finetune"]["fraction"] == 0.01
  sizes = tuned["provenance"]["split_sizes"]
  assert sizes["train"] == 200 and sizes["eval"] == 100 and 1 <= sizes["labelled"] < 20
  assert max(metrics.read(workdir / "finetune_1pct")) == 8  # the smoke config's max_steps


def test_vit_smoke_trains_resumes_exactly_and_evaluates(cifar_root, no_tf, tmp_path):
  """configs/cifar10_vit.py:smoke from the command line (8 devices, no TensorFlow), its
  parameters and optimiser state split over the devices (sharding.params=fsdp, every array):
  8 steps with checkpoints at 4 and 8, then a run resumed from the step-4 checkpoint alone logs
  the same finite metrics for steps 5 to 8 (the drop-path draws continue from the saved rng;
  the empty batch statistics restore); kNN (replicated) then evaluates the ViT feature of the
  result."""
  def vit_command(workdir, *flags):
    return [sys.executable, "-m", "sce_jax.main", "--config=configs/cifar10_vit.py:smoke",
            f"--config.data.path={cifar_root}", f"--workdir={workdir}", "--config.max_steps=8",
            "--config.log_every_steps=1", "--config.checkpoint.every_steps=4",
            "--config.sharding.params=fsdp", "--config.sharding.min_size_mib=0", *flags]
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  run(vit_command(whole), no_tf)
  shutil.copytree(whole / "checkpoints" / "4", resumed / "checkpoints" / "4")
  stderr = run(vit_command(resumed), no_tf)
  assert f"Restored step 4 from {resumed}/checkpoints/4 (checksums verified)." in (
      messages(stderr))
  a, b = metrics.read(whole), metrics.read(resumed)
  assert sorted(a) == list(range(1, 9)) and sorted(b) == list(range(5, 9))
  for step in range(5, 9):
    assert {k: a[step][k] for k in COMPARED} == {k: b[step][k] for k in COMPARED}, step
  assert all(math.isfinite(a[s][k]) for s in a for k in COMPARED)

  run(vit_command(resumed, "--mode=knn"), no_tf)
  knn = json.loads((resumed / "eval_knn.json").read_text())
  assert 0 <= knn["knn_top1"] <= knn["knn_top5"] <= 1
