"""Pretraining from existing weights (config.init, sce_jax/pretrained.py): the first state holds
the file's trunk bit for bit in the online and target networks, a resumed run never reads the
file again, init.heads=keep takes the file's heads, and a file of another trunk stops the run
before anything is built, in one line."""
import json

import jax
import numpy as np
import pytest
import safetensors.numpy

from sce_jax import convert, loop, pretrained, schema, sharding, train, weights
from sce_jax import config as sce_config
from sce_jax import workdir as workdir_lib
from tests.helpers import load_config
from tests.test_convert import random_variables, torchvision_state


def smoke_config(cifar_root, weights_path, max_steps=2, heads="fresh"):
  c = load_config("cifar10_r18", "smoke")
  c.data.path = str(cifar_root)
  c.max_steps = max_steps
  c.init.weights = str(weights_path)
  c.init.heads = heads
  return c


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(jax.devices()[:1])


def torchvision_file(path, width=4, name="resnet18"):
  """A torchvision-layout ResNet state dict (fc included) as safetensors; returns the dict."""
  sd = torchvision_state(name, np.random.default_rng(1), width=width, small_stem=True)
  safetensors.numpy.save_file(sd, str(path))
  return sd


def torch_array(collection, path, x):
  """A state leaf in torch's layout: a conv kernel HWIO -> OIHW, written here from torch's
  conventions, not from weights.py."""
  x = np.asarray(x)
  return x.transpose(3, 2, 0, 1) if x.ndim == 4 else x


@pytest.mark.slow
def test_starts_from_a_torchvision_file_trains_and_resumes(cifar_root, tmp_path, mesh,
                                                           monkeypatch):
  """The state the loop receives before step 1 holds the file's trunk, bit for bit, in the
  online and the target networks (every file key but fc.* and num_batches_tracked used); the
  run trains 2 steps, and resumes to 4 with the file gone (it is not read again)."""
  sd = torchvision_file(tmp_path / "r18.safetensors")
  first = []
  run_train = loop.Run.train

  def spy(self, state, start, *args, **kwargs):
    first.append((start, jax.device_get(state)))
    return run_train(self, state, start, *args, **kwargs)

  monkeypatch.setattr(loop.Run, "train", spy)
  workdir = tmp_path / "w"
  train.train(smoke_config(cifar_root, tmp_path / "r18.safetensors"), workdir, mesh)
  start, state = first[0]
  assert start == 0
  used = set()
  for collection in ("params", "batch_stats", "target_params", "target_batch_stats"):
    trunk = getattr(state, collection)["trunk"]
    for path, x in jax.tree_util.tree_flatten_with_path(trunk)[0]:
      keys = tuple(p.key for p in path)
      key = weights.torch_key(collection, ("trunk", *keys), "torchvision")
      used.add(key)
      np.testing.assert_array_equal(torch_array(collection, keys, x), sd[key], err_msg=key)
  assert used == {k for k in sd if not k.startswith("fc.") and "num_batches" not in k}
  recorded = json.loads((workdir / workdir_lib.CONFIG).read_text())
  assert recorded["init"]["weights"] == str(tmp_path / "r18.safetensors")

  (tmp_path / "r18.safetensors").unlink()  # a resumed run must not need it
  train.train(smoke_config(cifar_root, tmp_path / "r18.safetensors", max_steps=4), workdir,
              mesh)
  assert first[1][0] == 2  # restored step 2, then trained to 4
  assert (workdir / "checkpoints" / "4").is_dir()


def test_a_file_of_another_trunk_stops_before_anything_is_built(cifar_root, tmp_path, mesh,
                                                                monkeypatch):
  """Another width: one line naming the first key and both shapes in torch's layout; another
  depth: one line naming both trunks. Nothing is built (so nothing compiles)."""
  monkeypatch.setattr(train, "build", lambda *a, **k: pytest.fail("built before the check"))
  torchvision_file(tmp_path / "wide.safetensors", width=8)
  with pytest.raises(sce_config.ConfigError) as e:
    train.train(smoke_config(cifar_root, tmp_path / "wide.safetensors"), tmp_path / "a", mesh)
  message = str(e.value)
  assert "\n" not in message
  assert ("the online trunk has width 8 and a 3x3 stem; the config has width 4 and a 3x3 "
          "stem; shape mismatch at bn1.bias (sce_jax params/trunk/bn1/bias): checkpoint (8,), "
          "config (4,) (and ") in message
  assert "--config.init.weights" in message

  torchvision_file(tmp_path / "r50.safetensors", width=4, name="resnet50")
  with pytest.raises(sce_config.ConfigError, match="resnet50 .* but the config asks for "
                     "resnet18 .* a depth mismatch") as e:
    train.train(smoke_config(cifar_root, tmp_path / "r50.safetensors"), tmp_path / "b", mesh)
  assert "\n" not in str(e.value)


def test_heads_keep_or_fresh(cifar_root, tmp_path, mesh):
  """An sce_jax file with heads: 'keep' puts its projector in the online and target networks
  (its online trunk in both), 'fresh' leaves the config's random projector; the optimiser's
  state and the queue are the fresh state's."""
  config = smoke_config(cifar_root, tmp_path / "sce.safetensors", heads="keep")
  variables = random_variables(config.model, np.random.default_rng(2))
  convert.save_safetensors(variables, tmp_path / "sce.safetensors")
  parts = train.build(config, mesh, num_classes=10, steps_per_epoch=6, float_views=True)
  fresh = parts.init(jax.random.key(0))
  for heads in ("keep", "fresh"):
    config.init.heads = heads
    imported = pretrained.read(config, tmp_path / heads)
    state = jax.device_get(pretrained.start_from(fresh, imported))
    for collection in ("params", "target_params"):
      np.testing.assert_array_equal(getattr(state, collection)["trunk"]["conv1"]["kernel"],
                                    variables["params"]["trunk"]["conv1"]["kernel"])
      kept = getattr(state, collection)["projector"]["linear0"]["kernel"]
      want = variables["params"]["projector"]["linear0"]["kernel"]
      assert np.array_equal(kept, want) == (heads == "keep"), (heads, collection)
    np.testing.assert_array_equal(state.queue, jax.device_get(fresh.queue))
    jax.tree.map(np.testing.assert_array_equal, state.opt_state, jax.device_get(fresh.opt_state))


def test_continue_variant_and_heads_values():
  """`continue`: a tenth of the rate, 1 warm-up epoch, a quarter of the epochs of the recipe it
  modifies; init.heads outside state.INIT_HEADS is refused by name."""
  for name, arg in (("cifar10_r18", "epochs=200"), ("imagenet_r50", "epochs=100")):
    base, cont = load_config(name, arg), load_config(name, f"{arg},continue")
    assert cont.optim.base_lr == pytest.approx(base.optim.base_lr / 10)
    assert (cont.optim.warmup_epochs, cont.epochs) == (1, base.epochs // 4)
  config = load_config("cifar10_r18", "smoke")
  config.init.heads = "old"
  with pytest.raises(sce_config.ConfigError, match="init.heads='old' is not a known value; set "
                     "--config.init.heads to one of 'fresh', 'keep'"):
    schema.validate(config, 1, 1)
