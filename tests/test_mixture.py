"""data.mixture (sources.Mixture): several training sources drawn in proportion to their
weights by grain's mixing law, on both loaders (grain's MapDataset.mix, tf.data's
choose_from_datasets), resumed exactly at a step; its checks; a pretraining run on one, from the
command line, resumes exactly."""
import io
import json
import socket
import sys

import jax
import ml_collections
import numpy as np
import pytest
import scipy.stats
import grain
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from sce_jax import config as sce_config
from sce_jax import metrics, schema
from sce_jax.data import images, pipeline, presets, sources
from tests.conftest import CIFAR10_CLASSES, make_image_folder
from tests.helpers import load_config
from tests.test_main import no_tf, run  # pylint: disable=unused-import  # no_tf: a fixture

LOADERS = ("tf", "grain")
VIEW = presets.ViewSpec(8, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # The crop is the 8x8 image.
# Each source's two classes are solid grey levels: a row's level tells its source (dark: a,
# light: b) and its class (the lighter of a source's two: class y).
LEVELS = {"a": {"x": 30, "y": 80}, "b": {"x": 160, "y": 210}}


def write_folder(root, per_class):
  """root/<class>/<i>.png of 8x8 solid LEVELS[root.name][class] images (PNG: decoded exactly)."""
  for name, n in per_class.items():
    (root / name).mkdir(parents=True)
    for i in range(n):
      Image.fromarray(np.full((8, 8, 3), LEVELS[root.name][name], np.uint8)).save(
          root / name / f"{i}.png")
  return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
  """Source a: 14 images, source b: 6, both in class folders x and y; the sizes differ from the
  weights (0.7, 0.3) by design, so that only the weights can give the proportions."""
  tmp = tmp_path_factory.mktemp("mixture")
  return write_folder(tmp / "a", {"x": 7, "y": 7}), write_folder(tmp / "b", {"x": 3, "y": 3})


def _cfg(mixture, **overrides):
  cfg = dict(source="folder", name="", path="", eval_path="", data_dir=None, train_split="train",
             eval_split="test", image_size=8, loader="auto", shuffle_buffer=64, num_workers=0,
             prefetch=2, cache=False, strict=False, eval_resize=0, eval_interpolation="bilinear",
             host_stage="crops", decode_size=512, labels="auto", cache_dir="", mixture=mixture)
  return ml_collections.ConfigDict({**cfg, **overrides})


@pytest.fixture(scope="module")
def rows():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  return NamedSharding(mesh, P("data"))


def _batches(source, cfg, rows, n, start_step=0):
  it = pipeline.train_iterator(source, cfg, global_batch_size=64, views=(VIEW,), seed=0,
                               start_step=start_step, sharding=rows)
  return [jax.tree.map(np.asarray, next(it)) for _ in range(n)]


@pytest.mark.parametrize("loader", LOADERS)
def test_proportions_labels_and_exact_resume(roots, rows, loader):
  """1024 images of a 0.7/0.3 mixture: the counts of each source pass a chi-square test of the
  weights, the rows follow grain's law on either loader, labels are the class folders' (both
  sources have classes x and y), every image of a source comes once an epoch of it, and the
  stream resumed at step 13 (dozens of epochs of both sources on, inside one of each) equals
  the uninterrupted one. ~3 s of CPU a loader: the 1024 images the test needs."""
  if loader == "tf":
    pytest.importorskip("tensorflow")
  cfg = _cfg(f"folder:{roots[0]}=0.7,folder:{roots[1]}=0.3", loader=loader)
  mixture = sources.Splits(cfg).train
  assert isinstance(mixture, sources.Mixture) and mixture.classes == ["x", "y"]
  batches = _batches(mixture, cfg, rows, 16)
  level = np.concatenate([b["views"][0][:, 0, 0, 0] for b in batches]).astype(int)
  from_b = level > 128
  # Chi-square, 1 degree of freedom: 10.83 is its 99.9 % point. n = 1024 draws: a sampler of
  # the right proportions fails with probability <= 0.001 (grain's law holds every prefix to
  # within one image of its share, so its statistic is ~0); one 10 points off (0.6 or 0.8 for
  # 0.7) has a noncentrality n * 0.1^2 / (0.7 * 0.3) = 48.8, and fails unless a normal
  # deviate falls below 3.29 - sqrt(48.8) = -3.70: probability 1.1e-4.
  n = len(level)
  counts = np.array([n - from_b.sum(), from_b.sum()])
  statistic, p = scipy.stats.chisquare(counts, n * np.array([0.7, 0.3]))
  assert statistic < 10.83 and p > 0.001, counts
  assert np.array_equal(from_b, np.resize(mixture.cycle, n) == 1)  # grain's law, both loaders
  # A 10-point error would fail: the same counts tested against 0.6 / 0.4.
  assert scipy.stats.chisquare(counts, n * np.array([0.6, 0.4]))[0] > 10.83

  labels = np.concatenate([b["label"] for b in batches])
  assert np.array_equal(labels, np.isin(level, [80, 210]).astype(np.int32))
  a_rows = np.flatnonzero(~from_b)[:14]  # The first epoch of source a: 7 images of each class.
  assert np.bincount(labels[a_rows], minlength=2).tolist() == [7, 7]

  again = _batches(mixture, cfg, rows, 1, start_step=13)[0]
  assert all(np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(again), jax.tree.leaves(batches[13])))


