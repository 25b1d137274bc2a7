"""One command for a short GPU window: the speed of the SCE step and a CIFAR-10 learning curve.

Stages, in this order, within --budget-minutes, each in its own process (a crash or a timeout
costs that stage alone, and JAX and torch never hold the GPU's memory at once):
  1. throughput.py, cases (a) ResNet-50 2 x 224, (c) ResNet-18 32 px and (d) ViT-S/16 2 x 224,
     colour stage on, with float32 weight gradients and (not with --smoke, whose float32 network
     has none) without;
  2. torch_reference.py: eager for (a), (c) and (d), then torch.compile for (a) if the budget still
     holds its compilation (--torch-compile-minutes) besides --min-cifar-minutes; skipped with a
     note where torch is not installed (with --smoke, compiled by the aot_eager backend: traced
     like inductor's input, without its minutes of code generation on a CPU);
  3. CIFAR-10 ResNet-18 SCE pretraining from the archive (--data), data on the device, through
     the command line (sce_jax.main) with kNN every 20 epochs and at the end, for as many of
     the 200 epochs as the rest of the budget allows at the speed stage 1 measured; the
     schedules are those of that many epochs.
Writes <out>/<date>-<card>.json with the numbers as measured (keys in RESULT_KEYS), a plot of
kNN top-1 against epoch, <date>-<card>-knn.png, and every stage's output, <date>-<card>.log.

  python benchmarks/proof.py                      # on the GPU (benchmarks/README.md)
  python benchmarks/proof.py --smoke --out DIR    # every stage with tiny shapes on the CPU
"""
import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULT_KEYS = (
    "card", "date", "command", "git_commit", "device_kind", "budget_minutes",
    "r50_img_s", "r50_mfu", "r50_torch_eager_img_s", "r50_torch_compile_img_s",
    "r18_img_s", "r18_mfu", "r18_torch_eager_img_s",
    "vit_s16_img_s", "vit_s16_mfu", "vit_s16_torch_eager_img_s",
    "r50_plain_grads_img_s", "r18_plain_grads_img_s", "vit_s16_plain_grads_img_s",
    "cifar10_epochs", "cifar10_minutes", "cifar10_knn_top1", "cifar10_knn_curve", "notes")
DATA = (ROOT / ".data" / "cifar10" / "cifar10_jpg_train.tar.gz",
        ROOT.parent / "shared" / "data" / "cifar10" / "cifar10_jpg_train.tar.gz")
KNN_EVERY_EPOCHS = 20
SPEED_CASES = (("r50", "a"), ("r18", "c"), ("vit_s16", "d"))  # result key prefix, throughput case
MAX_EPOCHS = 200  # docs/SCE.md 5, CIFAR-10 column


class Stages:
  """Runs stage commands as processes under the budget; keeps their output for the log."""

  def __init__(self, budget_s, env, log):
    self.deadline = time.monotonic() + budget_s
    self.env, self.log, self.seconds = env, log, {}

  def left(self):
    return self.deadline - time.monotonic()

  def run(self, name, cmd, timeout):
    """Runs cmd for at most `timeout` s (SIGTERM, then SIGKILL 30 s later); returns the exit
    code (None when it was stopped)."""
    self.log.write(f"\n=== {name}: {' '.join(map(str, cmd))} (at most {timeout:.0f} s)\n")
    self.log.flush()
    start = time.monotonic()
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=self.env, stdout=self.log,
                            stderr=subprocess.STDOUT)
    try:
      code = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGTERM)
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      code = None
    self.seconds[name] = round(time.monotonic() - start, 1)
    self.log.write(f"=== {name}: exit {code} after {self.seconds[name]} s\n")
    self.log.flush()
    return code


def _read_json(path):
  return json.loads(path.read_text()) if path.is_file() else None


def _row(results, key, **match):
  """The first row of a stage's JSON for case `key` matching `match`, or None."""
  for row in (results or {}).get("rows", []):
    if row["key"] == key and all(row.get(k) == v for k, v in match.items()):
      return row
  return None


def make_smoke_archives(root, per_class=(20, 10), classes=10, seed=0):
  """cifar_jpg_train.tar.gz and cifar_jpg_test.tar.gz of 32x32 JPEGs (smooth colour fields,
  a hue per class) for the smoke run; returns the train archive."""
  rng = np.random.default_rng(seed)
  for split, count in zip(("train", "test"), per_class):
    tree = root / "tree" / split
    for c in range(classes):
      (tree / f"class{c}").mkdir(parents=True)
      for i in range(count):
        field = rng.uniform(0, 1, (4, 4, 3)) * 0.5 + np.eye(3)[c % 3] * (0.3 + 0.05 * c)
        image = Image.fromarray(np.uint8(np.clip(field, 0, 1) * 255)).resize((32, 32),
                                                                            Image.BICUBIC)
        image.save(tree / f"class{c}" / f"{i}.jpg", quality=90)
    with tarfile.open(root / f"cifar_jpg_{split}.tar.gz", "w:gz") as tar:
      tar.add(tree, arcname=split)
  return root / "cifar_jpg_train.tar.gz"


