"""Throughput of the input pipeline's two stages (docs/SCE.md section 6), as a Markdown table.

Host stage: decode + the two 224-px random resized crops of imagenet_two_crop, on photographs at
ImageNet's usual sizes (500x375 and 375x500, quality 90; benchmarks/photos.py makes them from
scikit-image's samples), with tf.data and grain (threads, worker processes). It reports images/s
(wall clock) and images per CPU-second, the median of --repeats runs. The CPU time is that of this
process and its worker processes over the timed batches, so it counts what the host stage costs
even when other jobs share the machine: images per CPU-second is the rate one fully used core
sustains. Accuracy: the mean |difference| in grey levels between each loader's crops and the
reference, Pillow's antialiased bilinear resize of the same window of the fully decoded image
(`mean_abs_diff_vs_pil` is the larger of the two). Accelerator stage: augment_views (jitted) on
the first JAX device, in images/s (each image = both views).

  python benchmarks/photos.py /tmp/photos       # once; needs scikit-image (any environment)
  python benchmarks/input_pipeline.py --images-dir /tmp/photos --host-only --json host.json

Without --images-dir the photographs are made in a temporary folder (scikit-image needed here).
"""
# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # This checkout's sce_jax.

import jax
import ml_collections
import numpy as np
from PIL import Image

import photos
from sce_jax.data import augment
from sce_jax.data import crop
from sce_jax.data import grain_pipeline
from sce_jax.data import images
from sce_jax.data import presets
from sce_jax.data import sources

VIEWS = presets.imagenet_two_crop(224)


def _cpu_seconds():
  """User + system CPU time of this process and its live descendants (grain workers)."""
  try:
    import psutil
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
    from sce_jax.data import tf_pipeline as module
  else:
    module = grain_pipeline
  cfg = ml_collections.ConfigDict(dict(
      source="folder", name="", path=str(root), eval_path="", data_dir=None, train_split="train",
      eval_split="test", image_size=224, loader=loader, shuffle_buffer=1024, num_workers=0,
      prefetch=os.cpu_count(), cache=False))
  cfg.update(overrides)
  it = module.train_batches(sources.ImageFolder(root), cfg, views=VIEWS, batch_size=batch, seed=0,
                            start_step=0, process_index=0, process_count=1)
  next(it), next(it)
  start, cpu = time.perf_counter(), _cpu_seconds()
  for _ in range(steps):
    next(it)
  wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
  if hasattr(it, "close"):  # grain's worker processes.
    it.close()
  return batch * steps / wall, batch * steps / cpu


def _diff(crop_array, image, top, left, h, w):
  """Mean |difference| in grey levels between a crop and the reference: Pillow's bilinear resize
  of the window (top, left, h, w) of the fully decoded `image`."""
  size = crop_array.shape[0]
  ref = image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
  return float(np.abs(crop_array.astype(np.int16) - np.asarray(ref, np.int16)).mean())


def crop_accuracy(root, count):
  """{loader: (mean, max)} over the two crops of `count` examples of `_diff`, each loader's
  crop against the reference on that crop's own window (tf.data draws its own windows)."""
  from sce_jax.data import tf_pipeline
  import tensorflow as tf
  folder = sources.ImageFolder(root)
  diffs = {"grain": [], "tf": []}
  for position in range(count):
    record = folder[position % len(folder)]
    image = images.decode(record)
    crops, _ = grain_pipeline.crop_views(record, grain_pipeline.crop_rng(0, 0, position), VIEWS)
    u = grain_pipeline.crop_rng(0, 0, position).random((len(VIEWS), crop.ATTEMPTS, 4))
    decoded = tf_pipeline._decode(tf.constant(record["image"]))  # pylint: disable=protected-access
    for i, (out, view) in enumerate(zip(crops, VIEWS)):
      window = crop.crop_window(u[i], image.height, image.width, view.scale, view.ratio)
      diffs["grain"].append(_diff(out, image, *(int(a) for a in window)))
      seed = tf.constant([position, i], tf.int64)
      (top, left, _), (h, w, _) = tf_pipeline.distorted_window(
          seed, tf.shape(decoded), view.scale, view.ratio)
      out = tf_pipeline.random_resized_crop(seed, decoded, view.size, view.scale, view.ratio)
      diffs["tf"].append(_diff(out.numpy(), image, int(top), int(left), int(h), int(w)))
  return {name: (float(np.mean(d)), float(np.max(d))) for name, d in diffs.items()}


