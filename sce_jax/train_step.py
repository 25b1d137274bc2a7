"""One training step for every method (`methods`), jitted over a `data` mesh (docs/SCE.md
sections 1-3, "Other methods").

Shape of the step: colour augmentations on the accelerator; the EMA target branch (where the
method has one) on its views (shuffle-BN: its trunk's BatchNorm split into groups of a
permutation of the batch); the online branch on every crop it sees, one forward pass per view
(or, with model.concat_views, per run of same-size views); the method's loss inside
`jax.shard_map`, where each device gathers what it needs from the others; optax update; EMA of
the target after it; FIFO queue update (methods with a queue) with the target embeddings of the
whole global batch. Everything outside the shard_map is written for the global batch, so
BatchNorm statistics are those of the global batch (synchronised BN).

optim.accum_steps = k > 1 (docs/SCE.md 5): the target embeds the whole batch first; then the
online branch and the loss run on k micro-batches in turn (each against the whole batch's
target keys), their gradients averaged into the one update, EMA and queue write of the step.
Only the online BatchNorm sees less: each micro-batch's statistics.
"""
import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from sce_jax import losses, methods, sharding
from sce_jax.sharding import DATA


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _passes(views, indices, concat):
  """The views of each forward pass: one each, or with `concat` each run of consecutive
  same-size views (docs/SCE.md 2)."""
  passes = []
  for i in indices:
    if concat and passes and views[passes[-1][-1]].shape == views[i].shape:
      passes[-1].append(i)
    else:
      passes.append([i])
  return passes


def shuffle_orders(key, target_views, batch_size):
  """Shuffle-BN (docs/SCE.md 3): {target view: (B,) each image's place in a random permutation
  of the batch}, one permutation per target view, as the authors draw them."""
  keys = jax.random.split(key, len(target_views))
  return {i: jnp.argsort(jax.random.permutation(k, batch_size))
          for i, k in zip(target_views, keys)}


def _forward(model, params, batch_stats, views, indices, concat, key=None, orders=None):
  """Runs `model` on the views `indices`; returns outputs per view and the new BN statistics.

  The statistics are threaded through the passes in view order, so they end as after the
  authors' sequential per-view passes. A concatenated pass stacks its views image-major,
  (B, V, ...) -> (B * V, ...): a batch-sharded view then stays on its devices (view-major
  concatenation would move images between devices). key: the ViT's stochastic depth draws
  (one stream a pass), or None without it. orders: {view: (B,) each image's place in a
  shuffled batch} (`shuffle_orders`), whose groups the target trunk's split BatchNorms
  normalise (shuffle-BN, docs/SCE.md 3): the images stay where they are, only their groups
  are shuffled.
  """
  outs = {}
  for n, group in enumerate(_passes(views, indices, concat)):
    x = jnp.stack([views[i] for i in group], axis=1)
    positions = None if orders is None else (  # row (b, k) of the image-major stack
        jnp.stack([orders[i] for i in group], axis=1) * len(group) +
        jnp.arange(len(group))).reshape(-1)
    rngs = {} if key is None else {"dropout": jax.random.fold_in(key, n)}
    out, upd = model.apply({"params": params, "batch_stats": batch_stats},
                           x.reshape(-1, *x.shape[2:]), train=True, bn_positions=positions,
                           mutable=["batch_stats"], rngs=rngs)
    batch_stats = upd["batch_stats"]
    for k, i in enumerate(group):
      outs[i] = jax.tree.map(lambda a: a.reshape(-1, len(group), *a.shape[1:])[:, k], out)
  return outs, batch_stats


def ema_update(target_params, online_params, m):
  """t = m * t + (1 - m) * o over the target's parameters (docs/SCE.md 3), after the optimiser."""
  return jax.tree.map(lambda t, o: m * t + (1.0 - m) * o, target_params,
                      {k: online_params[k] for k in target_params})


def enqueue(queue, ptr, keys):
  """Writes `keys` (all devices' target embeddings, in global order) at the FIFO pointer."""
  if queue.shape[0] % keys.shape[0]:
    raise ValueError(f"sce.queue={queue.shape[0]} must be a multiple of the {keys.shape[0]} "
                     "target embeddings written per step (batch_size x target views).")
  queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, 0))
  return queue, (ptr + keys.shape[0]) % queue.shape[0]


