"""Cost of the transfer protocol (docs/SCE.md section 9): feature extraction and the solver.

Measured on this machine:
* a small trunk (ResNet-18 with the 3x3 stem, --width, random weights: speed does not depend
  on them) on a class-folder archive (default: the CIFAR-10 JPEG archive beside the checkout,
  --limit images of each split): extraction images/s of `common.extract_features` after its
  compilation, and the wall time of the whole protocol (`transfer._solve`: the 45-value grid
  fitted on 80 % of train and scored on 20 %, the refit on train, the test score);
* scikit-learn's L-BFGS logistic regression on ResNet-50-size features (synthetic, 2048-d,
  --solver-rows rows, 100 classes): seconds per iteration;
* the FLOPs of a ResNet-50 forward at 224 px, from XLA's cost analysis.

Projected, not measured (no accelerator was used): for each of ssl-transfer's 11 sets, the
extraction time on one accelerator (the images at the lower of --mfu x --peak-tflops / FLOPs
and the host stage's --host-rate images/s) and the solver's upper bound (every fit running
all max_iter iterations, the measured seconds per iteration scaled by rows x classes).

  python benchmarks/transfer.py --json benchmarks/results/transfer_cpu.json
"""
# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")  # compile in seconds
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # This checkout's sce_jax.

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sce_jax import config as sce_config
from sce_jax import models, sharding
from sce_jax.data import sources
from sce_jax.evaluators import common, transfer

ROOT = pathlib.Path(__file__).resolve().parents[1]
# ssl-transfer's sets: (train, validation or 0, test) images, classes (VOC2007: 20 binary fits).
SETS = {"food101": (75750, 0, 25250, 101), "cifar10": (50000, 0, 10000, 10),
        "cifar100": (50000, 0, 10000, 100), "sun397": (19850, 0, 19850, 397),
        "cars196": (8144, 0, 8041, 196), "aircraft": (3334, 3333, 3333, 100),
        "voc/2007": (2501, 2510, 4952, 20), "dtd": (1880, 1880, 1880, 47),
        "oxford_iiit_pet": (3680, 0, 3669, 37), "caltech101": (3060, 0, 6084, 102),
        "oxford_flowers102": (1020, 1020, 6149, 102)}


def _config(args):
  config = sce_config.base()
  config.model.width = args.width
  config.model.dtype = "float32"
  config.data.cache_dir = args.cache_dir
  config.eval.batch_size = args.batch
  return config


def _limited(source, n, seed=0):
  """The first n of a seeded permutation of `source`, in order."""
  if n <= 0 or n >= source.num_examples:
    return source
  return sources.subset(source, np.sort(np.random.default_rng(seed).permutation(
      source.num_examples)[:n]))


