"""Two processes of 4 CPU devices train like one process of 8.

Each process reads its own share of the data, so the two layouts see the same global batches
only if the examples are interchangeable: here every image is the same flat colour (any crop
of it is the same), so only the accelerator's augmentations, keyed by the global position,
tell the examples apart. Both views are colour-jittered (the ImageNet preset at 32 px): with
identical target inputs BatchNorm would divide rounding noise by sqrt(eps). The probe's labels
still differ by layout; the SCE loss does not read them. The grain loader spares the three
processes TensorFlow's start-up.
"""
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sce_jax import checkpoint, metrics
from tests.helpers import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3
COMPARED = ("loss", "pos_sim", "target_entropy", "lr")


@pytest.fixture(scope="module")
def flat_images(tmp_path_factory):
  root = tmp_path_factory.mktemp("flat")
  for split, count in (("train", 32), ("test", 4)):
    for label in ("a", "b"):
      (root / split / label).mkdir(parents=True)
      for i in range(count):
        Image.new("RGB", (32, 32), (200, 120, 40)).save(root / split / label / f"{i}.png")
  return root


def start(data, workdir, devices, *flags):
  cmd = [sys.executable, "-m", "sce_jax.main", "--config=configs/cifar10_r18.py:smoke",
         f"--config.data.path={data}", f"--workdir={workdir}", f"--config.max_steps={STEPS}",
         "--config.log_every_steps=1", "--config.data.views=imagenet_two_crop",
         "--config.data.loader=grain", "--config.data.on_device=false", *flags]
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(flat_images, tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  coordinator = f"--coordinator_address=localhost:{free_port()}"
  procs = [start(flat_images, one, 8)] + [
      start(flat_images, two, 4, coordinator, "--num_processes=2", f"--process_id={i}")
      for i in range(2)]
  for proc in procs:
    _, stderr = proc.communicate(timeout=280)
    assert proc.returncode == 0, stderr[-3000:]
  a, b = metrics.read(one), metrics.read(two)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  for step in a:
    np.testing.assert_allclose([b[step][k] for k in COMPARED], [a[step][k] for k in COMPARED],
                               rtol=1e-5, err_msg=f"step {step}")
    # Gradients go through BatchNorm of near-uniform images: summation order shows more.
    np.testing.assert_allclose(b[step]["grad_norm"], a[step]["grad_norm"], rtol=1e-3)
  # Process 0 alone wrote the metrics (one line a step); both wrote their checkpoint shards.
  assert len((two / "metrics.jsonl").read_text().splitlines()) == STEPS
  ckpt = load_config("cifar10_r18", "smoke").checkpoint
  assert checkpoint.manager(two, ckpt).latest_step() == STEPS
