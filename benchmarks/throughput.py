"""Speed of the real SCE training step (train.build) on synthetic data on the accelerator.

Cases:
  a  ResNet-50, two 224-px crops, 256 images per device (configs/imagenet_r50.py)
  b  ResNet-50, multi-crop 2 x 224 + 4 x 96, 256 images per device
  c  ResNet-18 with the small stem, 32 px, global batch 512 (configs/cifar10_r18.py)
  d  ViT-S/16, two 224-px crops, 256 images per device (configs/imagenet_vit_s16.py)
  e  ViT-S/16, multi-crop 2 x 224 + 4 x 96 (the position table resampled to 6 x 6), 256 images
     per device
(a), (b), (d) and (e) run the ImageNet step on uint8 crops already on the device (what the
host would send), the colour stage inside the step, or with --host-stage decode on what
data.host_stage=decode's host sends (`crop.decode_batch_shapes`: 4:3 images the width of a
data.decode_size buffer, stored whole), the crops drawn and resized inside the step; (c) runs the CIFAR step on a synthetic set
held on the device (data.on_device): gather, random resized crop and colour inside the step.
Each case runs with and without the colour stage (jitter, grayscale, blur, solarize; crop, flip
and normalisation stay), with model.concat_views off and on where the config has that key, and
with model.f32_weight_grads on and off (--f32-weight-grads: float32 weight gradients of the
bfloat16 layers, models/precision.py, against plain Flax's).

An image is one example with all its crops. Timing: the step is compiled ahead (its FLOPs come
from XLA's cost analysis of the compiled program: per device, all of the step), a few warm-up
steps, then the median of --steps steps, each waited for with block_until_ready. MFU = FLOPs
per step x steps/s / the device's dense bf16 peak (PEAKS, by jax.devices()[0].device_kind).

  python benchmarks/throughput.py --cases a,b,c,d,e --json throughput.json
  python benchmarks/throughput.py --cases a,b --host-stage crops,decode --f32-weight-grads on
  python benchmarks/throughput.py --smoke   # tiny shapes, any CPU
  python benchmarks/throughput.py --cases a,d --methods sce,moco_v2,moco_v3,byol,simclr,ressl,dino

--methods times other methods' steps (sce_jax/methods/: each case's config file with that
method's recipe, `--config.method=NAME`) on the same trunk and crops; a method without a recipe
for a case's file (DINO on the ResNet-50 file) is skipped with a line.
"""
import argparse
import dataclasses
import json
import pathlib
import re
import statistics
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sce_jax import config as sce_config  # noqa: E402  pylint: disable=g-import-not-at-top
from sce_jax import losses, schema, sharding, train  # noqa: E402
from sce_jax.data import crop, presets, resident  # noqa: E402
from sce_jax.models import trunks  # noqa: E402

