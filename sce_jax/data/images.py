"""Image files: decoding, and the errors of data that cannot be read (docs/SCE.md 6).

Records hold encoded bytes (class folders, archives; with the file's 'name') or a decoded uint8
(H, W, 3) array; `decode` turns either into a PIL image, and `decode_or_placeholder` puts a
black pixel in place of a file that cannot be decoded, for the pipelines to skip (pipeline.py).
"""
import concurrent.futures
import io
import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class DataError(ValueError):
  """Data that cannot be read as configured; the message names the key to set."""


class UndecodableImage(ValueError):
  """An image file that cannot be decoded (corrupt, truncated, empty, not an image)."""

  def __init__(self, name, cause):
    super().__init__(f"cannot decode image {name}: {cause}")
    self.name = name


# What stands in for an undecodable image until the pipeline skips it: one black pixel.
PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)


def decode(record, draft=None, into=None) -> Image.Image:
  """The record's image as an RGB PIL image; UndecodableImage names the file when it cannot be
  decoded.

  draft: optional `(width, height) -> (w, h) or None`, called with the encoded image's size
  before decoding; a JPEG is then decoded by libjpeg at 1/2, 1/4 or 1/8 scale, as small as it
  can be while still at least (w, h) (`PIL.Image.Image.draft`).
  into: optional C-contiguous uint8 (H, W, 4) array; an image that fits it is also left in its
  top-left corner as RGBX (the RGB bytes and a fourth of 255: Pillow's own layout of RGB
  pixels). An RGB JPEG is decoded straight there, with no copy: `load` decodes into the image
  memory it finds, which Pillow's own loader maps onto a file the same way (ImageFile.load);
  packing RGBX into RGB bytes (`np.asarray`) would cost ~60 % of the decode again
  (benchmarks/RESULTS.md, issue 31). Other images are copied there.
  """
  image = record["image"]
  if not isinstance(image, bytes):
    im = Image.fromarray(np.asarray(image, np.uint8))
  else:
    try:
      im = Image.open(io.BytesIO(image))
      size = draft(*im.size) if draft is not None else None
      if size:
        im.draft("RGB", size)
      if _fits(im, into) and im.format == "JPEG" and im.mode == "RGB":
        im.im = Image.core.map_buffer(into, im.size, "raw", 0, ("RGB", into.strides[0], 1))
        into = None  # Decoded in place.
      im.load()
      im = im if im.mode == "RGB" else im.convert("RGB")  # No copy when already RGB.
    except (OSError, SyntaxError, ValueError) as e:
      raise UndecodableImage(record.get("name", "<bytes>"), e) from e
  if _fits(im, into):
    into[:im.height, :im.width] = np.asarray(im.convert("RGBX"))
  return im


def _fits(image, into):
  return into is not None and image.height <= into.shape[0] and image.width <= into.shape[1]


def decode_or_placeholder(record, draft=None, into=None) -> tuple[Image.Image, str]:
  """(image, '') as `decode`, or (PLACEHOLDER, the file's name) for an undecodable image, with
  `into` then all zeros (a failed decode may have left part of the image there). A decoded
  record that already stands in for one keeps its name in 'skipped'."""
  try:
    return decode(record, draft, into), record.get("skipped", "")
  except UndecodableImage as e:
    if into is not None:
      into[...] = 0
    return Image.fromarray(PLACEHOLDER), e.name


def decode_into(images, records, labels=None):
  """images[i] = the decoded image of records[i] (and labels[i] its label, if given), for every
  i < len(images), on every core (Pillow decodes without the GIL). A DataError names the first
  image whose size is not images' (H, W)."""
  def put(i):
    record = records[i]
    image = np.asarray(decode(record))
    if image.shape != images.shape[1:]:
      raise DataError(f"image {record.get('name', i)} is {image.shape[1]}x{image.shape[0]}, not "
                      f"{images.shape[2]}x{images.shape[1]} like the others")
    images[i] = image
    if labels is not None:
      labels[i] = record["label"]

  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    list(pool.map(put, range(len(images))))
