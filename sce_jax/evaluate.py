"""Evaluation of a frozen trunk (spec section 7): weighted kNN and the linear probe.

Everything runs sharded over the `data` mesh: batches are split over devices, trunk and head
are replicated. The trunk is always in inference mode (BatchNorm running statistics).
`trunk_variables` is {'params': ..., 'batch_stats': ...} of the online trunk alone, e.g.
`trunk_variables(state)` or sce_jax.convert.load_trunk for imported weights.
"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from sce_jax import losses, optim
from sce_jax.data import augment, pipeline
from sce_jax.data.presets import ViewSpec
from sce_jax.models import resnet
from sce_jax.train_step import DATA


def trunk_variables(state):
  """The online trunk's variables of a TrainState (what evaluation reads)."""
  return {"params": state.params["trunk"], "batch_stats": state.batch_stats["trunk"]}


def make_trunk(model_cfg):
  """The trunk alone, built as SCENet builds it, so a TrainState's trunk variables fit."""
  return resnet.resnet(model_cfg.trunk, width=model_cfg.width, small_stem=model_cfg.small_stem,
                       dtype=jnp.dtype(model_cfg.dtype))


def _to_host(x):
  """A global array as one NumPy array on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return multihost_utils.process_allgather(x, tiled=True)


def _put(x, sharding):
  """A host array (the same on every process) as a global array with `sharding`."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def extract_features(trunk, variables, data_cfg, split, *, batch_size, mesh):
  """Raw trunk features and labels of every example of `split`, each exactly once.

  Returns (features (N, D) float32, labels (N,) int32) as host arrays, in the iterator's order;
  padding rows of the last batch (mask False) are dropped. Host arrays, because a train set's
  features (ImageNet: 1.28M x 2048) need not fit on one device; knn_scores shards them back.
  """
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA))

  @jax.jit
  def forward(variables, images):
    x = augment.normalize(images.astype(jnp.float32) / 255.0, data_cfg.mean, data_cfg.std)
    return trunk.apply(variables, x, train=False).astype(jnp.float32)

  variables = jax.device_put(variables, replicated)
  outputs = [(forward(variables, b["image"]), b["label"], b["mask"])
             for b in pipeline.eval_iterator(data_cfg, split, global_batch_size=batch_size,
                                             sharding=rows)]
  feats, labels, mask = (np.concatenate([_to_host(o[i]) for o in outputs]) for i in range(3))
  return feats[mask], labels[mask].astype(np.int32)


def _nearest(train_feats, train_labels, test_feats, k):
  """Similarities and labels of the k most similar train rows; rows labelled -1 are padding."""
  sims = test_feats @ train_feats.T
  sims = jnp.where(train_labels[None, :] >= 0, sims, -jnp.inf)
  sims, idx = jax.lax.top_k(sims, k)
  return sims, train_labels[idx]


def _vote(sims, labels, temp, num_classes):
  """InstDisc / lightly weighted vote: each neighbour adds exp(sim / T) to its class."""
  weights = jnp.exp(sims / temp)
  return jnp.einsum("nk,nkc->nc", weights, jax.nn.one_hot(labels, num_classes))


def knn_predict(train_feats, train_labels, test_feats, k, temp, num_classes):
  """Class scores (M, num_classes) of weighted kNN on L2-normalised features (spec 7)."""
  sims, labels = _nearest(train_feats, train_labels, test_feats, k)
  return _vote(sims, labels, temp, num_classes)


def knn_scores(train_feats, train_labels, test_feats, *, k, temp, num_classes, mesh, chunk):
  """knn_predict on the accelerator for any number of rows (ImageNet's does not fit at once).

  The train set is sharded over the mesh (padded with label -1), test rows go in chunks of
  `chunk`, replicated: each device takes the top k of its shard, the k best of all devices'
  candidates are then exactly the global top k. Features are L2-normalised here.
  Returns host scores (M, num_classes).
  """
  n_dev = mesh.devices.size
  n = train_feats.shape[0]
  pad = -n % n_dev
  train_feats = np.pad(train_feats, ((0, pad), (0, 0)))
  train_labels = np.pad(train_labels, (0, pad), constant_values=-1)
  k = min(k, n)
  k_local = min(k, train_feats.shape[0] // n_dev)

  def local(train_feats, train_labels, test_feats):
    unit = losses.l2_normalize
    sims, labels = _nearest(unit(train_feats), train_labels, unit(test_feats),
                            k_local)
    sims = jax.lax.all_gather(sims, DATA, axis=1, tiled=True)
    labels = jax.lax.all_gather(labels, DATA, axis=1, tiled=True)
    sims, idx = jax.lax.top_k(sims, k)
    return _vote(sims, jnp.take_along_axis(labels, idx, axis=1), temp, num_classes)

  # After the all_gather every device holds the same scores; check_vma cannot tell.
  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(DATA), P(DATA), P()),
                             out_specs=P(), check_vma=False))
  rows, replicated = NamedSharding(mesh, P(DATA)), NamedSharding(mesh, P())
  train_feats, train_labels = _put(train_feats, rows), _put(train_labels, rows)
  m = test_feats.shape[0]
  test_feats = np.pad(test_feats, ((0, -m % chunk), (0, 0)))
  scores = [np.asarray(fn(train_feats, train_labels, _put(test_feats[i:i + chunk], replicated)))
            for i in range(0, m, chunk)]
  return np.concatenate(scores)[:m]


def topk_accuracy(scores, labels, ks=(1, 5)):
  """Fraction of rows whose label is among the k highest scores, for each k (capped at C)."""
  order = np.argsort(-scores, axis=1, kind="stable")
  hits = order == np.asarray(labels)[:, None]
  return [float(hits[:, :k].any(axis=1).mean()) for k in ks]


