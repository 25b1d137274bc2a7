"""A learning check at small budget (issue 26, section 3): does every method learn?

For each method of `sce_jax.methods.METHODS` (or --methods): pretrain on a CIFAR-10 subset with
the method's CIFAR recipe (configs/cifar10_r18.py with method=NAME, `sce_jax.config.load`)
shrunk to a CPU budget, then kNN top-1 on the test subset; and the same run with the learning
rate at its baseline (`optim.base_lr` 0 where schema.py allows it, else 1e-12, the smallest
power of ten that leaves the weights at their init within float32's resolution; BatchNorm's
running statistics still follow the data, so the baseline is the random network, not an
unnormalised one). Each run is one process of the command line, `python -m sce_jax.main`,
whose end-of-training evaluation (eval.knn.every_epochs=0) is `evaluators.knn.evaluate`, the
function --mode=knn calls, on the final state (a second process for --mode=knn would cost
another minute of start-up per run on a loaded 2-core box).

The budget, the same for every method and applied over its recipe: ResNet-18 of --width, float32,
--batch images a step for --steps steps (epochs: what those steps cover, so the schedules end
with the run when --steps is a whole number of epochs; no warm-up: the recipes' 5-10 of
200-1000 epochs, scaled to the budget's, are under one step), XLA optimisation level 0
(--fast-compile; a compilation takes about a minute on a loaded 2-core box), the queue capped at
--max-queue (the recipes' 32,768-65,536 would outlast the subset's epoch and hold keys of the
current batch's own images), kNN only at the end. The subset: the first --train-images /
--test-images of the two archives, as many of each class, extracted once into --cache as class
folders.

  python benchmarks/learning_check.py --methods sce,byol --steps 10    # check it runs
  nice -n 5 python benchmarks/learning_check.py                          # all methods

Prints a Markdown table and writes JSON (default benchmarks/results/learning_check_<date>.json).
"""
import argparse
import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# pylint: disable=wrong-import-position
from sce_jax import config as sce_config  # noqa: E402
from sce_jax import methods, schema  # noqa: E402

DATA = (ROOT / ".data" / "cifar10" / "cifar10_jpg_train.tar.gz",
        ROOT.parent / "shared" / "data" / "cifar10" / "cifar10_jpg_train.tar.gz")
CONFIG = "configs/cifar10_r18.py"
CLASSES = 10


def baseline_lr():
  """0 if schema.py allows it for optim.base_lr, else 1e-12 (it asks for > 0)."""
  allowed, _ = schema.RANGES["optim.base_lr"]
  return 0.0 if allowed(0.0) else 1e-12


def subset(archive, cache, num_train, num_test):
  """<cache>/<num_train>_<num_test>/{train,test}/<class>/*.jpg: the first images of each class
  of the train archive and of the test archive beside it, num / 10 each; extracted once."""
  root = pathlib.Path(cache) / f"{num_train}_{num_test}"
  if (root / "done").is_file():
    return root
  shutil.rmtree(root, ignore_errors=True)
  for split, count in (("train", num_train), ("test", num_test)):
    path = pathlib.Path(str(archive).replace("train", split)) if split == "test" else archive
    taken = {}
    with tarfile.open(path) as tar:
      for member in tar:
        parts = pathlib.PurePosixPath(member.name).parts
        if not member.isfile() or len(parts) != 3 or not parts[2].endswith(".jpg"):
          continue
        if taken.get(parts[1], 0) >= count // CLASSES:
          continue
        taken[parts[1]] = taken.get(parts[1], 0) + 1
        out = root / split / parts[1] / parts[2]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(tar.extractfile(member).read())
    if len(taken) != CLASSES or min(taken.values()) < count // CLASSES:
      raise SystemExit(f"{path}: expected {CLASSES} classes of {count // CLASSES} images, got "
                       f"{taken}")
  (root / "done").write_text("")
  return root


