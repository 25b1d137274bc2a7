"""Start-up cost of a large image folder: the file list, without and with its cache.

Writes a folder of N small JPEGs (one 8x8 image's bytes in every file; only the listing is
measured), as class folders (`root/<class>/<image>`, ImageNet's shape: 1000 classes) or flat
(`root/<image>`, unlabelled), ages its folders by an hour (as a set copied before a run is), then
opens it as a run does (`sources.Splits`: data.labels=auto, the listing, the labels) in a fresh
process each time: without the cache (data.cache_dir=''), then the cache's first start (it lists
and writes the cache) and second start (it reads it back after one stat a folder). Per start:
seconds in `Splits`, the process's peak resident memory, and its increase over the imports'.

  python benchmarks/file_list.py --files 200000 --json /tmp/file_list.json [--dir DIR]

--dir keeps the generated folders in DIR and reuses those already there (generating 200,000
files takes minutes on a loaded machine).
"""
# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import io
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # This checkout's sce_jax.

_CHILD = """
import resource, sys, time
from sce_jax import config
from sce_jax.data import sources
cfg = config.base().data
cfg.path, cfg.cache_dir = sys.argv[1], sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
splits = sources.Splits(cfg)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(seconds, peak / 1024, (peak - before) / 1024, splits.train.num_examples,
      splits.num_classes)
"""


def make_folder(root, files, classes):
  """`files` copies of one 8x8 JPEG under root, in `classes` class folders (0: flat); a folder
  already complete (its `.done` marker) is kept."""
  if (root.parent / f".{root.name}.done").exists():
    return
  from PIL import Image
  buf = io.BytesIO()
  Image.new("RGB", (8, 8), (120, 60, 30)).save(buf, "JPEG")
  data = buf.getvalue()
  folders = [root / f"n{c:08d}" for c in range(classes)] if classes else [root]
  for folder in folders:
    folder.mkdir(parents=True, exist_ok=True)
  for i in range(files):
    (folders[i % len(folders)] / f"{i:07d}.jpg").write_bytes(data)
  (root.parent / f".{root.name}.done").touch()
  old = time.time() - 3600
  for folder in [root, *folders]:
    os.utime(folder, (old, old))


def start(path, cache_dir):
  out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(cache_dir)], cwd=ROOT,
                       check=True, capture_output=True, text=True).stdout.split()
  seconds, peak, added, n, classes = map(float, out)
  return dict(seconds=round(seconds, 3), peak_rss_mb=round(peak), added_rss_mb=round(added),
              images=int(n), classes=int(classes))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--files", type=int, default=200_000)
  parser.add_argument("--classes", type=int, default=1000)
  parser.add_argument("--json")
  parser.add_argument("--dir", help="keep (and reuse) the generated folders here")
  args = parser.parse_args()
  rows = []
  print("| layout | start | seconds in Splits | peak RSS (MB) | RSS added (MB) | images | classes |")
  print("|---|---|---|---|---|---|---|", flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(args.dir or tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    for layout, classes in (("class folders", args.classes), ("flat", 0)):
      data = tmp / f"{layout.replace(' ', '_')}_{args.files}"
      cache = pathlib.Path(tempfile.mkdtemp(dir=tmp, prefix="cache_"))
      t = time.perf_counter()
      make_folder(data, args.files, classes)
      print(f"wrote {args.files} files ({layout}) in {time.perf_counter() - t:.0f} s",
            file=sys.stderr)
      for what, cache_dir in (("no cache", ""), ("cache, first start", cache),
                              ("cache, second start", cache)):
        r = dict(layout=layout, start=what, **start(data, cache_dir))
        rows.append(r)
        print(f"| {r['layout']} | {r['start']} | {r['seconds']} | {r['peak_rss_mb']} | "
              f"{r['added_rss_mb']} | {r['images']} | {r['classes']} |", flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(dict(
        files=args.files, classes=args.classes, machine=platform.platform(),
        cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d"), rows=rows), indent=2))


if __name__ == "__main__":
  main()