# Dense bf16 tensor peaks per device, TFLOP/s, by device_kind (first match). NVIDIA's datasheets
# give the bf16 figure with 2:4 sparsity and note that dense is half of it; Google gives the
# bf16 peak per chip (a JAX device is one chip).
PEAKS = (
    (r"H100.*PCIe", 756.5, "NVIDIA H100 datasheet: 1,513 TFLOPS bf16 with sparsity (PCIe), "
     "https://www.nvidia.com/en-us/data-center/h100/"),
    (r"H100.*NVL", 835.5, "NVIDIA H100 datasheet: 1,671 TFLOPS bf16 with sparsity (NVL), "
     "https://www.nvidia.com/en-us/data-center/h100/"),
    (r"H100", 989.4, "NVIDIA H100 datasheet: 1,979 TFLOPS bf16 with sparsity (SXM), "
     "https://www.nvidia.com/en-us/data-center/h100/"),
    (r"H200.*NVL", 835.5, "NVIDIA H200 datasheet: 1,671 TFLOPS bf16 with sparsity (NVL), "
     "https://www.nvidia.com/en-us/data-center/h200/"),
    (r"H200", 989.4, "NVIDIA H200 datasheet: 1,979 TFLOPS bf16 with sparsity (SXM), "
     "https://www.nvidia.com/en-us/data-center/h200/"),
    (r"A100", 312.0, "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense (624 with sparsity), "
     "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
     "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"),
    (r"\bL4\b", 121.0, "NVIDIA L4 datasheet: 242 TFLOPS bf16 with sparsity, "
     "https://www.nvidia.com/en-us/data-center/l4/"),
    (r"\bT4\b", 65.0, "NVIDIA T4 datasheet: 65 TFLOPS fp16 mixed precision; the T4 has no bf16 "
     "tensor cores, so this is the fp16 peak, https://www.nvidia.com/content/dam/en-zz/"
     "Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf"),
    (r"TPU v4", 275.0, "Google Cloud TPU v4: 275 TFLOPS bf16 per chip, "
     "https://cloud.google.com/tpu/docs/v4"),
    (r"TPU v5 ?(lite|e)", 197.0, "Google Cloud TPU v5e: 197 TFLOPS bf16 per chip, "
     "https://cloud.google.com/tpu/docs/v5e"),
    (r"TPU v5", 459.0, "Google Cloud TPU v5p: 459 TFLOPS bf16 per chip, "
     "https://cloud.google.com/tpu/docs/v5p"),
    (r"TPU v6", 918.0, "Google Cloud TPU v6e (Trillium): 918 TFLOPS bf16 per chip, "
     "https://cloud.google.com/tpu/docs/v6e"),
)


def peak(device_kind):
  """(dense bf16 TFLOP/s, source) of a device kind, or (None, why) when it is not in PEAKS."""
  for pattern, tflops, source in PEAKS:
    if re.search(pattern, device_kind):
      return tflops, source
  return None, f"no peak known for {device_kind!r}"


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  config: str            # configs/FILE.py[:variant]
  batch: int             # images per device if per_device, else the global batch
  per_device: bool
  on_device: bool        # the CIFAR step (data on the device) rather than the ImageNet one
  views: tuple = None    # ViewSpecs in place of the config's preset


MULTI = presets.imagenet_multi_crop(224)
TWO_PLUS_FOUR = MULTI[:2] + (MULTI[-1],) * 4  # 2 x 224 + 4 x 96 (the 96-px local crop spec)
CASES = {
    "a": Case("ResNet-50, 2 x 224", "configs/imagenet_r50.py", 256, True, False),
    "b": Case("ResNet-50, 2 x 224 + 4 x 96", "configs/imagenet_r50.py:multicrop", 256, True,
              False, views=TWO_PLUS_FOUR),
    "c": Case("ResNet-18 small stem, 32 px", "configs/cifar10_r18.py", 512, False, True),
    "d": Case("ViT-S/16, 2 x 224", "configs/imagenet_vit_s16.py", 256, True, False),
    "e": Case("ViT-S/16, 2 x 224 + 4 x 96", "configs/imagenet_vit_s16.py:multicrop", 256, True,
              False, views=TWO_PLUS_FOUR),
}