def knn_eval(config, trunk_variables, mesh):
  """Weighted kNN top-1/top-5 (k=config.eval.knn_k, T=config.eval.knn_temp; spec 7)."""
  data = config.data
  trunk = make_trunk(config.model)
  extract = lambda split: extract_features(trunk, trunk_variables, data, split,
                                           batch_size=config.eval.batch_size, mesh=mesh)
  train_feats, train_labels = extract(data.train_split)
  test_feats, test_labels = extract(data.eval_split)
  scores = knn_scores(train_feats, train_labels, test_feats, k=config.eval.knn_k,
                      temp=config.eval.knn_temp, num_classes=pipeline.num_classes(data),
                      mesh=mesh, chunk=config.eval.batch_size)
  top1, top5 = topk_accuracy(scores, test_labels)
  return {"knn_top1": top1, "knn_top5": top5}


def random_pad_crop(key, images, padding):
  """torchvision RandomCrop(size, padding): zero-pad, then a uniform window of the input size."""
  b, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, image.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def linear_head(num_classes):
  """Spec 7: weights N(0, 0.01), zero bias."""
  return nn.Dense(num_classes, kernel_init=nn.initializers.normal(0.01), name="head")


def make_linear_step(head, tx, features_fn, mesh):
  """The jitted probe step: step(params, opt_state, frozen, inputs, labels, key).

  features_fn(frozen, key, inputs) -> (B, D) features, under stop-gradient; `frozen` (the trunk
  variables) is an argument, not a closure, so the weights are not baked into the program.
  With features_fn = lambda frozen, key, x: x the step trains on given features.
  Returns (params, opt_state, {'loss', 'top1'}).
  """

  def step(params, opt_state, frozen, inputs, labels, key):
    feats = jax.lax.stop_gradient(features_fn(frozen, key, inputs)).astype(jnp.float32)

    def loss_fn(params):
      logits = head.apply({"params": params}, feats)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    top1 = jnp.mean(jnp.argmax(logits, -1) == labels)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, "top1": top1}

  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA))
  return jax.jit(step, in_shardings=(replicated, replicated, replicated, rows, rows, replicated),
                 out_shardings=replicated, donate_argnums=(0, 1))


def linear_eval(config, trunk_variables, mesh, workdir=None):
  """Linear evaluation (spec 7) of the frozen trunk; returns linear_top1 / linear_top5.

  Training crops: the host's random resized crop (scale 0.08-1) for ImageNet-size data; for
  small sets (image_size < 128, as sce_jax.data.crop) the host passes whole images and the
  accelerator takes a random 32-crop of the 4-padded image. Both then flip (p 0.5) and
  normalise on the accelerator. The trunk runs on every step. With a workdir, the training
  curve goes to <workdir>/linear_metrics.jsonl.
  """
  lin, data = config.eval.linear, config.data
  small = data.image_size < 128
  view = (ViewSpec(data.image_size, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=0.0, gray=0.0)
          if small else ViewSpec(data.image_size, scale=(0.08, 1.0), jitter=0.0, gray=0.0))
  trunk = make_trunk(config.model)

  def features_fn(frozen, key, images):
    crop_key, aug_key = jax.random.split(key)
    if small:
      images = random_pad_crop(crop_key, images, 4)
    x = augment.augment_view(aug_key, images, view, data.mean, data.std)
    return trunk.apply(frozen, x, train=False)

  steps_per_epoch = max(pipeline.num_examples(data, data.train_split) // lin.batch_size, 1)
  total_steps = int(lin.epochs * steps_per_epoch)
  lr_fn = optax.cosine_decay_schedule(lin.base_lr * lin.batch_size / 256, total_steps)
  tx = optim.sgd(lr_fn, weight_decay=lin.weight_decay, momentum=lin.momentum)
  head = linear_head(pipeline.num_classes(data))
  dim = resnet.feature_dim(config.model.trunk, config.model.width)
  init_key, key = jax.random.split(jax.random.key(config.seed))
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(head.init(init_key, jnp.zeros((1, dim)))["params"], replicated)
  opt_state = jax.device_put(tx.init(params), replicated)
  frozen = jax.device_put(trunk_variables, replicated)
  step_fn = make_linear_step(head, tx, features_fn, mesh)

  num_steps = min(total_steps, lin.max_steps) if lin.max_steps > 0 else total_steps
  batches = pipeline.train_iterator(data, global_batch_size=lin.batch_size, views=(view,),
                                    seed=config.seed, start_step=0,
                                    sharding=NamedSharding(mesh, P(DATA)))
  log = []
  try:
    for step, batch in zip(range(num_steps), batches):
      params, opt_state, metrics = step_fn(params, opt_state, frozen, batch["views"][0],
                                           batch["label"], jax.random.fold_in(key, step))
      if (step + 1) % config.log_every_steps == 0 or step + 1 == num_steps:
        record = {"step": step + 1, **{f"linear_{k}": float(v) for k, v in metrics.items()}}
        logging.info("linear eval %s", record)
        log.append(record)
  finally:
    batches.close()  # stops the host pipeline (grain workers) of the infinite stream

  feats, labels = extract_features(trunk, trunk_variables, data, data.eval_split,
                                   batch_size=config.eval.batch_size, mesh=mesh)
  params = jax.device_get(params)
  top1, top5 = topk_accuracy(feats @ params["kernel"] + params["bias"], labels)
  if workdir and jax.process_index() == 0:
    (epath.Path(workdir) / "linear_metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in log))
  return {"linear_top1": top1, "linear_top5": top5}
