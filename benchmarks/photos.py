"""Real photographs at ImageNet's usual sizes for the input-pipeline benchmark.

Re-encodes scikit-image's sample photographs (its `skimage.data` images that ship with the
package) as 500x375 and 375x500 JPEGs of quality 90 (4:2:0), ImageNet's most common shapes:
each a random sub-window of 55-100 % of the largest window of that aspect ratio, Lanczos-resized
and flipped at random, in one class folder per photograph. Needs only NumPy, Pillow and
scikit-image, so it runs in any environment that has them:

  python benchmarks/photos.py DIR [--count 256]
  python benchmarks/input_pipeline.py --images-dir DIR --host-only --json FILE
"""
import argparse
import pathlib

import numpy as np
from PIL import Image

COLOUR = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "cat")
GREY = ("camera", "moon", "brick", "grass", "gravel", "coins", "cell")  # Saved as RGB.


def _photographs():
  try:
    from skimage import data  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit("the benchmark's photographs come from scikit-image: `pip install "
                     "scikit-image` (any environment), run `python benchmarks/photos.py DIR`, "
                     "then pass --images-dir DIR") from e
  colour = {name: getattr(data, name)()[..., :3] for name in COLOUR}
  grey = {name: np.repeat(getattr(data, name)()[..., None], 3, -1) for name in GREY}
  return {**colour, **grey}


def make_photos(root, count=256, seed=0):
  """Writes `count` JPEGs as root/<photograph>/<i>.jpg; one in three is portrait (375x500)."""
  rng = np.random.default_rng(seed)
  photos = list(_photographs().items())
  for i in range(count):
    name, pixels = photos[i % len(photos)]
    width, height = (375, 500) if i % 3 == 2 else (500, 375)
    rows, cols = pixels.shape[:2]
    h = min(rows, cols * height / width) * rng.uniform(0.55, 1.0)
    w = h * width / height
    top, left = rng.uniform(0, rows - h), rng.uniform(0, cols - w)
    image = Image.fromarray(pixels).resize((width, height), Image.LANCZOS,
                                           box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    folder = pathlib.Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{i:05d}.jpg", quality=90)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("root", help="folder to write the class folders to")
  parser.add_argument("--count", type=int, default=256)
  args = parser.parse_args()
  make_photos(args.root, args.count)


if __name__ == "__main__":
  main()
