"""Throughput of the input pipeline's two stages (docs/SCE.md section 6), as a Markdown table.

Host stage: decode + two 224-px random resized crops (imagenet_two_crop) from ~400x350 JPEGs,
tf.data and grain, in images/s (wall clock) and images per CPU-second. The CPU time is that of
this process and its worker processes over the timed batches, so it counts what the host stage
costs even when other jobs share the machine: images per CPU-second is the rate one fully used
core sustains. Accelerator stage: augment_views (jitted) on the first JAX device, in images/s
(each image = both views).

  python benchmarks/input_pipeline.py --images 256 --batch 32 --steps 8
"""
import argparse
import os
import pathlib
import tempfile
import time

import jax
import ml_collections
import numpy as np
from PIL import Image

from sce_jax.data import augment
from sce_jax.data import presets
from sce_jax.data import sources


def make_jpegs(root, count, seed=0):
  """Random-texture JPEGs of 400x350 (smooth blobs plus grain, quality 90) in 10 classes."""
  rng = np.random.default_rng(seed)
  for i in range(count):
    blobs = Image.fromarray(rng.integers(0, 256, (14, 16, 3), np.uint8)).resize(
        (400, 350), Image.BICUBIC)
    pixels = np.asarray(blobs, np.int16) + rng.integers(-20, 21, (350, 400, 3))
    folder = pathlib.Path(root) / f"class{i % 10}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)


def _cpu_seconds():
  """User + system CPU time of this process and its live descendants (grain workers)."""
  try:
    import psutil  # pylint: disable=g-import-not-at-top
  except ImportError:
    return time.process_time()  # Without psutil: this process only.
  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.NoSuchProcess:
      pass
  return total


def host_rate(root, loader, batch, steps, **overrides):
  """(images/s, images per CPU-second) of the host stage after two warm-up batches."""
  if loader == "tf":
    from sce_jax.data import tf_pipeline as module  # pylint: disable=g-import-not-at-top
  else:
    from sce_jax.data import grain_pipeline as module  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(dict(
      source="folder", name="", path=str(root), eval_path="", data_dir=None, train_split="train",
      eval_split="test", image_size=224, loader=loader, shuffle_buffer=1024, num_workers=0,
      prefetch=os.cpu_count(), cache=False))
  cfg.update(overrides)
  it = module.train_batches(sources.ImageFolder(root), cfg, views=presets.imagenet_two_crop(224),
                            batch_size=batch, seed=0, start_step=0, process_index=0,
                            process_count=1)
  next(it), next(it)
  start, cpu = time.perf_counter(), _cpu_seconds()
  for _ in range(steps):
    next(it)
  wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
  if hasattr(it, "close"):
    it.close()
  return batch * steps / wall, batch * steps / cpu


def accelerator_rate(batch, steps):
  """Images/s of augment_views on two 224-px uint8 views, compiled beforehand."""
  specs = presets.imagenet_two_crop(224)
  views = [jax.device_put(np.random.default_rng(i).integers(0, 256, (batch, 224, 224, 3),
                                                            np.uint8)) for i in range(2)]
  fn = jax.jit(lambda key, views: augment.augment_views(
      key, views, specs, presets.IMAGENET_MEAN, presets.IMAGENET_STD))
  jax.block_until_ready(fn(jax.random.key(0), views))
  start = time.perf_counter()
  for step in range(steps):
    out = fn(jax.random.key(step), views)
  jax.block_until_ready(out)
  return batch * steps / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=256, help="JPEGs written to a temp dir")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=8, help="timed batches per row")
  parser.add_argument("--workers", type=int, default=os.cpu_count(), help="grain processes")
  parser.add_argument("--host-only", action="store_true", help="skip the accelerator stage")
  args = parser.parse_args()
  cores = os.cpu_count()
  rows = []
  with tempfile.TemporaryDirectory() as root:
    make_jpegs(root, args.images)
    for name, loader, overrides in [
        ("tf.data", "tf", {}),
        ("grain, threads", "grain", {}),
        (f"grain, {args.workers} processes", "grain", {"num_workers": args.workers})]:
      rate, per_cpu = host_rate(root, loader, args.batch, args.steps, **overrides)
      rows.append((f"host: {name}", f"{rate:.0f}", f"{rate / cores:.0f}", f"{per_cpu:.0f}"))
  if not args.host_only:
    rate = accelerator_rate(args.batch, args.steps)
    rows.append((f"accelerator: augment_views ({jax.devices()[0].device_kind})", f"{rate:.0f}",
                 "-", "-"))
  print(f"| stage ({cores} CPU cores, batch {args.batch}, two 224-px crops) | images/s "
        "| images/s / cores | images per CPU-second |")
  print("|---|---|---|---|")
  for row in rows:
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  main()
