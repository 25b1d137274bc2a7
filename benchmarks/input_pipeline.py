"""Throughput of the input pipeline's two stages (docs/SCE.md section 6), as a Markdown table.

Host stage: decode + the random resized crops of --views (imagenet_two_crop: two 224-px crops;
imagenet_multi_crop: 2 x 224 + 192, 160, 128, 96), or with --host-stage decode only the decode
into a --decode-size buffer (data.host_stage=decode; the crops are the step's), on photographs
at ImageNet's usual sizes (500x375 and 375x500, quality 90; benchmarks/photos.py makes them from
scikit-image's samples), with tf.data and grain (threads, worker processes). `--host-stage
crops,decode` alternates the two stages run by run. It reports images/s (wall clock) and images
per CPU-second, the median of --repeats runs. The CPU time is that of this process and its
worker processes over the timed batches, so it counts what the host stage costs even when other
jobs share the machine: images per CPU-second is the rate one fully used core sustains.
Accuracy: the mean |difference| in grey levels between each loader's crops and the reference,
Pillow's antialiased bilinear resize of the same window of the fully decoded image
(`mean_abs_diff_vs_pil` is the larger of the two); for decode, the crops of the full path (the
host's decode, then `augment.random_resized_crop`, run here on the CPU). Bytes per image: what
the host sends the accelerator, and the bandwidth that takes at ACCELERATOR_RATE images/s.
Accelerator stage: augment_views (jitted) on the first JAX device, in images/s.

  python benchmarks/photos.py /tmp/photos       # once; needs scikit-image (any environment)
  python benchmarks/input_pipeline.py --images-dir /tmp/photos --host-only --json host.json
  python benchmarks/input_pipeline.py --images-dir /tmp/photos --host-only \
      --host-stage crops,decode --views imagenet_multi_crop --json multi.json

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

# The images/s per accelerator a host must feed (docs: the ~3,500 two-crop images/s aimed at on
# an H100), and links to compare the bytes with: a GPU's PCIe Gen5 x16 (~64 GB/s a direction)
# and a TPU host's PCIe Gen4 x16 (~32 GB/s; the host link of TPU VMs, not measured here).
ACCELERATOR_RATE = 3500
LINKS_GB_S = {"PCIe Gen5 x16": 64, "PCIe Gen4 x16 (TPU host)": 32}


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


def host_rate(root, loader, batch, steps, views, **overrides):
  """(images/s, images per CPU-second) of the host stage after two warm-up batches."""
  if loader == "tf":
    from sce_jax.data import tf_pipeline as module
  else:
    module = grain_pipeline
  cfg = ml_collections.ConfigDict(dict(
      source="folder", name="", path=str(root), eval_path="", data_dir=None, train_split="train",
      eval_split="test", image_size=224, loader=loader, shuffle_buffer=1024, num_workers=0,
      prefetch=os.cpu_count(), cache=False, host_stage="crops", decode_size=512))
  cfg.update(overrides)
  it = module.train_batches(sources.ImageFolder(root), cfg, views=views, batch_size=batch,
                            seed=0, start_step=0, process_index=0, process_count=1)
  next(it), next(it)
  start, cpu = time.perf_counter(), _cpu_seconds()
  for _ in range(steps):
    next(it)
  wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
  if hasattr(it, "close"):  # grain's worker processes.
    it.close()
  return batch * steps / wall, batch * steps / cpu


def decode_rate(root, count):
  """Images per CPU-second of Pillow's full decode alone, in a loop in this process (this
  thread's CPU time): the bound the decode stage approaches, measured beside it."""
  folder = sources.ImageFolder(root)
  records = [folder[i % len(folder)] for i in range(count)]
  cpu = time.thread_time()
  for record in records:
    images.decode(record)
  return count / (time.thread_time() - cpu)


def _diff(crop_array, image, top, left, h, w):
  """Mean |difference| in grey levels between a crop and the reference: Pillow's bilinear resize
  of the window (top, left, h, w) of the fully decoded `image`."""
  size = crop_array.shape[0]
  ref = image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
  return float(np.abs(crop_array.astype(np.int16) - np.asarray(ref, np.int16)).mean())


def crop_accuracy(root, count, views):
  """{loader: (mean, max)} over the crops of `count` examples of `_diff`, each loader's crop
  against the reference on that crop's own window (tf.data draws its own windows)."""
  from sce_jax.data import tf_pipeline
  import tensorflow as tf
  folder = sources.ImageFolder(root)
  diffs = {"grain": [], "tf": []}
  for position in range(count):
    record = folder[position % len(folder)]
    image = images.decode(record)
    crops, _ = grain_pipeline.crop_views(record, grain_pipeline.crop_rng(0, 0, position), views)
    u = grain_pipeline.crop_rng(0, 0, position).random((len(views), crop.ATTEMPTS, 4))
    decoded = tf_pipeline._decode(tf.constant(record["image"]))  # pylint: disable=protected-access
    for i, (out, view) in enumerate(zip(crops, views)):
      window = crop.crop_window(u[i], image.height, image.width, view.scale, view.ratio)
      diffs["grain"].append(_diff(out, image, *(int(a) for a in window)))
      seed = tf.constant([position, i], tf.int64)
      (top, left, _), (h, w, _) = tf_pipeline.distorted_window(
          seed, tf.shape(decoded), view.scale, view.ratio)
      out = tf_pipeline.random_resized_crop(seed, decoded, view.size, view.scale, view.ratio)
      diffs["tf"].append(_diff(out.numpy(), image, int(top), int(left), int(h), int(w)))
  return {name: (float(np.mean(d)), float(np.max(d))) for name, d in diffs.items()}