def accelerator_rate(batch, steps):
  """Images/s of augment_views on two 224-px uint8 views, compiled beforehand."""
  views = [jax.device_put(np.random.default_rng(i).integers(0, 256, (batch, 224, 224, 3),
                                                            np.uint8)) for i in range(2)]
  fn = jax.jit(lambda key, views: augment.augment_views(
      key, views, VIEWS, presets.IMAGENET_MEAN, presets.IMAGENET_STD))
  jax.block_until_ready(fn(jax.random.key(0), views))
  start = time.perf_counter()
  for step in range(steps):
    out = fn(jax.random.key(step), views)
  jax.block_until_ready(out)
  return batch * steps / (time.perf_counter() - start)


def _cpu_model():
  try:
    info = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.machine()
  return next((line.split(":", 1)[1].strip() for line in info.splitlines()
               if line.startswith("model name")), platform.machine())


def _measure(root, args):
  """{loader: (wall rates, CPU rates)} over args.repeats runs, loaders interleaved."""
  loaders = {"tf": ("tf", {}), "grain_threads": ("grain", {}),
             "grain_processes": ("grain", {"num_workers": args.workers})}
  runs = {name: ([], []) for name in loaders}
  for _ in range(args.repeats):
    for name, (loader, overrides) in loaders.items():
      wall, cpu = host_rate(root, loader, args.batch, args.steps, **overrides)
      runs[name][0].append(wall)
      runs[name][1].append(cpu)
  return runs


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images-dir", help="class folders of JPEGs (benchmarks/photos.py)")
  parser.add_argument("--images", type=int, default=1024, help="photographs made without it")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=16, help="timed batches per run")
  parser.add_argument("--repeats", type=int, default=3, help="runs per loader (median)")
  parser.add_argument("--workers", type=int, default=os.cpu_count(), help="grain processes")
  parser.add_argument("--host-only", action="store_true", help="skip the accelerator stage")
  parser.add_argument("--json", help="also write the figures to this file")
  args = parser.parse_args()
  cores = os.cpu_count()
  result = {"machine": f"{_cpu_model()}, {cores} CPU cores",
            "load_average_before": os.getloadavg()[0]}
  with tempfile.TemporaryDirectory() as scratch:
    root = args.images_dir
    if root is None:
      root = scratch
      photos.make_photos(root, args.images)
    runs = _measure(root, args)
    for name, (mean, worst) in crop_accuracy(root, 256).items():
      result[f"{name}_mean_abs_diff_vs_pil"], result[f"{name}_max_abs_diff_vs_pil"] = mean, worst
    result["mean_abs_diff_vs_pil"] = max(result["grain_mean_abs_diff_vs_pil"],
                                         result["tf_mean_abs_diff_vs_pil"])
    sizes = [os.path.getsize(p) for p in sources.ImageFolder(root).paths]
    result["images"] = {"count": len(sizes), "mean_kb": round(np.mean(sizes) / 1024, 1)}
  result["load_average_after"] = os.getloadavg()[0]
  rows = []
  for name, (wall, cpu) in runs.items():
    result[f"{name}_img_per_cpu_s"] = statistics.median(cpu)
    result[f"{name}_img_per_s"] = statistics.median(wall)
    result[f"{name}_runs_img_per_cpu_s"] = [round(r, 1) for r in cpu]
    rows.append((f"host: {name}", f"{statistics.median(wall):.0f}",
                 f"{statistics.median(wall) / cores:.0f}",
                 f"{statistics.median(cpu):.0f} ({min(cpu):.0f}-{max(cpu):.0f})"))
  if not args.host_only:
    rate = accelerator_rate(args.batch, args.steps)
    result["accelerator_img_per_s"] = rate
    rows.append((f"accelerator: augment_views ({jax.devices()[0].device_kind})", f"{rate:.0f}",
                 "-", "-"))
  print(f"| stage ({cores} CPU cores, batch {args.batch}, two 224-px crops, median of "
        f"{args.repeats}) | images/s | images/s / cores | images per CPU-second (range) |")
  print("|---|---|---|---|")
  for row in rows:
    print("| " + " | ".join(row) + " |")
  print("\nHost crops vs Pillow's bilinear resize of the same window, mean |diff| in grey levels "
        "(worst crop): " + ", ".join(
            f"{name} {result[f'{name}_mean_abs_diff_vs_pil']:.3f} "
            f"({result[f'{name}_max_abs_diff_vs_pil']:.3f})" for name in ("grain", "tf")) +
        f"; {result['images']['count']} JPEGs, mean {result['images']['mean_kb']} KB; load "
        f"average {result['load_average_before']:.1f} -> {result['load_average_after']:.1f}.")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  main()
