"""Config files (docs/SCE.md section 5), variants, and `validate`'s message for each bad input."""
import functools
import io
import os
import socket
import subprocess
import sys
import urllib.request

import flax.traverse_util
import ml_collections
import pytest

from sce_jax import config as sce_config
from sce_jax import schema, train
from sce_jax.data import images, presets, sources
from tests.helpers import CONFIGS, load_config

ROOT = CONFIGS.parent


def spec_values(c):
  return (c.batch_size, c.optim.name, c.optim.weight_decay, c.optim.base_lr,
          c.optim.warmup_epochs, c.epochs, c.sce.temp, c.sce.temp_m, c.sce.coeff, c.sce.queue,
          c.sce.m0, c.sce.m_schedule)


@pytest.mark.parametrize("arg, expected", [
    ("epochs=100", (4096, "lars", 1e-6, 0.6, 10, 100, 0.1, 0.07, 0.5, 65536, 0.99, "cosine")),
    (None, (4096, "lars", 1e-6, 0.3, 10, 200, 0.1, 0.07, 0.5, 65536, 0.99, "cosine")),
    ("epochs=300", (4096, "lars", 1e-6, 0.3, 10, 300, 0.1, 0.07, 0.5, 65536, 0.99, "cosine")),
    ("epochs=1000", (4096, "lars", 1.5e-6, 0.3, 10, 1000, 0.1, 0.07, 0.5, 65536, 0.99,
                     "cosine")),
    ("multicrop,epochs=200", (4096, "lars", 1e-6, 0.3, 10, 200, 0.1, 0.07, 0.5, 65536, 0.99,
                              "cosine")),
])
def test_imagenet_published_values(arg, expected):
  c = load_config("imagenet_r50", arg)
  assert spec_values(c) == expected
  assert (c.model.trunk, c.model.small_stem, c.model.dtype) == ("resnet50", False, "bfloat16")
  assert c.sce.symmetric and c.data.name == "imagenet2012" and c.data.image_size == 224
  multicrop = arg is not None and "multicrop" in arg
  assert c.model.projector.hidden_dim == (4096 if multicrop else 2048)
  assert c.data.views == ("imagenet_multi_crop" if multicrop else "imagenet_two_crop")
  assert (c.model.projector.num_layers, c.model.projector.out_dim, c.model.projector.last_bn,
          c.model.predictor.hidden_dim, c.model.predictor.out_dim) == (3, 256, True, 4096, 256)


def test_cifar10_published_values():
  c = load_config("cifar10_r18")
  assert spec_values(c) == (256, "sgd", 5e-4, 0.06, 5, 200, 0.1, 0.05, 0.5, 4096, 0.99,
                            "constant")
  assert c.model.small_stem and not c.sce.symmetric


@pytest.mark.parametrize("arg", [None, "vit_b16", "multicrop", "vit_b16,multicrop,epochs=100"])
def test_imagenet_vit_values(arg):
  """docs/SCE.md 10: MoCo v3's batch 4096, 300 epochs, 40 warm-up epochs, lr 1.5e-4 x batch /
  256, wd 0.1, sin-cos positions, frozen patch projection; eztorch's AdamW betas and eps, norm 1
  clipping, drop path 0.1, GELU heads without norm, temp 0.1 / 0.07, queue 65536, cosine m."""
  c = load_config("imagenet_vit_s16", arg)
  epochs = 100 if arg and "epochs=100" in arg else 300
  assert spec_values(c) == (4096, "adamw", 0.1, 1.5e-4, 40, epochs, 0.1, 0.07, 0.5, 65536,
                            0.99, "cosine")
  m = c.model
  assert m.trunk == ("vit_base" if arg and "vit_b16" in arg else "vit_small")
  assert (m.patch_size, m.pos_embed, m.freeze_patch_embed, m.drop_path, m.pool) == (
      16, "sincos", True, 0.1, "cls")
  assert (tuple(c.optim.betas), c.optim.eps, c.optim.clip_norm) == ((0.9, 0.999), 1e-8, 1.0)
  assert (m.projector.num_layers, m.projector.hidden_dim, m.projector.out_dim,
          m.projector.norm, m.projector.activation, m.projector.last_bias) == (
              3, 2048, 256, "none", "gelu", True)
  assert (m.predictor.num_layers, m.predictor.hidden_dim, m.predictor.out_dim,
          m.predictor.norm, m.predictor.activation, m.predictor.last_bias) == (
              2, 2048, 256, "none", "gelu", False)
  assert c.sce.symmetric and c.sce.target_bn_splits == 0 and m.concat_views
  assert c.data.views == ("imagenet_multi_crop" if arg and "multicrop" in arg
                          else "imagenet_two_crop")
  schema.validate(c, 8, 1)