def decode_accuracy(root, count, views, buffer, batch=32):
  """{loader: (mean, max)} of `_diff` over the crops of `count` examples by the full decode path:
  each loader's host batch (grain's `decode_batch`; tf.data's `_decode_reduced`, padded into
  the buffer), then the step's `augment.crop_and_augment` crops (`random_resized_crop`, jitted,
  on the first JAX device), against Pillow's resize of the same windows of the full decode."""
  from sce_jax.data import tf_pipeline
  import tensorflow as tf
  folder = sources.ImageFolder(root)
  crop_fn = jax.jit(augment.random_resized_crop, static_argnums=(2, 3, 4))
  diffs = {"grain": [], "tf": []}
  for start in range(0, count, batch):
    records = [folder[p % len(folder)] for p in range(start, min(start + batch, count))]
    for name in diffs:
      if name == "grain":
        host = grain_pipeline.decode_batch(records, views, buffer)
      else:
        host = {"image": np.zeros((len(records), buffer, buffer, 3), np.uint8),
                "full": np.empty((len(records), 2), np.int32),
                "factor": np.empty(len(records), np.int32)}
        for i, record in enumerate(records):
          out = tf_pipeline._decode_reduced(  # pylint: disable=protected-access
              tf.constant(record["image"]), views, buffer)
          image, host["full"][i], host["factor"][i] = (out[k].numpy()
                                                       for k in ("image", "full", "factor"))
          host["image"][i, :image.shape[0], :image.shape[1]] = image
      full, stored = host["full"], host["image"][..., :3]
      for v, key in zip(views, jax.random.split(jax.random.key(start), len(views))):
        crops = np.asarray(crop_fn(key, stored, v.size, v.scale, v.ratio, full, host["factor"]))
        windows = np.stack(augment.crop_windows(key, len(records), full[:, 0], full[:, 1],
                                                v.scale, v.ratio), -1)
        for out, record, window in zip(crops, records, windows):
          diffs[name].append(_diff(out, images.decode(record), *(int(a) for a in window)))
  return {name: (float(np.mean(d)), float(np.max(d))) for name, d in diffs.items()}


def bytes_per_image(host_stage, views, buffer):
  """Bytes a host sends the accelerator for one example: its uint8 crops, or (decode) its
  buffer (`crop.decode_batch_shapes`, grain's RGBX; tf.data's 3 channels send 3/4 of it) with
  the int32 full size and factor; the int32 label either way."""
  if host_stage == "decode":
    return buffer * buffer * crop.DECODE_CHANNELS + 3 * 4 + 4
  return sum(v.size * v.size * 3 for v in views) + 4


def accelerator_rate(batch, steps, specs):
  """Images/s of augment_views on the uint8 views of `specs`, compiled beforehand."""
  views = [jax.device_put(np.random.default_rng(i).integers(0, 256, (batch, v.size, v.size, 3),
                                                            np.uint8))
           for i, v in enumerate(specs)]
  fn = jax.jit(lambda key, views: augment.augment_views(
      key, views, specs, presets.IMAGENET_MEAN, presets.IMAGENET_STD))
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