def make_loss_fn(method, config, mesh, pairs):
  """The method's loss (`methods`' make_loss) over the mesh, averaged over the devices.

  Returns f(qs, zs, queue, keys=None) -> (loss, metrics) where qs / zs map view index to (B, D)
  embeddings sharded over `data`, queue is (K, D) replicated or None, and keys is the
  `losses.BatchKeys` of the whole global batch (embeddings replicated, index sharded like qs),
  by default zs' own: qs are then the whole batch.
  """
  local = method.make_loss(config, pairs)

  def averaged(qs, zs, queue, keys):
    return jax.lax.pmean(local(qs, zs, queue, keys), DATA)

  def loss_fn(qs, zs, queue, keys=None):
    if keys is None:
      replicated = sharding.replicated(mesh)
      keys = losses.BatchKeys({i: jax.lax.with_sharding_constraint(z, replicated)
                               for i, z in zs.items()},
                              jnp.arange(next(iter(qs.values())).shape[0]))
    specs = ({k: P(DATA) for k in qs}, {k: P(DATA) for k in zs}, P(),
             losses.BatchKeys(P(), P(DATA)))
    fn = jax.shard_map(averaged, mesh=mesh, in_specs=specs, out_specs=P())
    return fn(qs, zs, queue, keys)

  return loss_fn


def micro_batches(x, k, mesh):
  """(B, ...) -> (k, B / k, ...) sharded over `data` (optim.accum_steps): micro-batch j holds
  rows j x m to (j + 1) x m - 1 of each device's B / devices rows (m = B / devices / k), so no
  row leaves its device."""
  x = x.reshape(mesh.shape[DATA], k, -1, *x.shape[1:]).swapaxes(0, 1)
  return jax.lax.with_sharding_constraint(x.reshape(k, -1, *x.shape[3:]),
                                          NamedSharding(mesh, P(None, DATA)))


