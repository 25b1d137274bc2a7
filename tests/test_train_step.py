"""The sharded SCE step (docs/SCE.md sections 1-3) on fake CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sce_jax import sharding, train_step
from tests.helpers import load_config

BATCH, SIZE = 16, 16


def tiny_config(**overrides):
  c = load_config("cifar10_r18", "smoke")
  c.batch_size = BATCH
  c.data.image_size = SIZE
  c.optim.warmup_epochs = 0
  c.optim.base_lr = 2.0
  c.sce.queue = 4 * BATCH
  c.model.width = 8  # width 4 leaves near-constant BN channels that amplify rounding
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


def batch(seed, views=2):
  rng = np.random.default_rng(seed)
  return {"views": tuple(rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)
                         for _ in range(views)),
          "label": rng.integers(0, 10, BATCH).astype(np.int32)}


def run(config, devices, steps, seed=0):
  mesh = sharding.make_mesh(devices)
  parts = train_step.build(config, mesh, num_classes=10, steps_per_epoch=10, float_views=True)
  state = parts.init(jax.random.key(seed))
  metrics = []
  for i in range(steps):
    state, m = parts.step(state, batch(i))
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics, parts


@pytest.mark.parametrize("overrides", [
    {},  # CIFAR: asymmetric pairing, queue negatives
    {"sce.symmetric": True, "sce.negatives": "both", "sce.queue": 8 * BATCH,
     "model.predictor.num_layers": 2, "model.predictor.hidden_dim": 32,
     "model.projector.last_bn": True, "optim.name": "lars", "sce.m_schedule": "cosine"},
], ids=["cifar", "imagenet_like"])
def test_one_device_equals_eight(overrides):
  """Same global batch and seed on 1 and 8 devices: same loss, gradients (the first
  momentum buffer is gradient + decay), parameters, BN statistics and queue."""
  config = tiny_config(**{"optim.base_lr": 0.5, **overrides})
  one, m1, _ = run(config, jax.devices()[:1], 2)
  eight, m8, _ = run(config, jax.devices()[:8], 2)

  def close(a, b, name):
    # float32 sums in another order across devices: 1e-4 of each array's scale.
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(np.abs(b).max(), 1e-3),
                               err_msg=name)

  for a, b in zip(m1, m8):
    for k in ("loss", "grad_norm", "pos_sim", "target_entropy", "probe_loss"):
      close(a[k], b[k], k)
  for field in ("params", "batch_stats", "target_params", "target_batch_stats", "opt_state",
                "queue"):
    jax.tree.map(lambda a, b: close(a, b, field), getattr(one, field), getattr(eight, field))
  assert int(one.queue_ptr) == int(eight.queue_ptr)


def _target_keys(parts, state, views):
  """What the step should write to the queue: target embeddings of view 0 (CIFAR pairing)."""
  def embed(variables, x):
    out, _ = parts.target.apply(variables, x, train=True, mutable=["batch_stats"])
    return out["proj"] / jnp.linalg.norm(out["proj"], axis=-1, keepdims=True)
  return np.asarray(jax.jit(embed)({"params": state.target_params,
                                    "batch_stats": state.target_batch_stats}, views[0]))


@pytest.fixture(scope="module")
def cifar_parts():
  """One compiled step (CIFAR pairing, queue of 3 batches) shared by the tests below."""
  config = tiny_config(**{"sce.queue": 3 * BATCH, "optim.base_lr": 4.0})
  return train_step.build(config, sharding.make_mesh(), num_classes=10, steps_per_epoch=10,
                          float_views=True)


def test_queue_is_fifo_of_the_last_keys(cifar_parts):
  parts = cifar_parts
  state = parts.init(jax.random.key(0))
  written = []
  for i in range(4):
    written.append(_target_keys(parts, state, batch(i)["views"]))
    state, _ = parts.step(state, batch(i))
  ptr = int(state.queue_ptr)
  assert ptr == BATCH  # 4 writes of 16 into a ring of 48
  oldest_first = np.roll(np.asarray(state.queue), -ptr, axis=0)
  np.testing.assert_allclose(oldest_first, np.concatenate(written[-3:]), atol=2e-5)


def test_gradients_reach_only_the_online_branch(cifar_parts):
  """The target moves only by the EMA of the updated online weights, never by gradients."""
  parts = cifar_parts
  state = parts.init(jax.random.key(1))
  target_before = jax.device_get(state.target_params)
  online_before = jax.device_get(state.params)
  state, metrics = parts.step(state, batch(0))
  after = jax.device_get(state)
  m = float(metrics["ema_momentum"])
  assert m == pytest.approx(0.99)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), online_before, after.params)
  assert min(jax.tree.leaves(moved["trunk"])) > 0  # every online trunk tensor got a gradient
  expected = jax.tree.map(lambda t, o: m * t + (1 - m) * o, target_before,
                          {k: after.params[k] for k in target_before})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               after.target_params, expected)


@pytest.mark.parametrize("m", [1.0, 0.0])
def test_ema_extremes(m):
  """m = 1 leaves the target unchanged; m = 0 copies the online weights (the predictor and
  probe, which the target lacks, are ignored)."""
  rng = np.random.default_rng(0)
  target = {"trunk": rng.normal(size=(3, 3)), "projector": rng.normal(size=(2,))}
  online = {"trunk": rng.normal(size=(3, 3)), "projector": rng.normal(size=(2,)),
            "predictor": rng.normal(size=(4,))}
  got = train_step.ema_update(target, online, m)
  want = target if m == 1.0 else {k: online[k] for k in target}
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_loss_falls(cifar_parts):
  """30 steps of a tiny ResNet on 64 random images under shifts, flips and noise."""
  parts = cifar_parts
  state = parts.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(64, SIZE, SIZE, 3)).astype(np.float32)
  labels = np.arange(64) % 10

  def view(x):
    x = np.roll(x, tuple(rng.integers(-2, 3, 2)), axis=(1, 2))
    x = x[:, :, ::-1] if rng.random() < 0.5 else x
    return (x + 0.1 * rng.normal(size=x.shape)).astype(np.float32)

  losses = []
  for _ in range(30):
    idx = rng.choice(64, BATCH, replace=False)
    state, m = parts.step(state, {"views": (view(images[idx]), view(images[idx])),
                                  "label": labels[idx].astype(np.int32)})
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