def _measure(root, args, views):
  """{(stage, loader): (wall rates, CPU rates)} over args.repeats runs, the stages and loaders
  alternated run by run."""
  loaders = {"tf": ("tf", {}), "grain_threads": ("grain", {}),
             "grain_processes": ("grain", {"num_workers": args.workers})}
  runs = {(stage, name): ([], []) for stage in args.host_stage for name in loaders}
  runs["decode alone", "Pillow, 1 thread"] = ([], [])
  for _ in range(args.repeats):
    rate = decode_rate(root, args.batch * args.steps)
    runs["decode alone", "Pillow, 1 thread"][0].append(rate)
    runs["decode alone", "Pillow, 1 thread"][1].append(rate)
    for stage in args.host_stage:
      for name, (loader, overrides) in loaders.items():
        wall, cpu = host_rate(root, loader, args.batch, args.steps, views, host_stage=stage,
                              decode_size=args.decode_size, **overrides)
        runs[stage, name][0].append(wall)
        runs[stage, name][1].append(cpu)
  return runs


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images-dir", help="class folders of JPEGs (benchmarks/photos.py)")
  parser.add_argument("--images", type=int, default=1024, help="photographs made without it")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=16, help="timed batches per run")
  parser.add_argument("--repeats", type=int, default=3, help="runs per loader (median)")
  parser.add_argument("--workers", type=int, default=os.cpu_count(), help="grain processes")
  parser.add_argument("--views", default="imagenet_two_crop",
                      choices=("imagenet_two_crop", "imagenet_multi_crop"))
  parser.add_argument("--host-stage", default="crops", type=lambda s: s.split(","),
                      help="data.host_stage: crops, decode, or both alternated (crops,decode)")
  parser.add_argument("--decode-size", type=int, default=512, help="data.decode_size")
  parser.add_argument("--accuracy-images", type=int, default=256)
  parser.add_argument("--host-only", action="store_true", help="skip the accelerator stage")
  parser.add_argument("--json", help="also write the figures to this file")
  args = parser.parse_args()
  bad = set(args.host_stage) - set(crop.HOST_STAGES)
  if bad:
    parser.error(f"--host-stage {','.join(bad)}: choose from {', '.join(crop.HOST_STAGES)}")
  views = presets.get(args.views, 224)
  cores = os.cpu_count()
  result = {"machine": f"{_cpu_model()}, {cores} CPU cores", "views": args.views,
            "decode_size": args.decode_size, "load_average_before": os.getloadavg()[0]}
  accuracy = {}
  with tempfile.TemporaryDirectory() as scratch:
    root = args.images_dir
    if root is None:
      root = scratch
      photos.make_photos(root, args.images)
    runs = _measure(root, args, views)
    for stage in args.host_stage:
      accuracy[stage] = (decode_accuracy(root, args.accuracy_images, views, args.decode_size)
                         if stage == "decode" else
                         crop_accuracy(root, args.accuracy_images, views))
    sizes = [os.path.getsize(p) for p in sources.ImageFolder(root).paths]
    result["images"] = {"count": len(sizes), "mean_kb": round(np.mean(sizes) / 1024, 1)}
  result["load_average_after"] = os.getloadavg()[0]
  rows = []
  for (stage, name), (wall, cpu) in runs.items():
    entry = result.setdefault(stage, {})
    entry[f"{name}_img_per_cpu_s"] = statistics.median(cpu)
    entry[f"{name}_img_per_s"] = statistics.median(wall)
    entry[f"{name}_runs_img_per_cpu_s"] = [round(r, 1) for r in cpu]
    walls = (f"{statistics.median(wall):.0f}", f"{statistics.median(wall) / cores:.0f}")
    rows.append((f"host ({stage}): {name}", *(("-", "-") if stage == "decode alone" else walls),
                 f"{statistics.median(cpu):.0f} ({min(cpu):.0f}-{max(cpu):.0f})"))
  for stage, diffs in accuracy.items():
    entry = result[stage]
    for name, (mean, worst) in diffs.items():
      entry[f"{name}_mean_abs_diff_vs_pil"], entry[f"{name}_max_abs_diff_vs_pil"] = mean, worst
    entry["mean_abs_diff_vs_pil"] = max(entry["grain_mean_abs_diff_vs_pil"],
                                        entry["tf_mean_abs_diff_vs_pil"])
    size = bytes_per_image(stage, views, args.decode_size)
    entry["bytes_per_image"] = size
    entry[f"gb_s_at_{ACCELERATOR_RATE}_img_s"] = size * ACCELERATOR_RATE / 1e9
  if not args.host_only:
    rate = accelerator_rate(args.batch, args.steps, views)
    result["accelerator_img_per_s"] = rate
    rows.append((f"accelerator: augment_views ({jax.devices()[0].device_kind})", f"{rate:.0f}",
                 "-", "-"))
  print(f"| stage ({cores} CPU cores, batch {args.batch}, {args.views}, median of "
        f"{args.repeats}) | images/s | images/s / cores | images per CPU-second (range) |")
  print("|---|---|---|---|")
  for row in rows:
    print("| " + " | ".join(row) + " |")
  for stage in accuracy:
    entry = result[stage]
    gb_s = entry[f"gb_s_at_{ACCELERATOR_RATE}_img_s"]
    print(f"\n{stage}: crops vs Pillow's bilinear resize of the same window, mean |diff| in grey "
          "levels (worst crop): " + ", ".join(
              f"{name} {entry[f'{name}_mean_abs_diff_vs_pil']:.3f} "
              f"({entry[f'{name}_max_abs_diff_vs_pil']:.3f})" for name in ("grain", "tf")) +
          f"; {entry['bytes_per_image']:,} bytes an image, {gb_s:.2f} GB/s at "
          f"{ACCELERATOR_RATE:,} images/s (" + ", ".join(
              f"{100 * gb_s / link:.1f} % of {name}" for name, link in LINKS_GB_S.items()) + ").")
  print(f"\n{result['images']['count']} JPEGs, mean {result['images']['mean_kb']} KB; load "
        f"average {result['load_average_before']:.1f} -> {result['load_average_after']:.1f}.")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  main()