def test_cifar10_vit_values():
  """docs/SCE.md 10: ViT-Tiny of patch 4 with eztorch's optimiser on the CIFAR-10 column."""
  c = load_config("cifar10_vit")
  assert spec_values(c) == (256, "adamw", 0.05, 5e-4, 10, 200, 0.1, 0.05, 0.5, 4096, 0.99,
                            "constant")
  assert (c.model.trunk, c.model.patch_size, c.model.drop_path, c.optim.clip_norm) == (
      "vit_tiny", 4, 0.1, 1.0)
  assert (c.model.projector.hidden_dim, c.model.predictor.num_layers) == (1024, 2)
  assert c.sce.target_bn_splits == 0 and not c.sce.symmetric and c.data.on_device
  schema.validate(c, 8, 1)
  smoke = load_config("cifar10_vit", "smoke")
  assert (smoke.model.width, smoke.model.depth, smoke.model.patch_size) == (32, 2, 8)
  schema.validate(smoke, 8, 1)


@pytest.mark.parametrize("overrides, message", [
    ({"sce.target_bn_splits": 8}, r"sce.target_bn_splits=8: a ViT has no BatchNorm, so there is "
     r"no shuffle-BN to split; set --config.sce.target_bn_splits=0\."),
    ({"model.patch_size": 5}, r"model.patch_size=5 does not divide the crop sizes \[32\]; set "
     r"--config.model.patch_size to a divisor of each"),
    ({"model.num_heads": 3}, r"model.width=32 does not split into model.num_heads=3 attention "
     r"heads"),
    ({"model.width": 30, "model.num_heads": 1, "model.pos_embed": "sincos"},
     r"model.pos_embed='sincos' needs a width divisible by 4, not 30"),
    ({"model.drop_path": 1.0}, r"model.drop_path=1.0 is out of range; set "
     r"--config.model.drop_path to a value in \[0, 1\)"),
    ({"model.depth": -1}, r"model.depth=-1 is out of range; set --config.model.depth to a "
     r"value >= 0"),
    ({"optim.clip_norm": -1.0}, r"optim.clip_norm=-1.0 is out of range"),
    ({"model.projector.last_bn": True}, r"model.projector.last_bn=True needs "
     r"model.projector.norm='batch'"),
    ({"model.trunk": "resnet18", "model.freeze_patch_embed": True, "sce.target_bn_splits": 0},
     r"model.freeze_patch_embed and model.drop_path apply to ViT trunks, not resnet18"),
])
def test_vit_config_errors(overrides, message):
  c = load_config("cifar10_vit", "smoke")
  for key, value in overrides.items():
    *sections, name = key.split(".")
    node = c
    for section in sections:
      node = node[section]
    node[name] = value
  with pytest.raises(sce_config.ConfigError, match=message):
    schema.validate(c, 1, 1)


