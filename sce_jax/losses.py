"""The SCE objective (docs/SCE.md section 1) and the crop pairing (section 2).

Per row, over the columns [positives / in-batch keys, queue]:
  online logits  s_q = q . keys / temp
  target logits  s_z = z . keys / temp_m, with the positive's own column set to m
  w = coeff * onehot(positive) + (1 - coeff) * softmax(s_z)
  L = - sum_j w_j log_softmax(s_q)_j
"""
import jax
import jax.numpy as jnp

# sce.positive -> the positive's own target logit m. The authors' code sets the positive's
# target similarity to 0 (m = 0); the paper leaves it out of the relational distribution
# (m = -inf). Docs section 1.
POSITIVE_LOGIT = {"zero_logit": 0.0, "exclude": -jnp.inf}
# sce.negatives: the queue (the reference), the global batch's target keys, or both.
NEGATIVES = ("queue", "batch", "both")


def uses_queue(negatives) -> bool:
  return negatives in ("queue", "both")


def uses_batch(negatives) -> bool:
  return negatives in ("batch", "both")


def l2_normalize(x):
  """Rows of x to unit length, in float32 (embeddings of a bf16 network included)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def soft_contrastive(sim_q, sim_z, pos, *, temp, temp_m, coeff, positive="zero_logit"):
  """SCE from raw similarities.

  Args:
    sim_q: (N, C) online similarities q . keys.
    sim_z: (N, C) target similarities z . keys (no gradient).
    pos: (N,) column of each row's positive.
  Returns:
    (per-row loss (N,), target distribution w (N, C)).
  """
  onehot = jax.nn.one_hot(pos, sim_q.shape[1], dtype=sim_q.dtype)
  logits_z = jnp.where(onehot > 0, POSITIVE_LOGIT[positive], sim_z / temp_m)
  w = coeff * onehot + (1 - coeff) * jax.nn.softmax(logits_z, axis=-1)
  log_p = jax.nn.log_softmax(sim_q / temp, axis=-1)
  return -jnp.sum(w * log_p, axis=-1), w


def sce_loss(q, z, queue, *, temp, temp_m, coeff, positive="zero_logit", **negatives):
  """Mean SCE loss over the rows of q (arguments as in `sce_terms`)."""
  loss, _ = sce_terms(q, z, queue, temp=temp, temp_m=temp_m, coeff=coeff, positive=positive,
                      **negatives)
  return jnp.mean(loss)


def sce_terms(q, z, queue, *, temp, temp_m, coeff, positive="zero_logit",
              batch_keys=None, batch_index=None):
  """Per-row SCE loss (N,) and target distribution (N, C).

  Args:
    q: (N, D) L2-normalised online embeddings.
    z: (N, D) L2-normalised target embeddings of the other view (the positives).
    queue: (K, D) past target embeddings used as negatives, or None.
    batch_keys: optional (M, D) target embeddings of the global batch (all devices); when
      given they replace the positive column: every other row is an in-batch negative.
    batch_index: (N,) index of each row's own positive in batch_keys.
  """
  # Target embeddings, the queue and the gathered keys carry no gradient (docs/SCE.md section 1).
  z, queue, batch_keys = jax.lax.stop_gradient((z, queue, batch_keys))
  if batch_keys is None:
    sim_q = [jnp.sum(q * z, axis=-1, keepdims=True)]
    sim_z = [jnp.zeros_like(sim_q[0])]  # replaced by m below
    pos = jnp.zeros(q.shape[0], jnp.int32)
  else:
    sim_q, sim_z, pos = [q @ batch_keys.T], [z @ batch_keys.T], batch_index
  if queue is not None:
    sim_q.append(q @ queue.T)
    sim_z.append(z @ queue.T)
  return soft_contrastive(jnp.concatenate(sim_q, 1), jnp.concatenate(sim_z, 1), pos,
                          temp=temp, temp_m=temp_m, coeff=coeff, positive=positive)


def crop_pairs(num_views, num_global, symmetric):
  """(target view, online view) pairs whose losses are averaged (docs/SCE.md section 2).

  Symmetric (ImageNet): target view i over the global crops, online view j != i over all
  crops: 2 pairs for 2 crops, 10 for 2 + 4. Asymmetric (CIFAR): target view 0, online views
  1 .. num_views - 1.
  """
  if symmetric:
    return [(i, j) for i in range(num_global) for j in range(num_views) if j != i]
  return [(0, j) for j in range(1, num_views)]


def config_pairs(config, num_views):
  """crop_pairs of the pairing a config states (sce.num_global, sce.symmetric): the crop
  pairing of every method that follows SCE's (methods/: their `pairs`)."""
  return crop_pairs(num_views, config.sce.num_global, config.sce.symmetric)