@pytest.mark.parametrize("loader", LOADERS)
def test_tfds_and_a_folder(cifar_root, rows, loader, monkeypatch):
  """A TFDS split (mocked) and a folder mix on either loader and resume exactly; TFDS's mock
  names its classes '0'..'9', the folder by name: unlabelled, labels 0."""
  tfds = pytest.importorskip("tensorflow_datasets")
  # mock_data leaves the dataset unprepared, so sources.Tfds first probes TFDS's download host;
  # a test has no network.
  monkeypatch.setattr(socket, "create_connection", lambda address, timeout: io.BytesIO())
  cfg = _cfg(f"tfds:cifar10=0.5,folder:{cifar_root}=0.5", loader=loader, image_size=32)
  with tfds.testing.mock_data(num_examples=40):
    mixture = sources.Splits(cfg).train
    assert [len(p) for p in mixture.parts] == [40, 200] and mixture.num_classes == 0
    batches = _batches(mixture, cfg, rows, 3)
    again = _batches(mixture, cfg, rows, 1, start_step=2)[0]
  assert batches[0]["views"][0].shape == (64, 8, 8, 3) and not batches[0]["label"].any()
  assert all(np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(again), jax.tree.leaves(batches[2])))


def test_drawn_is_grains_index_in_each_source():
  """`Mixture.drawn(p)` (the tf.data streams' resume points) is, for the source grain's mix
  takes position p from, the index grain takes, over three periods of a three-source law."""
  parts = [sources.InMemory(np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4)) for _ in range(3)]
  mixture = sources.Mixture(parts, [0.5, 0.3, 0.2], ["p", "q", "r"])
  tagged = grain.MapDataset.mix(
      [grain.MapDataset.range(10**9).map(lambda i, k=k: (k, i)) for k in range(3)],
      mixture.proportions)
  period = len(mixture.cycle)
  assert period == 10 and mixture.drawn(period).tolist() == [5, 3, 2]
  for position in range(3 * period):
    k, index = tagged[position]
    assert mixture.drawn(position)[k] == index, position


def test_unlabelled_when_classes_differ(roots, tmp_path, rows):
  """A source of other classes (or none) makes the mixture unlabelled: labels 0. A mixture's
  evaluations read eval.data, which a labelled one's must share its classes with."""
  flat = tmp_path / "b"
  write_folder(flat, {"x": 2})  # one class folder: no classes (folders.choose_labels)
  cfg = _cfg(f"folder:{roots[0]}=1,folder:{flat}=1", loader="grain")
  splits = sources.Splits(cfg)
  assert splits.num_classes == 0
  assert not _batches(splits.train, cfg, rows, 1)[0]["label"].any()
  with pytest.raises(images.DataError, match="^data.mixture has no evaluation split of its"):
    splits.eval  # pylint: disable=pointless-statement
  cfg = _cfg(f"folder:{roots[0]}=1,folder:{roots[1]}=2")
  labelled = sources.Splits(cfg)
  assert labelled.num_classes == 2
  given = lambda path: ml_collections.ConfigDict(dict(path=str(path), name=""))
  assert sources.labelled(labelled, cfg, given("")) is None
  assert sources.labelled(labelled, cfg, given(roots[1])).train.classes == ["x", "y"]
  with pytest.raises(images.DataError, match="has other classes than data.mixture"):
    sources.labelled(labelled, cfg, given(tmp_path))  # b/x: one class, x
  assert sources.labelled(splits, cfg, given(tmp_path)).train.classes == ["x"]


