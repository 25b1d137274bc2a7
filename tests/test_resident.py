"""The training set on the accelerator (data.on_device): batches, crops and the step."""
import jax
import numpy as np
import pytest
from PIL import Image

from sce_jax import sharding, train
from sce_jax.data import augment, crop, presets, resident as resident_lib, sources
from tests import test_train_step

N = 40  # images in the resident set: an epoch is 2.5 batches of 16


def resident_set(size, n=N, seed=0):
  rng = np.random.default_rng(seed)
  return sources.InMemory(rng.integers(0, 256, (n, size, size, 3), np.uint8), np.arange(n) % 10)


def indices(resident, mesh, steps, start_step=0, seed=0, batch=16):
  batches = resident_lib.train_batches(resident, global_batch_size=batch, seed=seed,
                                       start_step=start_step, mesh=mesh)
  return [np.asarray(next(batches)["index"]) for _ in range(steps)]


def test_every_image_once_per_epoch_and_exact_resume():
  mesh = sharding.make_mesh()
  resident = resident_lib.load(resident_set(8), mesh)
  assert resident.images.sharding.is_fully_replicated
  steps = indices(resident, mesh, 10)  # 160 positions: 4 epochs of 40
  first = next(resident_lib.train_batches(resident, global_batch_size=16, seed=0, start_step=0,
                                          mesh=mesh))
  assert first["index"].sharding == sharding.rows(mesh)
  stream = np.concatenate(steps)
  epochs = stream.reshape(4, N)
  for epoch in epochs:
    assert sorted(epoch) == list(range(N))  # Every image exactly once per epoch.
  assert len({tuple(e) for e in epochs}) == 4  # A new order every epoch.
  for start in (1, 2, 7):  # Inside the first epoch, across its end, later.
    np.testing.assert_array_equal(np.stack(indices(resident, mesh, 3, start_step=start)),
                                  np.stack(steps[start:start + 3]))
  assert not np.array_equal(indices(resident, mesh, 1, seed=1)[0], steps[0])
  one = resident_lib.load(resident_set(8), sharding.make_mesh(jax.devices()[:1]))
  np.testing.assert_array_equal(  # The device count does not change the batches.
      np.stack(indices(one, sharding.make_mesh(jax.devices()[:1]), 10)), np.stack(steps))


def test_load_falls_back_when_the_set_does_not_fit(monkeypatch):
  mesh = sharding.make_mesh()
  room = N * 8 * 8 * 3 / 2 / resident_lib.device_memory(mesh.local_devices[0])
  monkeypatch.setattr(resident_lib, "MEMORY_FRACTION", room)  # Room for half of the set.
  assert resident_lib.load(resident_set(8), mesh) is None
  monkeypatch.undo()
  mixed = sources.InMemory([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)],
                           [0, 1])
  assert resident_lib.load(mixed, mesh) is None
  with pytest.raises(ValueError, match="larger than the 40 training images"):
    next(resident_lib.train_batches(resident_lib.load(resident_set(8), mesh),
                                    global_batch_size=48, seed=0, start_step=0, mesh=mesh))


@pytest.mark.parametrize("damaged", ["0_bad.jpg", "9_bad.jpg"])  # The first image, or another.
def test_load_falls_back_on_an_undecodable_image(tmp_path, damaged):
  """The host path skips an undecodable image (pipeline.py); the device path leaves such a set
  to it rather than stop."""
  (tmp_path / "a").mkdir()
  for i in range(1, 3):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "a" / f"{i}.jpg")
  (tmp_path / "a" / damaged).write_bytes(b"not an image")
  assert resident_lib.load(sources.ImageFolder(tmp_path), sharding.make_mesh()) is None


def _ks_statistic(a, b):
  """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
  grid = np.union1d(a, b)
  cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)
  return np.abs(cdf(a) - cdf(b)).max()


def _window_laws(h, w, height, width):
  return {"area": h * w / (height * width), "log aspect": np.log(w / h)}


def test_device_crops_follow_the_host_law():
  """10,000 windows of the device crop and of the grain host path, which draws by torchvision's
  rule (CIFAR: 32x32, scale (0.2, 1)): the mean area and log aspect ratio agree within 3 sigma
  of their difference (sigma = sqrt(var_a / n + var_b / n)), and the two-sample KS statistic is
  below its 3-sigma level 1.82 * sqrt(2 / n) = 0.026 (c(alpha) = sqrt(-ln(alpha / 2) / 2) at
  alpha = 0.0027). (tf.data draws by TF's own law, which differs: mean area 0.50 against 0.55.)"""
  n, size = 10_000, 32
  spec = presets.cifar(size)[1]
  top, left, h, w = map(np.asarray, jax.jit(augment.crop_windows, static_argnums=range(1, 6))(
      jax.random.key(0), n, size, size, spec.scale, spec.ratio))
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= size).all()
  assert (left + w <= size).all()
  on_device = _window_laws(h, w, size, size)
  _, _, h, w = crop.crop_window(np.random.default_rng(0).random((n, crop.ATTEMPTS, 4)),
                                size, size, spec.scale, spec.ratio)
  on_host = _window_laws(h, w, size, size)
  for name, a in on_device.items():
    b = on_host[name]
    sigma = np.sqrt(a.var() / n + b.var() / n)
    assert abs(a.mean() - b.mean()) < 3 * sigma, (name, a.mean(), b.mean(), sigma)
    assert _ks_statistic(a, b) < 1.82 * np.sqrt(2 / n), name


def _run(config, devices, steps):
  mesh = sharding.make_mesh(devices)
  resident = resident_lib.load(resident_set(24), mesh)
  parts = train.build(config, mesh, num_classes=10, steps_per_epoch=2, on_device=True)
  batches = resident_lib.train_batches(resident, global_batch_size=config.batch_size,
                                       seed=config.seed, start_step=0, mesh=mesh)
  state = parts.init(jax.random.key(0))
  metrics = []
  for _ in range(steps):
    state, m = parts.step(state, next(batches))
    metrics.append(jax.device_get(m))
  assert resident.images.is_deleted() is False  # Never donated.
  return jax.device_get(state), metrics


def test_step_on_device_one_device_equals_eight():
  """The step crops and augments the resident set itself: the same global batch on 1 and 8
  devices gives the same losses and weights (float32 sums in another order: 1e-4 of scale)."""
  config = test_train_step.tiny_config(**{"optim.base_lr": 0.5})
  one, m1 = _run(config, jax.devices()[:1], 2)
  eight, m8 = _run(config, jax.devices()[:8], 2)

  def close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(np.abs(b).max(), 1e-3))

  for a, b in zip(m1, m8):
    for k in ("loss", "grad_norm", "pos_sim", "probe_loss"):
      close(a[k], b[k])
  jax.tree.map(close, (one.params, one.queue), (eight.params, eight.queue))
  assert m1[0]["loss"] != m1[1]["loss"]
