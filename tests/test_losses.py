"""sce_loss against an independent float64 NumPy transcription of docs/SCE.md section 1."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sce_jax import losses


def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference(q, z, queue, temp, temp_m, coeff, positive, keys=None, index=None):
  """Row by row, exactly as docs/SCE.md 1 writes it; keys/index: in-batch negatives."""
  total = 0.0
  for i in range(len(q)):
    if keys is None:
      cols, pos = [z[i]], 0
    else:
      cols, pos = list(keys), index[i]
    if queue is not None:
      cols += list(queue)
    cols = np.array(cols)
    s_q = cols @ q[i] / temp
    s_z = cols @ z[i] / temp_m
    s_z[pos] = 0.0 if positive == "zero_logit" else -np.inf
    soft = np.exp(s_z - s_z.max())
    soft /= soft.sum()
    w = (1 - coeff) * soft
    w[pos] += coeff
    log_p = s_q - s_q.max() - np.log(np.sum(np.exp(s_q - s_q.max())))
    total += -np.sum(w * log_p)
  return total / len(q)


@pytest.mark.parametrize("positive", ["zero_logit", "exclude"])
@pytest.mark.parametrize("coeff", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("negatives", ["queue", "batch", "both"])
def test_matches_numpy(positive, coeff, negatives):
  rng = np.random.default_rng(0)
  n, d, k = 6, 16, 24
  q, z = _unit(rng, n, d), _unit(rng, n, d)
  queue = _unit(rng, k, d) if negatives != "batch" else None
  kw = dict(temp=0.1, temp_m=0.07, coeff=coeff, positive=positive)
  extra, ref_extra = {}, {}
  if negatives != "queue":
    # This device's rows sit at global rows 4..9 of a 12-row gathered batch.
    keys = _unit(rng, 12, d)
    keys[4:10] = z
    index = np.arange(4, 10)
    extra = dict(batch_keys=jnp.asarray(keys, jnp.float32), batch_index=jnp.asarray(index))
    ref_extra = dict(keys=keys, index=index)
  got = losses.sce_loss(jnp.asarray(q, jnp.float32), jnp.asarray(z, jnp.float32),
                        None if queue is None else jnp.asarray(queue, jnp.float32),
                        **kw, **extra)
  want = reference(q, z, queue, **kw, **ref_extra)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-5)


def test_coeff_one_is_infonce_with_queue():
  rng = np.random.default_rng(1)
  q, z, queue = _unit(rng, 8, 16), _unit(rng, 8, 16), _unit(rng, 32, 16)
  logits = np.concatenate([np.sum(q * z, 1, keepdims=True), q @ queue.T], 1) / 0.2
  infonce = np.mean(np.log(np.sum(np.exp(logits), 1)) - logits[:, 0])
  got = losses.sce_loss(jnp.asarray(q), jnp.asarray(z), jnp.asarray(queue), temp=0.2,
                        temp_m=0.05, coeff=1.0)
  np.testing.assert_allclose(float(got), infonce, rtol=1e-5)


def test_positive_modes_differ_slightly():
  """Spec 1: the two conventions differ by a small amount on random data."""
  rng = np.random.default_rng(2)
  q, z, queue = _unit(rng, 64, 128), _unit(rng, 64, 128), _unit(rng, 4096, 128)
  kw = dict(temp=0.1, temp_m=0.07, coeff=0.5)
  a = losses.sce_loss(q, z, queue, positive="zero_logit", **kw)
  b = losses.sce_loss(q, z, queue, positive="exclude", **kw)
  assert 0 < abs(float(a) - float(b)) < 1e-2


def test_no_gradient_to_target_or_queue():
  rng = np.random.default_rng(3)
  q, z, queue = (jnp.asarray(_unit(rng, *s), jnp.float32) for s in ((4, 8), (4, 8), (16, 8)))
  f = lambda q, z, queue: losses.sce_loss(q, z, queue, temp=0.1, temp_m=0.05, coeff=0.5)
  gq, gz, gqueue = jax.grad(f, argnums=(0, 1, 2))(q, z, queue)
  assert float(jnp.abs(gq).sum()) > 0
  assert float(jnp.abs(gz).sum()) == 0 and float(jnp.abs(gqueue).sum()) == 0


def test_crop_pairs():
  assert losses.crop_pairs(2, 2, symmetric=True) == [(0, 1), (1, 0)]
  pairs = losses.crop_pairs(6, 2, symmetric=True)
  assert len(pairs) == 10 and all(i != j and i < 2 for i, j in pairs)
  assert losses.crop_pairs(2, 2, symmetric=False) == [(0, 1)]