def smoke(case):
  """The same case with tiny shapes that compile and run in seconds on a CPU: crops of a 7th
  of the size, a multiple of 4 (a smoke ViT's patch)."""
  views = case.views and tuple(dataclasses.replace(v, size=v.size // 7 // 4 * 4)
                               for v in case.views)
  return dataclasses.replace(case, batch=4 if case.per_device else 16, views=views)


def case_config(case, small, devices=None, method=None):
  """The case's config (with `method`'s recipe, else the file's method) and views; a per-device
  batch is for `devices` (default: JAX's)."""
  c = sce_config.load(str(ROOT / case.config), method)
  c.unlock()
  c.batch_size = case.batch * ((devices or jax.device_count()) if case.per_device else 1)
  if small:
    c.model.update(trunks.family(c.model).TINY)
    c.model.projector.hidden_dim = c.model.predictor.hidden_dim = 32
    c.model.projector.out_dim = 16
    c.data.image_size //= 7 if c.data.image_size > 32 else 1
    c.data.decode_size //= 7
    c.model.dtype = "float32"
  views, pairs = schema.crops(c, case.views)
  written = c.batch_size * len(losses.target_views(pairs))
  c.sce.queue = max(c.sce.queue // written, 1) * written if not small else 4 * written
  c.data.on_device = case.on_device
  return c, views


def without_colour(views):
  return tuple(dataclasses.replace(v, jitter=0.0, gray=0.0, blur=0.0, solarize=0.0)
               for v in views)


def _inputs(case, config, views, mesh):
  """next_batch() -> the step's input: the same uint8 crops every step (ImageNet step), the same
  decoded images (host_stage=decode), or the next indices into a synthetic resident set (CIFAR
  step)."""
  rng = np.random.default_rng(0)
  n = config.batch_size
  labels = rng.integers(0, 1000, n).astype(np.int32)
  if case.on_device:  # Synthetic images of the crop size, as CIFAR's.
    size = config.data.image_size
    images = rng.integers(0, 256, (4 * n, size, size, 3), np.uint8)
    held = resident.Resident(*(sharding.put(x, sharding.replicated(mesh))
                               for x in (resident.flat(images), np.resize(labels, 4 * n))))
    batches = resident.train_batches(held, global_batch_size=n, seed=0, start_step=0,
                                     mesh=mesh)
    return lambda: next(batches)
  rows = sharding.rows(mesh)
  if config.data.host_stage == "decode":
    shapes = crop.decode_batch_shapes(n, config.data.decode_size)
    size = config.data.decode_size
    batch = {"image": rng.integers(0, 256, *shapes["image"]),
             "full": np.tile(np.array([size * 3 // 4, size], np.int32), (n, 1)),
             "factor": np.ones(*shapes["factor"]), "label": labels}
    batch = {k: sharding.put(x, rows) for k, x in batch.items()}
    return lambda: batch
  batch = {"views": tuple(sharding.put(rng.integers(0, 256, (n, v.size, v.size, 3), np.uint8),
                                       rows) for v in views),
           "label": sharding.put(labels, rows)}
  return lambda: batch


def _flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def measure(case, *, colour, concat, steps, warmup, small, f32_weight_grads=True,
            host_stage="crops", method=None):
  """One row: compile, warm up, time `steps` steps; returns a dict of what was measured."""
  config, views = case_config(case, small, method=method)
  config.model.f32_weight_grads = f32_weight_grads
  config.data.host_stage = host_stage
  if concat is not None:
    config.model.concat_views = concat
  views = views if colour else without_colour(views)
  mesh = sharding.make_mesh()
  parts = train.build(config, mesh, num_classes=1000, steps_per_epoch=1000,
                           on_device=case.on_device, views=views)
  next_batch = _inputs(case, config, views, mesh)
  state = parts.init(jax.random.key(0))
  start = time.perf_counter()
  compiled = parts.step.lower(state, next_batch()).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, metrics = compiled(state, next_batch())
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, next_batch())
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  flops = _flops(compiled)
  tflops, _ = peak(jax.devices()[0].device_kind)
  return {
      "case": case.name, "method": config.method, "batch": config.batch_size,
      "views": [v.size for v in views],
      "colour": colour, "concat_views": config.model.get("concat_views"),
      "f32_weight_grads": f32_weight_grads, "dtype": config.model.dtype,
      "host_stage": "on device" if case.on_device else host_stage,
      "compile_s": round(compile_s, 2), "step_ms": step_s * 1e3, "steps_per_s": 1 / step_s,
      "images_per_s": config.batch_size / step_s, "step_tflop": flops / 1e12,
      "mfu": flops / step_s / (tflops * 1e12) if tflops and flops else None,
      "loss": float(metrics["loss"]), "timed_steps": steps}


def run(cases, *, colours=(True, False), both_concat=True, f32_grads=(True, False), steps=20,
        warmup=3, small=False, log=print, host_stages=("crops",), methods=(None,)):
  """Rows for each case, method (None: the file's), colour setting, model.f32_weight_grads
  setting and data.host_stage (of the cases with a host stage), and with model.concat_views
  off and on where the config has that key and both_concat (else at the config's value)."""
  rows = []
  for key, method in ((k, m) for k in cases for m in methods):
    case = smoke(CASES[key]) if small else CASES[key]
    try:
      has_concat = "concat_views" in sce_config.load(str(ROOT / case.config), method).model
    except sce_config.ConfigError as e:  # no recipe of this method for the case's file
      log(f"({key}) {method}: skipped, {e}")
      continue
    for colour in colours:
      for concat in ((False, True) if has_concat and both_concat else (None,)):
        for f32 in f32_grads:
          for stage in ("crops",) if case.on_device else host_stages:
            row = measure(case, colour=colour, concat=concat, steps=steps, warmup=warmup,
                          small=small, f32_weight_grads=f32, host_stage=stage, method=method)
            rows.append({"key": key, **row})
            log(format_row(rows[-1]))
  return rows


def header():
  kind = jax.devices()[0].device_kind
  tflops, source = peak(kind)
  return {"device_kind": kind, "device_count": jax.device_count(),
          "backend": jax.default_backend(), "jax": jax.__version__, "peak_tflops": tflops,
          "peak_source": source}


TABLE = ("| case | method | batch | colour | concat_views | f32 weight grads | host stage | "
         "compile s | "
         "step ms | steps/s | images/s | TFLOP/step | MFU |\n"
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r):
  mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
  return (f"| ({r['key']}) {r['case']} | {r['method']} | {r['batch']} | "
          f"{'on' if r['colour'] else 'off'} | "
          f"{r['concat_views']} | {'on' if r['f32_weight_grads'] else 'off'} | "
          f"{r['host_stage']} | {r['compile_s']:.0f} | {r['step_ms']:.1f} | "
          f"{r['steps_per_s']:.2f} | {r['images_per_s']:.0f} | {r['step_tflop']:.3g} | {mfu} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="a,b,c,d,e", help="comma-separated: a, b, c, d, e")
  parser.add_argument("--methods", default="",
                      help="comma-separated methods (sce_jax/methods/); default: each file's")
  parser.add_argument("--colour", default="on,off", help="on, off or on,off")
  parser.add_argument("--concat", default="both", choices=("both", "config"),
                      help="model.concat_views off and on, or the config's value")
  parser.add_argument("--f32-weight-grads", default="on,off",
                      help="model.f32_weight_grads: on, off or on,off")
  parser.add_argument("--host-stage", default="crops",
                      help="data.host_stage of the ImageNet cases: crops, decode or crops,decode")
  parser.add_argument("--steps", type=int, default=20, help="timed steps (median)")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
  parser.add_argument("--json", help="write the results here")
  args = parser.parse_args()
  if set(args.host_stage.split(",")) - set(crop.HOST_STAGES):
    parser.error(f"--host-stage {args.host_stage}: choose from {', '.join(crop.HOST_STAGES)}")
  info = header()
  print(f"{info['device_count']} x {info['device_kind']} ({info['backend']}, jax "
        f"{info['jax']}); peak {info['peak_tflops']} TFLOP/s bf16 dense per device")
  print(TABLE)
  rows = run(args.cases.split(","), colours=[c == "on" for c in args.colour.split(",")],
             both_concat=args.concat == "both",
             f32_grads=[g == "on" for g in args.f32_weight_grads.split(",")], steps=args.steps,
             warmup=args.warmup, small=args.smoke, host_stages=args.host_stage.split(","),
             methods=args.methods.split(",") if args.methods else (None,))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({**info, "rows": rows}, indent=1))


if __name__ == "__main__":
  main()
