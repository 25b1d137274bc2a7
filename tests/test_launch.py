"""Launchers: shellcheck, the commands their dry runs print, and the Colab notebook (smoke)."""
import json
import os
import pathlib
import shutil
import subprocess

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from sce_jax import evaluators
from tests.helpers import load_config


ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))


def _dry_run(script, *args, env=None):
  out = subprocess.run([LAUNCH / script, "--dry-run", *args], capture_output=True, text=True,
                       check=True, env={**os.environ, **(env or {})})
  return out.stdout.splitlines()


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
  out = subprocess.run(["shellcheck", "-x", script], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("script", ["slurm_gpu.sh", "tpu_pod.sh"])
def test_usage_lists_every_mode(script):
  """Each launcher's usage names the modes sce_jax.main has: train and the evaluators' MODES."""
  line = next(line for line in (LAUNCH / script).read_text().splitlines()
              if line.startswith("# MODE (sce_jax.main --mode):"))
  modes = [m.split()[0] for m in line.partition(":")[2].split("|")]
  assert modes == ["train", *evaluators.MODES]


def test_tpu_pod_dry_run():
  lines = _dry_run("tpu_pod.sh", "--name", "sce", "--zone", "us-central2-b", "--type", "v4-32",
                   "--config", "configs/cifar10_r18.py", "--workdir", "gs://bucket/run",
                   "--", "--config.batch_size=4096")
  assert lines[0] == ("gcloud compute tpus tpu-vm create sce --zone=us-central2-b "
                      "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base")
  assert lines[1].startswith(f"git -C {ROOT} archive")
  assert lines[2].startswith("gcloud compute tpus tpu-vm scp ")
  assert lines[2].endswith("sce:sce_jax.tar.gz --zone=us-central2-b --worker=all")
  install, main = lines[3:]
  for line in (install, main):
    assert line.startswith("gcloud compute tpus tpu-vm ssh sce --zone=us-central2-b --worker=all ")
  assert "pip install -U " in install and "jax[tpu]" in install
  assert ("--command=cd ~/sce_jax && python3 -m sce_jax.main --distributed --config=configs/cifar10_r18.py "
          "--workdir=gs://bucket/run --mode=train --config.batch_size=4096") in main


def test_tpu_pod_git_source_detached_existing_slice():
  lines = _dry_run("tpu_pod.sh", "--name", "sce", "--zone", "z", "--config", "c.py",
                   "--workdir", "gs://b/r", "--skip-create", "--detach", "--mode", "linear",
                   "--source", "https://example.com/sce_jax.git")
  assert len(lines) == 2  # no create, no archive copy
  assert "git clone --depth=1 https://example.com/sce_jax.git ~/sce_jax" in lines[0]
  assert ("nohup python3 -m sce_jax.main --distributed --config=c.py --workdir=gs://b/r --mode=linear "
          "> ~/sce_jax.log 2>&1 < /dev/null &") in lines[1]


def test_tpu_pod_needs_a_gcs_workdir():
  out = subprocess.run([LAUNCH / "tpu_pod.sh", "--dry-run", "--name", "n", "--zone", "z",
                        "--config", "c", "--workdir", "/local"], capture_output=True, text=True)
  assert out.returncode == 2 and "gs://" in out.stderr


def test_tpu_pod_check_runs_before_anything_is_created():
  """--check compiles the step for the --type slice first (sce_jax.aot), with the --config.*
  overrides of the main flags only."""
  lines = _dry_run("tpu_pod.sh", "--check", "--name", "sce", "--zone", "z", "--type", "v4-32",
                   "--config", "configs/imagenet_r50.py", "--workdir", "gs://b/r", "--",
                   "--config.batch_size=2048", "--verbosity=1")
  assert lines[0] == ("python3 -m sce_jax.aot --config=configs/imagenet_r50.py --topology=v4-32 "
                      "--config.batch_size=2048")
  assert lines[1].startswith("gcloud compute tpus tpu-vm create sce ")


def test_tpu_pod_check_that_fails_creates_nothing(tmp_path):
  """A config that does not fit (the check exits 1) stops the launcher before gcloud runs."""
  for name, status in (("python3", 1), ("gcloud", 0)):
    tool = tmp_path / name
    tool.write_text(f"#!/bin/sh\necho {name} \"$@\" >> {tmp_path}/calls\nexit {status}\n")
    tool.chmod(0o755)
  out = subprocess.run([LAUNCH / "tpu_pod.sh", "--check", "--name", "n", "--zone", "z", "--type",
                        "v5litepod-4", "--config", "c.py", "--workdir", "gs://b/r"],
                       capture_output=True, text=True,
                       env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
  assert out.returncode == 2 and "nothing was created" in out.stderr
  assert (tmp_path / "calls").read_text().splitlines() == [
      "python3 -m sce_jax.aot --config=c.py --topology=v5litepod-4"]


def test_slurm_submit_dry_run():
  (line,) = _dry_run("slurm_gpu.sh", "--config", "configs/cifar10_r18.py", "--workdir",
                     "/shared/run", "--nodes", "2", "--gpus-per-node", "4",
                     "--partition", "gpu", "--", "--config.batch_size=1024",
                     env={"SLURM_JOB_ID": ""})
  assert line.startswith("sbatch --job-name=sce_jax --nodes=2 --ntasks-per-node=4 "
                         "--gpus-per-node=4 --partition=gpu ")
  # The job runs this script again, without --dry-run.
  assert (f"--wrap={LAUNCH}/slurm_gpu.sh --config configs/cifar10_r18.py --workdir /shared/run "
          "--nodes 2 --gpus-per-node 4 --partition gpu -- --config.batch_size=1024") in line


@pytest.mark.parametrize("per_node", [False, True])
def test_slurm_job_step_dry_run(tmp_path, per_node):
  """Inside the allocation: coordinator on the first node; GPUs per process set for --per-node."""
  scontrol = tmp_path / "scontrol"  # stands in for SLURM's hostlist expansion
  scontrol.write_text("#!/bin/sh\necho node07\necho node08\n")
  scontrol.chmod(0o755)
  env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "1234",
         "SLURM_JOB_NODELIST": "node[07-08]"}
  args = ["--config", "c.py", "--workdir", "/w", "--nodes", "2", "--gpus-per-node", "4"]
  (line,) = _dry_run("slurm_gpu.sh", *args, *(["--per-node"] if per_node else []), env=env)
  port = 1234 % 4096 + 61440
  devices = " JAX_LOCAL_DEVICE_IDS=0,1,2,3" if per_node else ""
  assert line == (f"env JAX_COORDINATOR_ADDRESS=node07:{port}{devices} srun --kill-on-bad-exit=1 "
                  f"--nodes=2 --ntasks-per-node={1 if per_node else 4} python3 -m sce_jax.main "
                  "--distributed --config=c.py --workdir=/w --mode=train")


@pytest.mark.slow
def test_notebook_smoke(tmp_path):
  """The Colab notebook top to bottom on the CPU with the smoke parameters injected (papermill
  style, a cell after the `parameters` one): the smoke config trained in the kernel from
  in-memory arrays, a kNN evaluation at the end, then the plots. The arrays are random images
  made here (the notebook's TFDS download needs internet); 512 training images make the smoke
  run's full max_steps fit in its 2 epochs."""
  nb = nbformat.read(LAUNCH / "colab_sce_cifar10.ipynb", as_version=4)
  assert not any("/work/" in cell.source for cell in nb.cells)  # no machine paths
  rng = np.random.default_rng(0)
  arrays = tmp_path / "arrays.npz"
  splits = {"train": 512, "test": 64}  # random 32x32 RGB images, 10 classes
  np.savez(arrays, **{k: v for split, n in splits.items() for k, v in (
      (f"{split}_images", rng.integers(0, 256, (n, 32, 32, 3), np.uint8)),
      (f"{split}_labels", np.arange(n) % 10))})
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  workdir = tmp_path / "workdir"
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
      f"import numpy as np\nSMOKE = True\nWORKDIR = {str(workdir)!r}\n"
      f"with np.load({str(arrays)!r}) as f:\n"
      "  ARRAYS = {s: (f[f'{s}_images'], f[f'{s}_labels']) for s in ('train', 'test')}"))
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(ROOT)}}).execute()
  # The training cell prints the command line's short account (logs.setup): the devices, the
  # summary, the parameter count, 6 log steps, 3 checkpoints, the kNN result, the last step;
  # without it, orbax's ~40 lines a save made it 166.
  (cell,) = [c for c in nb.cells if "train.train(config, WORKDIR)" in c.source]
  printed = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
  assert len(printed.splitlines()) <= 20, printed
  smoke = load_config("cifar10_r18", "smoke")
  num_steps = min(smoke.max_steps, splits["train"] // smoke.batch_size * smoke.epochs)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == list(
      range(smoke.log_every_steps, num_steps + 1, smoke.log_every_steps))
  assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  (knn,) = [r for r in records if "knn_top1" in r]
  assert knn["step"] == num_steps and 0.0 <= knn["knn_top1"] <= 1.0
  assert (workdir / "curves.png").stat().st_size > 0
