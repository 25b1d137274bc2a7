"""Two processes of 4 CPU devices train like one process of 8.

Each process reads its own share of the data, so the two layouts see the same global batches
only if the examples are interchangeable and their crops do not depend on the random stream:
here every image is the same 32 x 256 panorama of natural-looking tiles. At that aspect ratio
no window of torchvision's RandomResizedCrop rule (scale 0.2-1, ratio 3/4-4/3) fits, so every
crop is the rule's fallback, the centre 32 x 43 window: identical by construction, and not
flat. The accelerator's augmentations are keyed by the global position, so both layouts run
the same program on the same inputs. Both views are colour-jittered (the ImageNet preset at
32 px): the CIFAR preset's weak view would give the target one image and its mirror image,
whose BatchNorm statistics amplify rounding. The probe's labels are the same too (one class).
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sce_jax import checkpoint, metrics
from sce_jax.data import crop, presets
from tests.conftest import natural_image
from tests.helpers import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3
FORWARD = ("loss", "pos_sim", "target_entropy", "probe_loss", "lr")
HEIGHT, WIDTH = 32, 256


@pytest.fixture(scope="module")
def panoramas(tmp_path_factory):
  """One class of identical panoramas (the test split is not read: smoke runs no kNN)."""
  rng = np.random.default_rng(0)
  image = Image.fromarray(np.concatenate([natural_image(rng, k / 8) for k in range(8)], 1))
  root = tmp_path_factory.mktemp("panoramas")
  (root / "train" / "a").mkdir(parents=True)
  for i in range(64):  # 2 steps an epoch, 4 in the smoke schedules
    image.save(root / "train" / "a" / f"{i}.png")
  return root / "train"


def test_every_crop_of_a_panorama_is_the_centre_window():
  """What the two-process test relies on: every view falls back to the centre crop of the
  largest 4:3 window, whatever the draw."""
  u = np.random.default_rng(0).random((10_000, crop.ATTEMPTS, 4))
  for view in presets.get("imagenet_two_crop", 32):
    windows = crop.crop_window(u, HEIGHT, WIDTH, view.scale, view.ratio)
    assert all((w == want).all() for w, want in zip(windows, (0, 106, 32, 43)))


def start(data, workdir, devices, *flags):
  cmd = [sys.executable, "-m", "sce_jax.main", "--config=configs/cifar10_r18.py:smoke",
         f"--config.data.path={data}", f"--workdir={workdir}", f"--config.max_steps={STEPS}",
         "--config.log_every_steps=1", "--config.data.loader=grain", "--config.model.width=8",
         "--config.data.views=imagenet_two_crop", "--config.data.on_device=false",
         "--config.data.labels=folders", *flags]  # one class folder: labelled, for the probe
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(panoramas, tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  coordinator = f"--coordinator_address=localhost:{free_port()}"
  procs = [start(panoramas, one, 8)] + [
      start(panoramas, two, 4, coordinator, "--num_processes=2", f"--process_id={i}")
      for i in range(2)]
  for proc in procs:
    _, stderr = proc.communicate(timeout=280)
    assert proc.returncode == 0, stderr[-3000:]
  a, b = metrics.read(one), metrics.read(two)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  # The same program on the same inputs and, while the warmup's lr is 0 (step 1), the same
  # parameters: only the cross-process collectives may add the 8 devices' partial sums in
  # another order, at most 7 float32 roundings (2^-24 each) of the partials' magnitude, ~4e-7
  # an all-reduce, compounded over the step's chain of BatchNorm statistics and gradients to
  # ~1e-6; rtol 1e-5 leaves a margin. The gradient is compared while the parameters are
  # bit-identical (steps 1 and 2): once they differ by rounding, a ReLU that flips at one of the
  # batch's near-identical images flips at all of them and the gradient jumps; the forward
  # metrics, continuous in the parameters, are compared at every step.
  assert a[1]["lr"] == 0
  for step in a:
    compared = FORWARD + (("grad_norm",) if step <= 2 else ())
    np.testing.assert_allclose([b[step][k] for k in compared], [a[step][k] for k in compared],
                               rtol=1e-5, atol=1e-7, err_msg=f"step {step}: {compared}")
  # Process 0 alone wrote the metrics (one loss line a step, beside the first step's and the
  # goodput's records); both wrote their checkpoint shards.
  records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
  assert sum("loss" in r for r in records) == STEPS
  ckpt = load_config("cifar10_r18", "smoke").checkpoint
  assert checkpoint.manager(two, ckpt).latest_step() == STEPS