def target_views(pairs):
  """The views the target embeds, in order: every global crop if symmetric, else view 0."""
  return sorted({i for i, _ in pairs})


def online_views(pairs):
  return sorted({j for _, j in pairs})


def pair_mean(per_row, qs, zs, pairs):
  """(loss, positives' cosine), each the mean over the (target view i, online view j) pairs of
  the mean over rows: of per_row(qs[j], zs[i]), and of qs[j] . zs[i]."""
  loss = sum(jnp.mean(per_row(qs[j], zs[i])) for i, j in pairs) / len(pairs)
  pos_sim = sum(jnp.mean(jnp.sum(qs[j] * zs[i], axis=-1)) for i, j in pairs) / len(pairs)
  return loss, pos_sim


# The other methods' losses (docs/SCE.md "Other methods"), each per row, as its reference
# states it; embeddings are L2-normalised, targets and queues carry no gradient.
def info_nce(q, z, queue, *, temp):
  """MoCo's InfoNCE (facebookresearch/moco, moco/builder.py): -log of the positive's softmax
  over [q . z, q . queue] / temp; SCE's loss at coeff = 1."""
  z, queue = jax.lax.stop_gradient((z, queue))
  logits = jnp.concatenate([jnp.sum(q * z, axis=-1, keepdims=True), q @ queue.T], 1) / temp
  return -jax.nn.log_softmax(logits, axis=-1)[:, 0]


def relational(q, z, queue, *, temp, temp_m):
  """ReSSL's loss (KyleZheng1997/ReSSL, ressl.py): the cross-entropy of the online
  distribution softmax(q . queue / temp) against the target's softmax(z . queue / temp_m);
  the positive is no column."""
  z, queue = jax.lax.stop_gradient((z, queue))
  return -jnp.sum(jax.nn.softmax(z @ queue.T / temp_m, axis=-1) *
                  jax.nn.log_softmax(q @ queue.T / temp, axis=-1), axis=-1)


def normalized_mse(p, z):
  """BYOL's regression loss (deepmind-research byol/utils/helpers.py): the squared distance of
  the unit vectors, 2 - 2 cos(p, z)."""
  return jnp.sum((l2_normalize(p) - jax.lax.stop_gradient(l2_normalize(z))) ** 2, axis=-1)


def moco_v3(q, keys, index, *, temp):
  """MoCo v3's contrastive loss (facebookresearch/moco-v3, moco/builder.py contrastive_loss),
  per row: the cross-entropy of q . keys / temp at the row's own key, x 2 temp; keys: every
  device's target embeddings of the other view (concat_all_gather, no gradient), index: each
  row's place in them. SCE's loss at coeff 1 with `batch_keys` and no queue."""
  keys = jax.lax.stop_gradient(keys)
  log_p = jax.nn.log_softmax(q @ keys.T / temp, axis=-1)
  return -jnp.take_along_axis(log_p, index[:, None], axis=1)[:, 0] * (2 * temp)


def nt_xent(a, b, a_all, b_all, index, *, temp):
  """SimCLR's NT-Xent (google-research/simclr tf2/objective.py add_contrastive_loss), per row:
  loss_a + loss_b, where loss_a is the cross-entropy of row a against [a . b_all, a . a_all
  without itself] / temp at its positive b; a_all / b_all: every device's rows of the views (the
  cross-replica concat, with gradients), index: each row's place in them."""
  self_mask = jax.nn.one_hot(index, a_all.shape[0], dtype=bool)

  def side(x, x_all, y_all):
    logits = jnp.concatenate([x @ y_all.T, jnp.where(self_mask, -jnp.inf, x @ x_all.T)], 1)
    log_p = jax.nn.log_softmax(logits / temp, axis=-1)
    return -jnp.take_along_axis(log_p, index[:, None], axis=1)[:, 0]

  return side(a, a_all, b_all) + side(b, b_all, a_all)