def make_train_step(config, mesh, online, target, tx, lr_fn, ema_fn, pairs, prepare=None,
                    batch_sharding=None, state_sharding=None, *, steps_per_epoch):
  """Builds the jitted step(state, batch) -> (state, metrics).

  prepare(key, batch) -> {'views': tuple of normalised float (B, H_v, W_v, 3) views, 'label':
  (B,) int32} is the input stage run inside the step (host crops: `augment.augment_batch`;
  data on the device: `resident.prepare`); without it, batch is such a dict, used as given.
  batch_sharding: the batch's shardings (default: every leaf split over `data`); arrays in the
  batch are arguments of the step, never donated. pairs: `losses.crop_pairs` of the views.
  state_sharding: the state's shardings (`state.shardings`; default: replicated), in and out:
  with FSDP XLA gathers each layer's weights where the step uses them.
  steps_per_epoch: of the method's schedules by epoch (DINO's teacher temperature).
  """
  method = methods.get(config.method)
  embed = methods.embed(method)
  targets = methods.make_targets(method, config, steps_per_epoch)
  uses_queue = method.uses_queue(config)
  target_views, online_views = losses.target_views(pairs), losses.online_views(pairs)
  # Without an EMA target the online network embeds the target views too, with gradients.
  online_passes = (online_views if method.EMA_TARGET
                   else sorted({*target_views, *online_views}))
  loss_fn = make_loss_fn(method, config, mesh, pairs)
  concat = config.model.concat_views
  accum = config.optim.accum_steps
  replicated = sharding.replicated(mesh)

  def step(state, batch):
    rng, aug_key = jax.random.split(state.rng)
    if prepare is not None:
      batch = prepare(aug_key, batch)
    views = list(batch["views"])
    # Stochastic depth in both networks, as eztorch's momentum trunk in training mode.
    t_key = o_key = None
    if config.model.drop_path > 0:
      rng, t_key, o_key = jax.random.split(rng, 3)
      t_key = t_key if config.sce.target_drop_path else None

    zs, keys, t_stats, memory, t_metrics = None, None, state.target_batch_stats, state.queue, {}
    if method.EMA_TARGET:
      orders = None  # shuffle-BN
      if config.sce.target_bn_splits:
        rng, shuffle_key = jax.random.split(rng)
        orders = shuffle_orders(shuffle_key, target_views, views[0].shape[0])
      t_out, t_stats = _forward(target, state.target_params, state.target_batch_stats, views,
                                target_views, concat, t_key, orders)
      zs = {i: jax.lax.stop_gradient(embed(t_out[i]["proj"])) for i in target_views}
      if targets is not None:  # DINO: centred, sharpened; the centre's update
        zs, memory, t_metrics = targets(zs, state.queue, state.step)
      # All devices' keys, gathered view by view (no all-to-all): the in-batch negatives of
      # every micro-batch, and the queue's update (XLA drops the gather where neither is).
      keys = {i: jax.lax.with_sharding_constraint(zs[i], replicated) for i in target_views}

    def objective(params, views, zs, label, index, key):
      """The loss of a (micro-)batch: its views, target embeddings, labels and rows' places
      in the global batch."""
      o_out, stats = _forward(online, params, state.batch_stats, views, online_passes, concat,
                              key)
      qs = {j: embed(o_out[j]["pred"]) for j in online_passes}
      own = zs if method.EMA_TARGET else {i: embed(o_out[i]["proj"]) for i in target_views}
      batch_keys = None if keys is None else losses.BatchKeys(keys, index)
      loss, metrics = loss_fn(qs, own, state.queue if uses_queue else None, batch_keys)
      total = loss
      if "logits" in o_out[online_views[0]]:  # The probe: mean over the full-size views.
        probed = [o_out[j]["logits"] for j in online_views
                  if views[j].shape == views[online_views[0]].shape]
        mean = lambda per_view: sum(per_view) / len(probed)
        probe_loss = mean([optax.softmax_cross_entropy_with_integer_labels(
            logits, label).mean() for logits in probed])
        metrics["probe_loss"] = probe_loss
        metrics["probe_top1"] = mean([jnp.mean(jnp.argmax(logits, -1) == label)
                                      for logits in probed])
        total = total + probe_loss
      metrics["loss"] = loss
      return total, (metrics, stats)

    gradient = jax.grad(objective, has_aux=True)
    inputs = (views, zs, batch["label"], jnp.arange(views[0].shape[0]))
    if accum == 1:
      grads, (metrics, stats) = gradient(state.params, *inputs, o_key)
    else:  # optim.accum_steps: a loop over the micro-batches, gradients summed
      def accumulate(total, micro):
        j, inputs = micro
        key = None if o_key is None else jax.random.fold_in(o_key, j)
        grads, aux = gradient(state.params, *inputs, key)
        return jax.tree.map(jnp.add, total, grads), aux

      split = functools.partial(micro_batches, k=accum, mesh=mesh)
      total, (metrics, stats) = jax.lax.scan(
          accumulate, jax.tree.map(jnp.zeros_like, state.params),
          (jnp.arange(accum), jax.tree.map(split, inputs)))
      grads = jax.tree.map(lambda g: g / accum, total)  # each loss is a mean over its rows
      # Metrics: the batch's means. BN running statistics: one update a step, as k = 1, by
      # the micro-batches' mean (each updated from the step's starting statistics).
      metrics, stats = jax.tree.map(lambda x: jnp.mean(x, axis=0), (metrics, stats))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    target_params = state.target_params
    if method.EMA_TARGET:
      m = ema_fn(state.step)
      target_params = ema_update(target_params, params, m)
      metrics["ema_momentum"] = m
    queue, ptr = memory, state.queue_ptr
    if uses_queue:
      queue, ptr = enqueue(queue, ptr, jnp.concatenate([keys[i] for i in target_views]))

    metrics.update(t_metrics)
    metrics.update(lr=lr_fn(state.step),
                   grad_norm=_global_norm({k: v for k, v in grads.items() if k != "probe"}))
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                              target_params=target_params, target_batch_stats=t_stats,
                              opt_state=opt_state, queue=queue, queue_ptr=ptr, rng=rng)
    return new_state, metrics

  state_sharding = state_sharding or replicated
  return jax.jit(step, in_shardings=(state_sharding, batch_sharding or sharding.rows(mesh)),
                 out_shardings=(state_sharding, replicated), donate_argnums=0)