@pytest.mark.parametrize("name, splits, mean, std", [
    ("cifar10_r18", 8, presets.CIFAR10_MEAN, presets.CIFAR10_STD),
    ("cifar100_r18", 8, presets.CIFAR100_MEAN, presets.CIFAR100_STD),
    ("stl10_r18", 8, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    ("tiny_imagenet_r18", 8, presets.IMAGENET_MEAN, presets.IMAGENET_STD),
    ("imagenet_r50", 0, presets.IMAGENET_MEAN, presets.IMAGENET_STD)])
def test_recipe_settings(name, splits, mean, std):
  """docs/SCE.md 2, 3, 5, 6: a forward pass per view everywhere; shuffle-BN over 8 groups in
  the small-data targets, synchronised BN on ImageNet; the authors' normalisation."""
  c = load_config(name)
  assert (c.model.concat_views, c.sce.target_bn_splits) == (False, splits)
  assert (c.data.mean, c.data.std) == (mean, std)
  assert load_config(name, None if name == "imagenet_r50" else "smoke").batch_size % max(
      splits, 1) == 0


@pytest.mark.parametrize("name, size, source", [
    ("cifar10_r18", 32, "folder"), ("cifar100_r18", 32, "tfds"), ("stl10_r18", 96, "tfds"),
    ("tiny_imagenet_r18", 64, "folder")])
def test_small_configs(name, size, source):
  """Every small-data config takes `smoke` and `epochs=N`, and its queue fits the batch."""
  c = load_config(name, "smoke")
  assert (c.data.image_size, c.data.source) == (size, source)
  assert (c.model.width, c.fast_compile) == (4, True)
  assert c.sce.queue % (c.batch_size * schema.num_target_views(c)) == 0
  c = load_config(name, "epochs=3")
  assert (c.epochs, c.model.width) == (3, 0)  # 0: the trunk's standard width
  assert c.sce.queue % (c.batch_size * schema.num_target_views(c)) == 0


def test_parse_arg():
  arg = sce_config.parse_arg("multicrop,epochs=100", multicrop=False, epochs=200, name="a")
  assert (arg.multicrop, arg.epochs, arg.name) == (True, 100, "a")
  assert sce_config.parse_arg("multicrop=false", multicrop=True).multicrop is False
  with pytest.raises(sce_config.ConfigError, match=r"Unknown config variant 'multcrop'; "
                     r"known: \['epochs', 'multicrop'\]"):
    sce_config.parse_arg("multcrop", multicrop=False, epochs=200)
  with pytest.raises(sce_config.ConfigError, match="needs a value: epochs=<int>"):
    sce_config.parse_arg("epochs", epochs=200)


# --- validate: one test per bad input -------------------------------------------------------


@pytest.fixture
def good(cifar_root):
  c = load_config("cifar10_r18", "smoke")
  c.data.path = str(cifar_root)
  return c


def test_valid_config_passes_and_probes_workdir(good, tmp_path):
  schema.validate(good, 8, 2, tmp_path / "new" / "workdir")
  assert (tmp_path / "new" / "workdir").is_dir()
  assert not list((tmp_path / "new" / "workdir").iterdir())  # the write probe is gone


@pytest.mark.parametrize("key", sorted(schema.ENUMS))
def test_bad_enum_value(good, key):
  *sections, name = key.split(".")
  node = good
  for section in sections:
    node = node[section]
  node[name] = "bogus"
  with pytest.raises(sce_config.ConfigError) as e:
    schema.validate(good, 1, 1)
  assert str(e.value).startswith(f"{key}='bogus' is not a known value; set --config.{key} to "
                                 "one of ")
  assert repr(schema.ENUMS[key][0]) in str(e.value)


def test_batch_not_divisible_by_devices(good):
  good.batch_size = 36
  with pytest.raises(sce_config.ConfigError, match=r"batch_size=36 does not split evenly over "
                     r"8 devices; set --config.batch_size to a multiple of 8, e.g. 32\."):
    schema.validate(good, 8, 1)


def test_batch_not_divisible_by_processes(good):
  good.batch_size = 33
  with pytest.raises(sce_config.ConfigError, match=r"batch_size=33 does not split evenly over "
                     r"2 processes; set --config.batch_size to a multiple of 2, e.g. 32\."):
    schema.validate(good, 1, 2)


def test_batch_not_divisible_into_micro_batches(good):
  good.optim.accum_steps = 3  # 32 images on 8 devices: 4 rows each, not 3 micro-batches
  with pytest.raises(sce_config.ConfigError, match=r"^batch_size=32 does not split into 8 "
                     r"devices x optim.accum_steps=3 micro-batches; set --config.batch_size to "
                     r"a multiple of 24, e.g. 24, or --config.optim.accum_steps to a divisor "
                     r"of the rows a device holds\.$"):
    schema.validate(good, 8, 1)
  good.optim.accum_steps = 4
  schema.validate(good, 8, 1)


def test_accumulation_needs_an_ema_target(good):
  """SimCLR's NT-Xent needs every row's online embeddings with gradients at once."""
  good.method, good.optim.accum_steps = "simclr", 2
  with pytest.raises(sce_config.ConfigError, match=r"^optim.accum_steps=2 cannot split a simclr "
                     r"step: its loss needs the online embeddings of the whole batch with their "
                     r"gradients .*; set --config.optim.accum_steps=1, or use a method with one "
                     r"\(sce, .*byol.*\)\.$") as e:
    schema.validate(good, 1, 1)
  assert "\n" not in str(e.value)


def test_batch_not_divisible_into_shuffle_bn_groups(good):
  good.batch_size, good.sce.queue = 36, 144  # 1 device: the only problem is the 8 groups
  with pytest.raises(sce_config.ConfigError, match=r"sce.target_bn_splits=8 does not divide "
                     r"batch_size=36 into shuffle-BN groups; set --config.sce.target_bn_splits "
                     r"to a divisor of the batch \(8 in the CIFAR recipe\) or 0 to turn "
                     r"shuffle-BN off\."):
    schema.validate(good, 1, 1)
  good.sce.target_bn_splits = 0
  schema.validate(good, 1, 1)


def test_queue_not_a_multiple_of_keys_per_step(good):
  good.sce.queue = 100  # 32 keys a step (CIFAR: one target view)
  with pytest.raises(sce_config.ConfigError, match=r"sce.queue=100 is not a positive multiple of "
                     r"the 32 target embeddings written to it each step \(batch_size 32 x 1 "
                     r"target views\); set --config.sce.queue=96 or another multiple of 32\."):
    schema.validate(good, 1, 1)
  good.sce.queue = 0  # A queue of no negatives: the loss would be 0 whatever the weights.
  with pytest.raises(sce_config.ConfigError, match=r"sce.queue=0 is not a positive multiple .* "
                     r"set --config.sce.queue=32 or"):
    schema.validate(good, 1, 1)
  good.sce.symmetric = True  # ImageNet pairing: both global views enter the queue.
  good.sce.queue = 96
  with pytest.raises(sce_config.ConfigError, match=r"multiple of the 64 .* x 2 target views"):
    schema.validate(good, 1, 1)


def test_missing_dataset(good, tmp_path):
  good.data.path = str(tmp_path / "nowhere.tar.gz")
  with pytest.raises(images.DataError, match=r"data.path=.*nowhere.tar.gz does not exist; "
                     r"set --config.data.path to a folder of images"):
    sources.Splits(good.data)
  good.data.path = ""
  with pytest.raises(images.DataError, match=r"data.path is empty; set --config.data.path"):
    sources.Splits(good.data)


@pytest.fixture
def tfds_builder(monkeypatch):
  """TFDS's builder class with download_and_prepare replaced by `fake`, and the connection
  sources.Tfds probes the download hosts with by `connect` (no network in tests; no proxy)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(urllib.request, "getproxies", dict)

  def patch(fake, connect=lambda address, timeout: io.BytesIO()):
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fake)
    monkeypatch.setattr(socket, "create_connection", connect)
  return patch


def test_tfds_offline_is_told_in_seconds(good, tmp_path, tfds_builder, monkeypatch):
  """Offline (the download host does not resolve), TFDS is not asked to download, which would
  retry for minutes: one line names the host and the local copies to use instead. Behind a
  proxy nothing is probed."""
  def offline(address, timeout):
    raise socket.gaierror(-2, "Name or service not known")
  tfds_builder(lambda *a, **k: pytest.fail("TFDS was asked to download"), offline)
  good.data.source, good.data.name, good.data.data_dir = "tfds", "cifar10", str(tmp_path)
  with pytest.raises(images.DataError) as e:
    sources.Splits(good.data)
  assert str(e.value) == (
      "TFDS cannot download 'cifar10': www.cs.toronto.edu:443 cannot be reached from this "
      "machine (gaierror: [Errno -2] Name or service not known). Offline, use a local copy: for "
      "CIFAR the official cifar-10-python.tar.gz or cifar-100-python.tar.gz (README, Without "
      "internet) with --config.data.source=folder --config.data.path=FILE, or a TFDS data_dir "
      "prepared on a machine that has internet (--config.data.data_dir=DIR).")
  calls = []
  tfds_builder(lambda builder, *a, **k: calls.append(builder.name), offline)
  monkeypatch.setattr(urllib.request, "getproxies", lambda: {"https": "http://proxy:3128"})
  sources.Splits(good.data)
  assert calls == ["cifar10"]


def test_tfds_prepares_a_missing_dataset(good, tmp_path, tfds_builder):
  """A dataset TFDS can download is prepared by opening it; offline, one line says so."""
  calls = []
  tfds_builder(lambda builder, *a, **k: calls.append(builder.name))
  good.data.source, good.data.name, good.data.data_dir = "tfds", "cifar10", str(tmp_path)
  sources.Splits(good.data)
  assert calls == ["cifar10"]

  def offline(builder, *a, **k):
    raise ConnectionError("Failed to establish a new connection: [Errno -3] Temporary "
                          "failure in name resolution\nmore lines")
  tfds_builder(offline)
  with pytest.raises(images.DataError) as e:
    sources.Splits(good.data)
  assert str(e.value) == (
      f"TFDS could not download and prepare 'cifar10' in data_dir={tmp_path}/cifar10/3.0.2 "
      "(ConnectionError: Failed to establish a new connection: [Errno -3] Temporary failure in "
      "name resolution); check the internet connection, or prepare it on a machine that has "
      "one and set --config.data.data_dir=DIR.")


def test_tfds_manual_download_is_explained(good, tmp_path, tfds_builder):
  tfds_builder(lambda *a, **k: pytest.fail("ImageNet cannot be downloaded by TFDS"))
  good.data.source, good.data.name, good.data.data_dir = "tfds", "imagenet2012", str(tmp_path)
  with pytest.raises(images.DataError, match=r"'imagenet2012' is not prepared in .* needs a "
                     r"manual download: put its files in DIR/downloads/manual/"):
    sources.Splits(good.data)


def test_unwritable_workdir(good, tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(sce_config.ConfigError, match=r"workdir .*file/run is not writable \(.*\); "
                     r"pass --workdir=<a directory this job can write>"):
    schema.validate(good, 1, 1, tmp_path / "file" / "run")


def cli(*args):
  """The command line up to its first error (no JAX computation runs before it)."""
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "sce_jax.main", *args], capture_output=True,
                        text=True, cwd=ROOT, env=env, timeout=120)


def test_cli_unknown_key_and_variant(tmp_path):
  out = cli("--config=configs/cifar10_r18.py:smoke", "--config.batchsize=32",
            f"--workdir={tmp_path}")
  assert out.returncode == 1
  assert out.stderr.splitlines()[-3:] == [
      "Config error: no such key: 'batchsize'",
      'Did you mean "batch_size" instead of "batchsize"?',
      "Every key is declared in sce_jax/config.py (base()); fix the --config.KEY=VALUE "
      "override or the config file."]
  out = cli("--config=configs/imagenet_r50.py:multicrop,epoch=100", f"--workdir={tmp_path}")
  assert out.returncode == 1
  assert out.stderr.splitlines()[-1] == (
      "Config error: Unknown config variant 'epoch'; known: ['continue', 'epochs', 'method', "
      "'multicrop'] "
      "(e.g. --config=configs/FILE.py:name,key=value).")


def test_cli_validates_before_compiling(cifar_root, tmp_path):
  out = cli("--config=configs/cifar10_r18.py:smoke", "--config.batch_size=36",
            f"--config.data.path={cifar_root}", f"--workdir={tmp_path}")
  assert out.returncode == 1
  assert out.stderr.splitlines()[-1] == (
      "Error: batch_size=36 does not split evenly over 8 devices; set --config.batch_size to "
      "a multiple of 8, e.g. 32.")
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("key", schema.POSITIVE)
def test_counts_below_one(good, key):
  *sections, name = key.split(".")
  functools.reduce(lambda c, s: c[s], sections, good)[name] = 0
  with pytest.raises(sce_config.ConfigError, match=rf"^{key}=0 must be at least 1; set "
                     rf"--config.{key} to a positive value\.$"):
    schema.validate(good, 1, 1)


@pytest.mark.parametrize("key, value, fix", [
    ("eval.transfer.datasets", "cifar10,imagenet", r"'imagenet' is not a TFDS set of the "
     r"protocol \(food101, .*\); name a local copy as imagenet=PATH"),
    ("eval.transfer.wd_range", (1e5, 1e-6), r"\(low, high\) with 0 < low <= high"),
    ("eval.transfer.val_fraction", 1.0, r"in \(0, 1\)"),
    ("eval.voc07.shots", (16, 0), r">= 1 \(each\)"),
    ("eval.voc07.costs", (0.0, 1.0), r"> 0 \(each\)"),
    ("eval.voc07.costs", (), r"positive SVM costs, at least one"),
    ("eval.voc07.folds", 1, r">= 2"),
    ("eval.finetune.fraction", 1.5, r"in \(0, 1\]"),
    ("eval.finetune.base_lr", -0.5, r"> 0"),  # trained uphill to a loss of 19,458
    ("eval.finetune.momentum", 2.0, r"in \[0, 1\)"),
])
def test_evaluation_keys_out_of_range(good, key, value, fix):
  """docs/SCE.md 9: one line naming the key and the fix."""
  *sections, name = key.split(".")
  functools.reduce(lambda c, s: c[s], sections, good)[name] = value
  with pytest.raises(sce_config.ConfigError, match=rf"{key}.*{fix}") as e:
    schema.validate(good, 1, 1)
  assert "\n" not in str(e.value)


# For each range of schema.RANGES, in its words: values just outside it, and values at its
# edges inside it (ints, so that they fit integer keys too).
EDGES = {">= 1": ([0, -1], [1]), ">= 0": ([-1], [0]), "> 0": ([0, -1], [1]),
         "in [0, 1]": ([-1, 2], [0, 1]), "in [0, 1)": ([-1, 1], [0]), "in (0, 1]": ([0, 2], [1]),
         "in (0, 1)": ([0, 1], [0.5]), ">= 2": ([1], [2]), "any integer": ([], [-1, 0, 1])}
# Keys whose every value in range is not valid alone: the config's own value is its inside edge
# (sce.queue: a multiple of the keys written each step).
OWN_EDGE = ("sce.queue",)


@pytest.mark.parametrize("key", sorted(schema.RANGES))
def test_values_out_of_range(good, key):
  """Each numeric key with a range stops `validate` in one line naming it and the range (a
  temperature of 0 would otherwise compile, then blame the learning rate for the NaN loss; a
  negative learning rate would train, uphill); its edges pass. Of a tuple (data.mean,
  data.std, eval.linear.milestones), each item is checked."""
  *sections, name = key.split(".")
  node = functools.reduce(lambda c, s: c[s], sections, good)
  words = schema.RANGES[key][1]
  outside, edges = EDGES[words]
  edges = [node[name]] if key in OWN_EDGE else edges
  as_value = lambda v: (v,) * len(node[name]) if isinstance(node[name], tuple) else v
  for value in edges:
    node[name] = as_value(value)
    schema.validate(good, 1, 1)
  for value in outside:
    node[name] = as_value(value)
    each = " (each)" if isinstance(node[name], tuple) else ""
    with pytest.raises(sce_config.ConfigError) as e:
      schema.validate(good, 1, 1)
    assert str(e.value) == (f"{key}={node[name]} is out of range; set --config.{key} to a "
                            f"value {words}{each}.")


def test_data_path_with_a_tfds_source_says_what_to_set():
  """README's CIFAR-100 archive with configs/cifar100_r18.py (a TFDS config): the path is not
  ignored (the run would try to download), the error says to add data.source=folder."""
  config = load_config("cifar100_r18", "smoke")
  config.data.path = "cifar-100-python.tar.gz"
  with pytest.raises(sce_config.ConfigError) as e:
    schema.validate(config, 1, 1)
  assert str(e.value) == (
      "data.path=cifar-100-python.tar.gz is read by data.source='folder' only, and this "
      "config's source is 'tfds' ('cifar100'); add --config.data.source=folder to read the "
      "path, or leave data.path empty.")
  config.data.source = "folder"
  schema.validate(config, 1, 1)


def test_every_numeric_key_has_a_range():
  """Every numeric key of base() (a number, or a tuple of numbers; not a boolean) is in
  schema.RANGES or POSITIVE, so that no setting escapes the checks (eval.finetune.base_lr=-0.5
  once trained uphill, reporting chance accuracy); a key that refers to another (the
  predictor's out_dim, the projector's) is checked through it."""
  config = sce_config.base()
  numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  ranged = set(schema.RANGES) | set(schema.POSITIVE)
  field_of = lambda key: functools.reduce(lambda c, s: c[s], key.split(".")[:-1], config)._fields[  # pylint: disable=protected-access
      key.split(".")[-1]]
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
  checked = {id(field_of(k)) for k in ranged
             if isinstance(field_of(k), ml_collections.FieldReference)}
  keys = [k for k, v in flat.items()
          if numeric(v) or (isinstance(v, tuple) and v and all(map(numeric, v)))]
  missing = [k for k in keys if k not in ranged and id(field_of(k)) not in checked]
  assert len(keys) > 60 and not missing


def test_every_config_is_in_range():
  for path in sorted(CONFIGS.glob("*.py")):
    for arg in ("", ":smoke", ":multicrop", ":epochs=100"):
      try:
        config = sce_config.load(f"{path}{arg}")
      except sce_config.ConfigError:  # A variant this file does not have.
        continue
      schema._check_ranges(config)  # pylint: disable=protected-access


def test_config_help_lists_every_key():
  """--config_help prints every key of base() with its default, the comment it is declared
  with, and its allowed values or range, without --config or --workdir."""
  out = cli("--config_help")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  keys = [line.split(" = ")[0].strip() for line in lines[1:] if not line.startswith("  # ")]
  assert keys == sorted(flax.traverse_util.flatten_dict(sce_config.base().to_dict(), sep="."))
  assert "  batch_size = 256  # global batch, all devices and processes; >= 1" in lines
  assert "  sce.temp = 0.1  # > 0" in lines
  assert ("  optim.name = 'sgd'  # or \"lars\", \"adamw\" (optim.OPTIMIZERS); one of 'sgd', "
          "'lars', 'adamw'") in lines
  # A section's comment once, above its first key, not on each of its keys.
  header = [i for i, line in enumerate(lines)
            if line.startswith("  # eval.knn: Evaluations during pretraining")]
  assert len(header) == 1 and lines[header[0] + 1].startswith("  eval.knn.every_epochs = 10")
  assert "  eval.knn.k = 200  # >= 1" in lines and "  eval.knn.temp = 0.1  # > 0" in lines
  assert sum("Evaluations during pretraining" in line for line in lines) == 1


def test_cli_suggests_a_key_by_its_other_name(tmp_path):
  """--config.sce.temperature: the paper's word; the key is sce.temp (schema.ALIASES)."""
  out = cli("--config=configs/cifar10_r18.py:smoke", "--config.sce.temperature=0",
            f"--workdir={tmp_path}")
  assert out.returncode == 1
  assert out.stderr.splitlines()[-3:-1] == [
      "Config error: no such key: 'temperature'",
      'Did you mean "sce.temp"? (temperature is called temp here)']


def test_reading_a_config_imports_no_runtime():
  """config.py is the ground floor (issue 26): reading every config file, in a fresh
  interpreter, imports no checkpointer (orbax), loop, checkpoint, weights or evaluator."""
  code = ("import pathlib, sys; from sce_jax import config\n"
          "for f in sorted(pathlib.Path('configs').glob('*.py')): config.load(str(f))\n"
          "print(' '.join(sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout.split()
  assert "sce_jax.config" in out
  heavy = [m for m in out if m.split(".")[0] == "orbax" or m.startswith("sce_jax.evaluators")
           or m in ("sce_jax.loop", "sce_jax.checkpoint", "sce_jax.weights", "sce_jax.schema")]
  assert not heavy


def test_dataset_smaller_than_a_batch(good, tmp_path):
  """Found when the data are opened, before the workdir is locked or anything compiles."""
  good.batch_size = 256  # The generated training split has 200 images.
  with pytest.raises(sce_config.ConfigError, match=(
      r"^The training split has 200 images, fewer than one batch \(batch_size=256\); set "
      r"--config.batch_size to at most 200")):
    train.train(good, tmp_path)
  assert not list(tmp_path.iterdir())


@pytest.mark.slow  # four command-line runs: 90 s on the shared 2-core box
def test_cli_missing_config_file_epochs_and_checkpoint(cifar_root, tmp_path):
  """Each a one-line error naming the fix, before anything compiles."""
  out = cli("--config=configs/cifar10.py:smoke", f"--workdir={tmp_path}")
  assert (out.returncode, out.stderr.splitlines()[-1]) == (1, (
      "Config error: config file 'configs/cifar10.py' does not exist; pass "
      "--config=configs/<name>.py[:variants] (e.g. configs/cifar10_r18.py:smoke)."))
  common = ("--config=configs/cifar10_r18.py:smoke", f"--config.data.path={cifar_root}",
            f"--workdir={tmp_path}")
  out = cli(*common, "--config.epochs=0")
  assert (out.returncode, out.stderr.splitlines()) == (1, [
      "Error: epochs=0 must be at least 1; set --config.epochs to a positive value."])
  out = cli(*common, "--mode=knn")
  assert (out.returncode, out.stderr.splitlines()) == (1, [
      f"Error: --mode=knn evaluates a checkpoint, and {tmp_path}/checkpoints has none; train "
      "first with this --workdir, or pass --config.eval.checkpoint=PATH (a workdir or weights "
      "to evaluate)."])