def overrides(method, args, lr):
  """--config.KEY=VALUE of the budget over method's CIFAR recipe (read with config.load)."""
  recipe = sce_config.load(CONFIG, method=method)
  epochs = -(-args.steps * args.batch // args.train_images)  # covers the steps
  values = {"model.width": args.width, "model.dtype": "float32", "batch_size": args.batch,
            "epochs": epochs, "max_steps": args.steps, "optim.warmup_epochs": 0,
            "sce.queue": min(recipe.sce.queue, args.max_queue), "eval.knn.every_epochs": 0,
            "eval.probe.every_epochs": -1, "checkpoint.every_steps": args.steps,
            "log_every_steps": max(1, args.steps // 10), "fast_compile": args.fast_compile,
            "data.cache": False}
  if lr is not None:
    values["optim.base_lr"] = lr
  return [f"--config.{k}={v}" for k, v in values.items()], recipe.optim.base_lr


def run(cmd, log, timeout):
  """Runs cmd from the checkout's root, its output appended to `log`; (exit code or None when
  stopped at `timeout`, seconds)."""
  log.write(f"\n$ {' '.join(cmd)}\n")
  log.flush()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  env.pop("JAX_NUM_CPU_DEVICES", None)
  start = time.monotonic()
  try:
    code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                          timeout=timeout, check=False).returncode
  except subprocess.TimeoutExpired:
    code = None
  return code, round(time.monotonic() - start, 1)


def one_run(method, variant, lr, args, data, log):
  """Pretraining and its final kNN in a fresh workdir; the row's figures."""
  workdir = pathlib.Path(args.work) / method / variant
  shutil.rmtree(workdir, ignore_errors=True)
  flags, recipe_lr = overrides(method, args, lr)
  common = [sys.executable, "-m", "sce_jax.main", f"--config={CONFIG}",
            f"--config.method={method}", f"--workdir={workdir}",
            f"--config.data.path={data / 'train'}", f"--config.data.eval_path={data / 'test'}",
            *flags]
  row = {"method": method, "variant": variant, "base_lr": recipe_lr if lr is None else lr}
  code, row["seconds"] = run(common, log, args.timeout)
  records = []
  if (workdir / "metrics.jsonl").is_file():
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r for r in records if "loss" in r]
  knn = [r["knn_top1"] for r in records if "knn_top1" in r]
  row.update(exit=code, steps=max((r["step"] for r in losses), default=0),
             final_loss=losses[-1]["loss"] if losses else None,
             knn_top1=knn[-1] if knn else None)
  return row


def table(rows):
  lines = ["| method | kNN top-1 trained | baseline (lr ~ 0) | difference | final loss | "
           "baseline loss | steps | seconds (trained, baseline) |", "|---" * 8 + "|"]
  fmt = lambda v, f: "-" if v is None else format(v, f)
  for method in dict.fromkeys(r["method"] for r in rows):
    t = next((r for r in rows if r["method"] == method and r["variant"] == "trained"), {})
    b = next((r for r in rows if r["method"] == method and r["variant"] == "baseline"), {})
    diff = (t["knn_top1"] - b["knn_top1"]
            if t.get("knn_top1") is not None and b.get("knn_top1") is not None else None)
    seconds = f"{fmt(t.get('seconds'), '.0f')}, {fmt(b.get('seconds'), '.0f')}"
    lines.append(f"| {method} | {fmt(t.get('knn_top1'), '.3f')} | {fmt(b.get('knn_top1'), '.3f')}"
                 f" | {fmt(diff, '+.3f')} | {fmt(t.get('final_loss'), '.4f')} | "
                 f"{fmt(b.get('final_loss'), '.4f')} | {t.get('steps', '-')} | {seconds} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default=",".join(methods.METHODS),
                      help="comma-separated (default: every method of sce_jax.methods.METHODS)")
  parser.add_argument("--steps", type=int, default=78, help="78: one epoch of 5,000 at 64")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--width", type=int, default=8, help="ResNet-18's first width (64 in full)")
  parser.add_argument("--max-queue", type=int, default=4096)
  parser.add_argument("--train-images", type=int, default=5000)
  parser.add_argument("--test-images", type=int, default=1000)
  parser.add_argument("--fast-compile", action=argparse.BooleanOptionalAction, default=True,
                      help="XLA optimisation level 0 (config.fast_compile)")
  parser.add_argument("--data", help="CIFAR-10 train archive, the test archive beside it "
                      "(default: .data/cifar10/ or ../shared/data/cifar10/)")
  parser.add_argument("--cache", default="/tmp/sce_cifar_subset", help="the extracted subset")
  parser.add_argument("--work", default="/tmp/sce_learning_check", help="the runs' workdirs")
  parser.add_argument("--log", default="/tmp/learn_runs.log", help="the runs' output")
  parser.add_argument("--timeout", type=float, default=3600, help="seconds per process")
  parser.add_argument("--json", help="default benchmarks/results/learning_check_<date>.json")
  args = parser.parse_args()
  names = args.methods.split(",")
  unknown = [m for m in names if m not in methods.METHODS]
  if unknown:
    parser.error(f"unknown methods {unknown}; known: {', '.join(methods.METHODS)}")
  archive = args.data or next((str(p) for p in DATA if p.is_file()), None)
  if archive is None:
    parser.error(f"no CIFAR-10 archive at {[str(p) for p in DATA]}; pass --data")
  data = subset(archive, args.cache, args.train_images, args.test_images)
  date = datetime.datetime.now(datetime.timezone.utc)
  out = {"date": date.isoformat(timespec="seconds"), "command": " ".join(sys.argv),
         "load_average": os.getloadavg(), "cpus": os.cpu_count(), "subset": str(data),
         "baseline_lr": baseline_lr(), "args": vars(args), "rows": []}
  path = pathlib.Path(args.json or ROOT / "benchmarks" / "results" /
                      f"learning_check_{date:%Y-%m-%d}.json")
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(args.log, "a") as log:
    for method in names:
      for variant, lr in (("trained", None), ("baseline", baseline_lr())):
        row = one_run(method, variant, lr, args, data, log)
        out["rows"].append(row)
        out["load_average_end"] = os.getloadavg()
        path.write_text(json.dumps(out, indent=1))  # after each run: a stopped check keeps them
        print(json.dumps(row), flush=True)
  print(table(out["rows"]))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