def small_trunk(args):
  """Extraction and solver time of the protocol for a small trunk on the archive."""
  config = _config(args)
  trunk = models.make_trunk(config.model)
  variables = jax.jit(trunk.init, static_argnames="train")(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  cfg = common.data_config(config.data, path=args.archive, cache=False)
  splits = sources.Splits(cfg)
  mesh = sharding.make_mesh()
  out = {}
  feats = {}
  for split, source in (("train", splits.train), ("test", splits.eval)):
    source = _limited(source, args.limit)
    warm = time.perf_counter()
    common.extract_features(trunk, variables, _limited(source, args.batch), cfg,
                            batch_size=args.batch, mesh=mesh)  # compiles
    warm = time.perf_counter() - warm
    start = time.perf_counter()
    feats[split] = common.extract_features(trunk, variables, source, cfg,
                                           batch_size=args.batch, mesh=mesh)
    seconds = time.perf_counter() - start
    out[f"extract_{split}"] = {"images": source.num_examples, "seconds": seconds,
                               "images_per_s": source.num_examples / seconds,
                               "first_batch_with_compile_s": warm}
  start = time.perf_counter()
  result = transfer._solve("cifar10", feats, config)  # pylint: disable=protected-access
  out["solver"] = {"seconds": time.perf_counter() - start, "fits": config.eval.transfer.wd_values
                   + 1, "feature_dim": int(feats["train"][0].shape[1]),
                   "sizes": result["sizes"], "value": result["value"]}
  return out


def solver_rate(args):
  """Seconds per L-BFGS iteration of scikit-learn's multinomial logistic regression on
  synthetic 2048-d features, --solver-rows rows, 100 classes."""
  from sklearn.linear_model import LogisticRegression
  rng = np.random.default_rng(0)
  n, d, c = args.solver_rows, 2048, 100
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.integers(0, c, n)
  start = time.perf_counter()
  clf = LogisticRegression(C=1.0, max_iter=100, tol=0.0).fit(x, y)
  seconds = time.perf_counter() - start
  iterations = int(np.max(clf.n_iter_))
  return {"rows": n, "dim": d, "classes": c, "iterations": iterations, "seconds": seconds,
          "seconds_per_iteration": seconds / iterations,
          "ns_per_row_dim_class_iteration": seconds / iterations / (n * d * c) * 1e9}


def resnet50_flops():
  """XLA's FLOPs of one ResNet-50 inference forward at 224 px (batch 8, per image)."""
  model = ml_collections.ConfigDict(dict(trunk="resnet50", width=64, small_stem=False,
                                         dtype="bfloat16"))
  trunk = models.make_trunk(model)
  x = jnp.zeros((8, 224, 224, 3))
  variables = jax.eval_shape(lambda: trunk.init(jax.random.key(0), x[:1], train=False))
  cost = jax.jit(lambda v, x: trunk.apply(v, x, train=False)).lower(variables, x).compile(
      ).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"] / 8


def projection(flops, per_iteration_ns, args):
  """Per set: projected extraction seconds on one accelerator and the solver's upper bound."""
  accel_rate = args.mfu * args.peak_tflops * 1e12 / flops
  rate = min(accel_rate, args.host_rate)
  rows = {}
  for name, (train, val, test, classes) in SETS.items():
    images = train + val + test
    fit_rows = train * (1 - 0.2) if not val else train  # the grid's training rows
    per_class = 1 if name == "voc/2007" else classes  # VOC: 20 binary fits of one vector
    fits = classes if name == "voc/2007" else 1
    grid = 45 * fits * fit_rows * per_class + fits * (train + val) * per_class
    rows[name] = {"images": images, "extract_s": images / rate,
                  "solver_upper_bound_s": grid * 2048 * 100 * per_iteration_ns * 1e-9}
  return {"accelerator_images_per_s": accel_rate, "images_per_s": rate, "sets": rows}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--archive", default=str(
      ROOT.parent / "shared/data/cifar10/cifar10_jpg_train.tar.gz"))
  parser.add_argument("--cache-dir", default="~/.cache/sce_jax")
  parser.add_argument("--width", type=int, default=16, help="ResNet-18 width (64: full)")
  parser.add_argument("--limit", type=int, default=10000, help="images of each split (0: all)")
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--solver-rows", type=int, default=4000)
  parser.add_argument("--mfu", type=float, default=0.4, help="assumed, for the projection")
  parser.add_argument("--peak-tflops", type=float, default=989.0,
                      help="dense bf16 peak of the accelerator (H100 SXM: 989)")
  parser.add_argument("--host-rate", type=float, default=16 * 300.0,
                      help="host stage images/s (16 cores x ~300 a CPU-second, RESULTS.md)")
  parser.add_argument("--json", help="also write the figures to this file")
  args = parser.parse_args()

  result = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs, {jax.default_backend()}",
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
            "small_trunk": small_trunk(args), "solver": solver_rate(args)}
  result["resnet50_flops_per_image"] = resnet50_flops()
  result["projection"] = projection(result["resnet50_flops_per_image"],
                                    result["solver"]["ns_per_row_dim_class_iteration"], args)

  small = result["small_trunk"]
  print(f"\nMeasured, ResNet-18 (3x3 stem) width {args.width}, 32 px, {result['machine']}\n")
  print("| step | images | seconds | images/s |\n|---|---|---|---|")
  for split in ("train", "test"):
    e = small[f"extract_{split}"]
    print(f"| extract {split} | {e['images']} | {e['seconds']:.1f} | {e['images_per_s']:.0f} |")
  s = small["solver"]
  print(f"| solver: {s['fits']} L-BFGS fits, {s['feature_dim']}-d | {s['sizes']['trainval']} "
        f"| {s['seconds']:.1f} | |")
  r = result["solver"]
  print(f"\nscikit-learn L-BFGS, {r['rows']} x {r['dim']}, {r['classes']} classes: "
        f"{r['seconds_per_iteration']:.3f} s an iteration "
        f"({r['ns_per_row_dim_class_iteration']:.3f} ns per row x dim x class)")
  p = result["projection"]
  print(f"\nProjected (not measured): ResNet-50 at 224 px, "
        f"{result['resnet50_flops_per_image'] / 1e9:.2f} GFLOP an image (XLA); accelerator "
        f"{p['accelerator_images_per_s']:.0f} images/s at MFU {args.mfu} of "
        f"{args.peak_tflops:.0f} TFLOP/s, host {args.host_rate:.0f}: {p['images_per_s']:.0f} "
        "images/s\n")
  print("| set | images | extraction s | solver s (upper bound, this CPU) |\n|---|---|---|---|")
  for name, row in p["sets"].items():
    print(f"| {name} | {row['images']} | {row['extract_s']:.0f} | "
          f"{row['solver_upper_bound_s']:.0f} |")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  main()