def _count_images(archive):
  with tarfile.open(archive) as tar:
    return sum(m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png")) for m in tar)


def cifar_epochs(seconds, images_per_s, num_images):
  """Epochs that fit in `seconds` at images_per_s, after start-up, compilation and kNN
  evaluations (estimates for a GPU: 90 s, and 15 s per evaluation every 20 epochs)."""
  epoch_s = num_images / images_per_s
  for epochs in range(MAX_EPOCHS, 0, -1):
    if 90 + 15 * (epochs // KNN_EVERY_EPOCHS + 1) + epochs * epoch_s <= seconds:
      return epochs
  return 0


def knn_curve(workdir, steps_per_epoch):
  """[(epoch, kNN top-1)] and the last logged step of a run's metrics.jsonl."""
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    return [], 0
  records = [json.loads(line) for line in path.read_text().splitlines()]
  curve = [(r["step"] / steps_per_epoch, r["knn_top1"]) for r in records if "knn_top1" in r]
  return curve, max((r["step"] for r in records), default=0)


def plot(curve, title, path):
  """kNN top-1 against epoch as a PNG; False when matplotlib is not installed."""
  if importlib.util.find_spec("matplotlib") is None:
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([e for e, _ in curve], [100 * t for _, t in curve], "o-")
  ax.set(xlabel="epoch", ylabel="kNN top-1 (%)", title=title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def _git_commit():
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budget-minutes", type=float, default=9.0)
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  parser.add_argument("--data", help="CIFAR-10 train archive (default: .data/cifar10/ or "
                      "../shared/data/cifar10/; with --smoke a generated one)")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
  parser.add_argument("--min-cifar-minutes", type=float, default=3.0)
  parser.add_argument("--torch-compile-minutes", type=float, default=3.5,
                      help="expected torch.compile warm-up of ResNet-50 (about 3 on an H200)")
  parser.add_argument("--commit", help="git commit to record (default: git rev-parse HEAD)")
  args = parser.parse_args()
  smoke = args.smoke
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  work = pathlib.Path(tempfile.mkdtemp(prefix="sce_proof_"))
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
  result = {k: None for k in RESULT_KEYS}
  notes = []
  result.update(date=date, command=" ".join([sys.executable, *sys.argv]),
                git_commit=args.commit or _git_commit(), budget_minutes=args.budget_minutes,
                smoke=smoke)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), "PYTHONUNBUFFERED": "1"}
  if smoke:
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=(env.get("XLA_FLAGS", "") +
                                               " --xla_backend_optimization_level=0").strip())
  small = ["--smoke"] if smoke else []
  py = sys.executable
  log_path = work / "proof.log"
  with open(log_path, "w") as log:
    stages = Stages(args.budget_minutes * 60, env, log)
    reserve = args.min_cifar_minutes * 60

    # 1. The JAX step's speed.
    code = stages.run("throughput", [py, "benchmarks/throughput.py", "--cases", "a,c,d",
                                     "--colour", "on", "--concat", "config", "--json",
                                     work / "throughput.json", "--f32-weight-grads",
                                     "on" if smoke else "on,off",
                                     *small, *(["--steps", "3", "--warmup", "1"] * smoke)],
                      timeout=stages.left() - reserve)
    speed = _read_json(work / "throughput.json")
    if speed is None:
      notes.append(f"throughput: no result (exit {code}; see the log)")
    else:
      result["device_kind"] = speed["device_kind"]
      for name, key in SPEED_CASES:
        row = _row(speed, key, colour=True, f32_weight_grads=True)
        if row:
          result[f"{name}_img_s"], result[f"{name}_mfu"] = row["images_per_s"], row["mfu"]
        plain = _row(speed, key, colour=True, f32_weight_grads=False)
        result[f"{name}_plain_grads_img_s"] = plain and plain["images_per_s"]
      result["throughput"] = speed
    result["card"] = "cpu" if smoke else re.sub(
        r"[^a-z0-9]+", "-", (result["device_kind"] or "unknown").lower()).strip("-")

    # 2. The same step in PyTorch, last among the speed figures.
    torch_cmd = [py, "benchmarks/torch_reference.py", *small,
                 *(["--steps", "3", "--warmup", "1", "--backend", "aot_eager"] * smoke)]
    if importlib.util.find_spec("torch") is None:
      notes.append("torch reference: skipped: torch not installed (pip install 'sce_jax[bench]')")
    else:
      vit_cases = ",d" if importlib.util.find_spec("timm") else ""
      if not vit_cases:
        notes.append("torch reference (d): skipped: timm not installed (pip install "
                     "'sce_jax[bench]')")
      stages.run("torch eager", [*torch_cmd, "--cases", f"a,c{vit_cases}", "--mode", "eager",
                                 "--json", work / "torch_eager.json"],
                 timeout=stages.left() - reserve)
      eager = _read_json(work / "torch_eager.json")
      result["torch_eager"] = eager
      for name, key in SPEED_CASES:
        row = _row(eager, key)
        result[f"{name}_torch_eager_img_s"] = row and row["images_per_s"]
      if stages.left() - reserve >= args.torch_compile_minutes * 60 or smoke:
        stages.run("torch compile", [*torch_cmd, "--cases", "a", "--mode", "compile", "--json",
                                     work / "torch_compile.json"],
                   timeout=stages.left() - reserve)
        compiled = _read_json(work / "torch_compile.json")
        result["torch_compile"] = compiled
        row = _row(compiled, "a")
        result["r50_torch_compile_img_s"] = row and row["images_per_s"]
      else:
        notes.append(f"torch.compile: skipped: {stages.left() / 60:.1f} min left, it needs "
                     f"about {args.torch_compile_minutes} besides {args.min_cifar_minutes} for "
                     "CIFAR-10")
      if result["r50_torch_eager_img_s"] is None:
        notes.append("torch eager: no result (see the log)")

    # 3. CIFAR-10 pretraining, data on the device, for the epochs that fit.
    data = pathlib.Path(args.data) if args.data else (
        make_smoke_archives(work / "data") if smoke else next((p for p in DATA if p.is_file()),
                                                              None))
    if data is None or not data.is_file():
      notes.append(f"cifar10: skipped: no archive at {args.data or [str(p) for p in DATA]}")
    else:
      num_images = _count_images(data)
      batch = 32 if smoke else 256
      steps_per_epoch = num_images // batch
      if smoke:
        epochs, knn_every = 2, 1
      else:
        rate = result["r18_img_s"] or 4000.0  # A guess when stage 1 measured nothing.
        # Batch 256 runs less efficiently than the 512 that stage 1 timed.
        epochs, knn_every = cifar_epochs(stages.left() - 20, 0.7 * rate, num_images), (
            KNN_EVERY_EPOCHS)
        if result["r18_img_s"] is None:
          notes.append("cifar10: epochs planned at a guessed 4000 images/s")
      workdir = work / "cifar10"
      if epochs:
        cmd = [py, "-m", "sce_jax.main",
               f"--config=configs/cifar10_r18.py:{'smoke,' * smoke}epochs={epochs}",
               f"--config.data.path={data}", "--config.data.on_device=True",
               # The archive opens as arrays: no host copy of the decoded images for the kNN.
               "--config.data.cache=False", f"--config.data.cache_dir={work / 'cache'}",
               f"--config.batch_size={batch}",
               f"--config.eval.knn.every_epochs={knn_every}", "--config.max_steps=-1",
               f"--config.checkpoint.every_steps={10 * steps_per_epoch * knn_every}",
               f"--workdir={workdir}"]
        start = time.monotonic()
        code = stages.run("cifar10", cmd, timeout=stages.left() - 10)
        curve, last_step = knn_curve(workdir, steps_per_epoch)
        result.update(cifar10_epochs=round(last_step / steps_per_epoch, 2),
                      cifar10_minutes=round((time.monotonic() - start) / 60, 2),
                      cifar10_epochs_planned=epochs,
                      cifar10_knn_curve=[[round(e, 2), t] for e, t in curve],
                      cifar10_knn_top1=curve[-1][1] if curve else None)
        if code != 0:
          notes.append(f"cifar10: exit {code} (stopped at the budget if None; see the log)")
      else:
        notes.append("cifar10: skipped: no epoch fits in the budget left")
  result["stage_seconds"] = stages.seconds
  result["notes"] = notes
  stem = out / f"{date}-{result['card']}"
  if result["cifar10_knn_curve"] and not plot(
      result["cifar10_knn_curve"], f"SCE CIFAR-10 ResNet-18 on {result['card']}",
      f"{stem}-knn.png"):
    notes.append("plot: skipped: matplotlib not installed")
  shutil.copy(log_path, f"{stem}.log")
  pathlib.Path(f"{stem}.json").write_text(json.dumps(result, indent=1))
  shutil.rmtree(work, ignore_errors=True)
  print(json.dumps({k: result[k] for k in RESULT_KEYS}, indent=1))
  print(f"Wrote {stem}.json")


if __name__ == "__main__":
  main()