@pytest.mark.parametrize("mixture,message", [
    ("folder:{a}=0.7", "names one source; name two or more"),
    ("folder:{a}=0.7,folder:{b}=0", "'folder:{b}=0' has no positive weight"),
    ("folder:{a}=-1,folder:{b}=1", "'folder:{a}=-1' has no positive weight"),
    ("folder:{a},folder:{b}=1", "'folder:{a}' is not KIND:WHAT=WEIGHT"),
    ("{a}=1,folder:{b}=1", "'{a}=1' is not KIND:WHAT=WEIGHT with KIND one of folder, tfds"),
    ("memory:train=1,folder:{b}=1", "is not KIND:WHAT=WEIGHT"),
    ("folder:{a}=1,folder:{a}/missing=1", "data.mixture's folder:{a}/missing does not exist"),
])
def test_config_errors(roots, mixture, message):
  """One line each, naming the item and the fix."""
  config = load_config("cifar10_r18", "smoke")
  config.data.mixture = mixture.format(a=roots[0], b=roots[1])
  with pytest.raises(sce_config.ConfigError) as e:
    schema.validate(config, 8, 1)
  assert message.format(a=roots[0], b=roots[1]) in str(e.value) and "\n" not in str(e.value)
  assert "--config.data.mixture" in str(e.value) or "data.path" in str(e.value)


def test_path_beside_a_mixture_and_sizes_that_differ(roots):
  config = load_config("cifar10_r18", "smoke")
  config.data.update(mixture=f"folder:{roots[0]}=1,folder:{roots[1]}=1", path=str(roots[0]))
  with pytest.raises(sce_config.ConfigError, match="both name the training data"):
    schema.validate(config, 8, 1)
  small, large = (sources.InMemory(np.zeros((2, s, s, 3), np.uint8), [0, 1]) for s in (8, 16))
  with pytest.raises(images.DataError, match=r"differ in size \(p 8x8, q 16x16\)"):
    sources.Mixture([small, large], [1, 1], ["p", "q"])


@pytest.mark.slow  # three starts of the command line, the first compiling (~60 s of CPU)
def test_smoke_run_on_a_mixture_resumes_exactly(cifar_root, no_tf, tmp_path):
  """`python -m sce_jax.main` with the smoke config on a mixture of the CIFAR-like slice (0.7)
  and a second class tree of the same classes (0.3): 4 steps whole, and 2 then resumed to 4,
  log the same metrics; the mixture is labelled, so the online probe trains. The later starts
  load the step from the persistent compilation cache: the same executable."""
  other = make_image_folder(tmp_path / "other", {"train": 2}, CIFAR10_CLASSES, seed=1)
  mixture = f"folder:{cifar_root}=0.7,folder:{other}=0.3"
  # One device (the cache does not depend on the count, and one compiles faster); cache even
  # a fast compile.
  env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_NUM_CPU_DEVICES": "1"}

  def start(workdir, max_steps):
    return run([sys.executable, "-m", "sce_jax.main", "--config=configs/cifar10_r18.py:smoke",
                f"--config.data.mixture={mixture}", f"--workdir={tmp_path / workdir}",
                f"--config.compile_cache_dir={tmp_path / 'xla'}", "--config.log_every_steps=1",
                "--config.checkpoint.every_steps=2", f"--config.max_steps={max_steps}"],
               no_tf, env=env, timeout=1200)  # a hang guard for a loaded box

  assert "data.mixture: folder:" in start("whole", 4)
  start("split", 2)
  assert "Restored step 2 from" in start("split", 4)
  a, b = metrics.read(tmp_path / "whole"), metrics.read(tmp_path / "split")
  compared = ("loss", "probe_loss", "pos_sim", "grad_norm", "lr")
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  for step in a:
    assert {k: a[step][k] for k in compared} == {k: b[step][k] for k in compared}, step
  recorded = json.loads((tmp_path / "split" / "config.json").read_text())
  assert recorded["data"]["mixture"] == mixture
