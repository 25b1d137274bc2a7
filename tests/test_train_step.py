"""The sharded SCE step (docs/SCE.md sections 1-3) on fake CPU devices."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sce_jax import losses, sharding, train, train_step
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


def batch(seed, views=2, size=BATCH):
  rng = np.random.default_rng(seed)
  return {"views": tuple(rng.normal(size=(size, SIZE, SIZE, 3)).astype(np.float32)
                         for _ in range(views)),
          "label": rng.integers(0, 10, size).astype(np.int32)}


def run(config, devices, steps, seed=0, on_devices=False):
  """(state, metrics of each step, parts) after `steps` steps; the state on the host, or with
  on_devices as the step left it (its shardings)."""
  mesh = sharding.make_mesh(devices)
  parts = train.build(config, mesh, num_classes=10, steps_per_epoch=10, float_views=True)
  state = parts.init(jax.random.key(seed))
  metrics = []
  for i in range(steps):
    state, m = parts.step(state, batch(i))
    metrics.append(jax.device_get(m))
  return (state if on_devices else jax.device_get(state)), metrics, parts


IMAGENET_LIKE = {"sce.symmetric": True, "model.predictor.num_layers": 2,
                 "model.predictor.hidden_dim": 32, "model.projector.last_bn": True,
                 "sce.target_bn_splits": 0}


def close(a, b, name):
  """Equal up to float32 sums taken in another order (8 device partials, another tree): over
  at most B x H x W = 4096 terms that is ~sqrt(4096) x 6e-8 = 4e-6 of the terms' scale a sum,
  compounded over the ~20 layers of a pass; 1e-4 of each array's scale bounds it."""
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(np.abs(b).max(), 1e-3),
                             err_msg=name)


@pytest.mark.parametrize("overrides", [
    {},  # CIFAR: asymmetric pairing, queue negatives, shuffle-BN (8 groups), a pass per view
    {**IMAGENET_LIKE, "sce.negatives": "both", "sce.queue": 8 * BATCH, "optim.name": "lars",
     "sce.m_schedule": "cosine", "model.concat_views": True},
], ids=["cifar", "imagenet_like"])
def test_one_device_equals_eight(overrides):
  """Same global batch and seed on 1 and 8 devices: same loss, gradients (the first
  momentum buffer is gradient + decay), parameters, BN statistics and queue. The learning
  rate is small so that the second step starts from states within rounding of each other: a
  large step lets the second step's BatchNorms amplify the first step's rounding chaotically
  (1e-3 to 3e-2 of some bias arrays at lr 0.5, batch 32), whatever the code."""
  config = tiny_config(**{"optim.base_lr": 0.01, **overrides})
  one, m1, _ = run(config, jax.devices()[:1], 2)
  eight, m8, _ = run(config, jax.devices()[:8], 2)

  for a, b in zip(m1, m8):
    for k in ("loss", "grad_norm", "pos_sim", "target_entropy", "probe_loss"):
      close(a[k], b[k], k)
  for field in ("params", "batch_stats", "target_params", "target_batch_stats", "opt_state",
                "queue"):
    jax.tree.map(lambda a, b: close(a, b, field), getattr(one, field), getattr(eight, field))
  assert int(one.queue_ptr) == int(eight.queue_ptr)


@pytest.mark.slow  # ~40 s on 2 cores: two compilations of the step
def test_vit_one_device_equals_eight():
  """A ViT (no BatchNorm, no shuffle-BN; AdamW, clipping, stochastic depth, symmetric pairing,
  a pass per crop size) for 3 steps on 1 and on 8 devices: the same loss, parameters, Adam
  moments and queue. Each image's forward is the same computation on either mesh (nothing
  couples the rows of a batch), and the random streams (crops none here; the drop-path draws)
  do not depend on the sharding; what differs is the order of the cross-device sums: the
  gradients' (8 partial sums of 2 images x 17 tokens against one of 272 rows) and the loss
  mean. A float32 sum of 272 terms in another order moves by ~sqrt(272) x 6e-8 = 1e-6 of the
  terms' scale; AdamW's update m / sqrt(v) passes that on relatively, so 1e-4 of each array's
  scale (`close`) holds with a wide margin. One exception: the key bias of each qkv projection
  has an exact gradient of 0 (adding a constant to every key of a query leaves its softmax
  unchanged), so its float32 gradient is rounding noise, which Adam normalises into steps of
  up to lr = 6.25e-5 either way on both meshes: it is compared within 3 steps x 2 lr."""
  config = vit_config()
  one, m1, parts = run(config, jax.devices()[:1], 3)
  eight, m8, _ = run(config, jax.devices()[:8], 3)
  for a, b in zip(m1, m8):
    for k in ("loss", "grad_norm", "pos_sim", "target_entropy", "probe_loss"):
      close(a[k], b[k], k)
  assert one.batch_stats == {} and one.target_batch_stats == {}
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(),
                       jax.device_get(parts.init(jax.random.key(0)).params), one.params)
  assert min(jax.tree.leaves(moved["trunk"])) > 0  # 3 steps moved every trunk tensor
  for field in ("params", "target_params", "opt_state", "queue"):
    jax.tree_util.tree_map_with_path(vit_close(config, 3), getattr(one, field),
                                     getattr(eight, field))


def vit_config():
  """The smoke ViT (2 blocks of width 32) at 16 px, patch 4, AdamW, stochastic depth,
  symmetric pairing."""
  config = load_config("cifar10_vit", "smoke")
  config.update(batch_size=BATCH)
  config.data.image_size = SIZE
  config.model.update(patch_size=4, drop_path=0.2)
  config.optim.update(warmup_epochs=0, base_lr=1e-3)
  config.sce.update(queue=8 * BATCH, symmetric=True)
  return config


def vit_close(config, steps):
  """compare(path, a, b): `close`, but for the keys' share of each qkv bias (an exact gradient
  of 0, whose rounding noise Adam turns into steps of up to lr either way: within steps x 2
  lr)."""
  width, lr = config.model.width, config.optim.base_lr * BATCH / 256

  def compare(path, a, b):
    name = jax.tree_util.keystr(path)
    a, b = np.asarray(a), np.asarray(b)
    if name.endswith("['attn']['qkv']['bias']"):
      keys = slice(width, 2 * width)
      np.testing.assert_allclose(a[keys], b[keys], rtol=0, atol=steps * 2 * lr, err_msg=name)
      a, b = np.delete(a, np.r_[keys]), np.delete(b, np.r_[keys])
    close(a, b, name)
  return compare


def test_fsdp_rule_is_big_visions():
  """sharding.fsdp on 8 devices at big_vision's 4 MiB: arrays of more than 4 MiB split along
  their largest dimension that 8 divides (of equal ones, the last); ViT-L's 1024 x 1024
  float32 projection (exactly 4 MiB), arrays no dimension of which 8 divides, and scalars
  whole."""
  shapes = {"qkv": (1024, 3072), "square": (2048, 2048), "tall": (4104, 1025),
            "proj": (1024, 1024), "odd": (1025, 1027), "count": ()}
  tree = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
  specs = {k: s.spec for k, s in sharding.fsdp(tree, sharding.make_mesh(), 4 * 2**20).items()}
  data = sharding.DATA
  assert specs == {"qkv": P(None, data), "square": P(None, data), "tall": P(data),
                   "proj": P(), "odd": P(), "count": P()}


@pytest.mark.slow  # 50-60 s of CPU each: two compilations of the step and of init
@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_fsdp_step_equals_replicated(family):
  """sharding.params='fsdp' on 8 devices (min_size_mib 0: every array a dimension of which 8
  divides): the state's parameters, target parameters and optimiser state are split over
  `data` along their largest such dimension (an eighth of each on a device), the BN
  statistics, queue, step and rng replicated; 2 steps give the replicated step's loss,
  parameters, optimiser state and queue. The per-image computation is the same; XLA gathers
  each weight whole before it is used, and what may differ is the order of the gradients'
  cross-device sums (a reduce-scatter where it was an all-reduce: 8 float32 partials, ~8 x
  6e-8 of their scale, then through a second step's layers), which `close` bounds (1e-4 of
  each array's scale), with `vit_close`'s exception for Adam on zero gradients."""
  config = vit_config() if family == "vit" else tiny_config(**{"optim.base_lr": 0.01})
  compare = vit_close(config, 2) if family == "vit" else (
      lambda path, a, b: close(a, b, jax.tree_util.keystr(path)))
  replicated, m_r, _ = run(config, jax.devices(), 2)
  config.sharding.update(params="fsdp", min_size_mib=0.0)
  split, m_s, _ = run(config, jax.devices(), 2, on_devices=True)
  for a, b in zip(m_s, m_r):
    for k in ("loss", "grad_norm", "pos_sim", "probe_loss"):
      close(a[k], b[k], k)
  for field in ("params", "target_params", "opt_state", "batch_stats", "queue"):
    jax.tree_util.tree_map_with_path(compare, getattr(split, field), getattr(replicated, field))
  big = [x for x in jax.tree.leaves((split.params, split.target_params, split.opt_state))
         if any(d % 8 == 0 for d in x.shape)]
  assert len(big) > 20
  for x in big:
    dim = max((d, i) for i, d in enumerate(x.shape) if d % 8 == 0)[1]
    assert x.sharding.spec == P(*[None] * dim, sharding.DATA), (x.shape, x.sharding.spec)
    assert x.addressable_shards[0].data.size * 8 == x.size
  for x in jax.tree.leaves((split.batch_stats, split.target_batch_stats, split.queue,
                            split.queue_ptr, split.step, split.rng)):
    assert x.sharding.is_fully_replicated


def test_micro_batches_keep_each_device_rows():
  """32 rows on 8 devices in 4 micro-batches: micro-batch j is row j of each device's 4 rows,
  and stays on that device."""
  mesh = sharding.make_mesh()
  rows = jax.device_put(np.arange(32), sharding.rows(mesh))
  split = jax.jit(train_step.micro_batches, static_argnums=(1, 2))(rows, 4, mesh)
  np.testing.assert_array_equal(split, np.arange(32).reshape(8, 4).T)
  held = {shard.device: np.asarray(shard.data) for shard in rows.addressable_shards}
  for shard in split.addressable_shards:  # (4, 1): a device's row of each micro-batch
    np.testing.assert_array_equal(np.asarray(shard.data)[:, 0], held[shard.device])


@pytest.mark.slow  # ~40 s on 2 cores: an init and two step compilations
def test_accumulated_vit_step_equals_the_whole_batch_step():
  """optim.accum_steps=4 on 8 devices (32 images: each micro-batch one row of every device)
  against 1, from the same state and batches, for 2 steps: a ViT (no BatchNorm, so nothing
  couples the rows but the loss), symmetric pairing, SCE with in-batch and queue negatives
  (`both`: each micro-batch's rows against the whole batch's keys, at their own places), the
  probe. Same loss, probe loss, gradient norm, parameters, target parameters, momentum and
  queue; no all-to-all or permute moves a micro-batch. No drop-path (each micro-batch draws
  its own) and SGD, which passes gradient rounding on linearly (AdamW's first step turns the
  rounding noise of the qkv key bias's exactly-0 gradient into +-lr, as the test above notes).
  What differs is the order of float32 sums: the weight gradients over 32 images x 5 tokens
  in one sum or in 4 of 40 (the mean's 1/32 = 1/8 x 1/4 is exact in binary): ~sqrt(160) x
  6e-8 = 1e-6 of the terms' scale, then one SGD step; the second step's forward passes start
  1e-6 apart. `close`'s 1e-4 of each array's scale bounds it with a wide margin (1e-6 was
  measured)."""
  size = 32
  config = load_config("cifar10_vit", "smoke")
  config.update(batch_size=size)
  config.data.image_size = SIZE
  config.model.update(patch_size=8, depth=1, width=16, num_heads=1, drop_path=0.0)
  config.model.projector.update(hidden_dim=32, out_dim=16)
  config.model.predictor.update(hidden_dim=32)
  config.optim.update(name="sgd", warmup_epochs=0, base_lr=1.0)
  config.sce.update(queue=8 * size, symmetric=True, negatives="both")
  mesh = sharding.make_mesh()
  start = None
  runs = {}
  for k in (1, 4):
    config.optim.accum_steps = k
    parts = train.build(config, mesh, num_classes=10, steps_per_epoch=10, float_views=True)
    start = start or parts.init(jax.random.key(0))  # the same for both
    state, metrics = jax.tree.map(jnp.copy, start), []  # the step donates it
    for i in range(2):
      state, m = parts.step(state, batch(i, size=size))
      metrics.append(jax.device_get(m))
    runs[k] = jax.device_get(state), metrics
  hlo = parts.step.lower(start, batch(0, size=size)).compile().as_text()  # k = 4's, cached
  assert "all-to-all" not in hlo and "collective-permute" not in hlo
  (one, m1), (four, m4) = runs[1], runs[4]
  for a, b in zip(m1, m4):
    for k in ("loss", "grad_norm", "pos_sim", "target_entropy", "probe_loss"):
      close(a[k], b[k], k)
  for field in ("params", "target_params", "opt_state", "queue"):
    jax.tree.map(lambda a, b: close(a, b, field), getattr(one, field), getattr(four, field))
  assert int(one.queue_ptr) == int(four.queue_ptr) == 4 * size  # 2 steps x 2 views


def _hand_step(parts, config, state, views, concat):
  """One step's loss, gradients and BN statistics straight from the modules: one forward
  pass per view, the statistics threaded in view order; or (concat) one pass on the views
  concatenated view-major, as the step did before it stacked them image-major."""
  def forward(model, params, stats, indices):
    apply = lambda x, stats: model.apply({"params": params, "batch_stats": stats}, x,
                                         train=True, mutable=["batch_stats"])
    if concat:
      out, upd = apply(jnp.concatenate([views[i] for i in indices]), stats)
      split = lambda k: jax.tree.map(lambda a: jnp.split(a, len(indices))[k], out)
      return {i: split(k) for k, i in enumerate(indices)}, upd["batch_stats"]
    outs = {}
    for i in indices:
      outs[i], upd = apply(views[i], stats)
      stats = upd["batch_stats"]
    return outs, stats

  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  t_out, t_stats = forward(parts.target, state.target_params, state.target_batch_stats, (0, 1))
  kw = dict(temp=config.sce.temp, temp_m=config.sce.temp_m, coeff=config.sce.coeff)

  def loss_fn(params):
    o_out, stats = forward(parts.online, params, state.batch_stats, (0, 1))
    terms = [losses.sce_loss(unit(o_out[j]["pred"]), unit(t_out[i]["proj"]), state.queue, **kw)
             for i, j in parts.pairs]
    return sum(terms) / len(terms), stats

  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  momentum = jax.tree.map(lambda g, p: g + config.optim.weight_decay * p, grads, state.params)
  return loss, momentum, stats, t_stats


def test_views_pass_one_by_one_or_image_major():
  """model.concat_views=False: the step equals a step computed by hand with one forward pass
  per view, BN statistics updated in view order (docs/SCE.md 2). True: it equals the
  view-major concatenated pass; the step stacks the views image-major instead, and BatchNorm
  statistics do not depend on the order of the rows, so only float32 summation order differs
  (`close`). Neither compiles to an all-to-all on 8 devices: each device keeps its images."""
  config = tiny_config(**IMAGENET_LIKE, **{"probe.enabled": False})
  mesh = sharding.make_mesh()
  stats, start = {}, None
  for concat in (False, True):
    config.model.concat_views = concat
    parts = train.build(config, mesh, num_classes=10, steps_per_epoch=10, float_views=True)
    start = start or parts.init(jax.random.key(0))  # the same for both settings
    state = jax.tree.map(jnp.copy, start)  # the step donates it
    want = jax.device_get(jax.jit(functools.partial(_hand_step, parts, config, concat=concat))(
        state, batch(0)["views"]))
    state, metrics = parts.step(state, batch(0))
    close(metrics["loss"], want[0], "loss")
    jax.tree.map(lambda a, b: close(a, b, "momentum"),
                 state.opt_state.inner_states["sce"].inner_state[1].trace, want[1])
    jax.tree.map(lambda a, b: close(a, b, "batch_stats"), state.batch_stats, want[2])
    jax.tree.map(lambda a, b: close(a, b, "target_batch_stats"), state.target_batch_stats,
                 want[3])
    stats[concat] = jax.device_get(state.target_batch_stats)
    compiled = parts.step.lower(jax.eval_shape(parts.init, jax.random.key(0)), batch(0))
    assert "all-to-all" not in compiled.compile().as_text()
  # The two settings differ: two updates of the running statistics against one.
  differ = jax.tree.map(lambda a, b: np.abs(a - b).max() / np.abs(b).max(), stats[False],
                        stats[True])
  assert max(jax.tree.leaves(differ)) > 1e-2


def test_shuffle_bn_moves_no_image():
  """Shuffle-BN on 8 devices shuffles the target's BatchNorm groups, not the images: no
  collective of the step carries a batch of images or activations (a (16, H, W, C) array),
  and the group statistics are (8, C) all-reduces."""
  parts = train.build(tiny_config(), sharding.make_mesh(), num_classes=10, steps_per_epoch=10,
                      float_views=True)
  hlo = parts.step.lower(jax.eval_shape(parts.init, jax.random.key(0)), batch(0)).compile()
  moved = [line for line in hlo.as_text().splitlines()
           if re.search(r"(all-gather|all-reduce|all-to-all|collective-permute)(-start)?\(",
                        line) and re.search(rf"\[{BATCH},\d+,\d+,\d+\]", line)]
  assert not moved, moved[:3]


@pytest.mark.parametrize("concat", [False, True])
def test_shuffle_bn_draws_one_permutation_per_target_view(concat):
  """Two target views (symmetric pairing): each gets its own permutation of the batch, and the
  target's split BatchNorm sees each view's rows at that view's places: in a concatenated
  pass of views (0, 1) stacked image-major, row (b, k) at place orders[k][b] x 2 + k."""
  orders = train_step.shuffle_orders(jax.random.key(0), [0, 1], BATCH)
  assert sorted(orders) == [0, 1]
  for order in orders.values():
    assert sorted(np.asarray(order).tolist()) == list(range(BATCH))
  assert not np.array_equal(orders[0], orders[1])
  seen = []

  class Recorder:  # the target network's apply, recording the BatchNorm places it is given
    def apply(self, variables, x, *, bn_positions, **kwargs):
      del kwargs
      seen.append(np.asarray(bn_positions))
      return {"proj": x.reshape(x.shape[0], -1)}, {"batch_stats": variables["batch_stats"]}

  views = batch(0)["views"]
  train_step._forward(Recorder(), {}, {}, views, [0, 1], concat, orders=orders)
  if concat:
    want = [(np.stack([orders[0], orders[1]], axis=1) * 2 + np.arange(2)).reshape(-1)]
  else:
    want = [np.asarray(orders[0]), np.asarray(orders[1])]
  assert len(seen) == len(want)
  for got, expected in zip(seen, want):
    np.testing.assert_array_equal(got, expected)


def test_bfloat16_gradients_are_summed_in_float32(tmp_path):
  """A bfloat16 step on 8 devices all-reduces its gradients in float32 (docs/SCE.md 5): every
  all-reduce of the program right after SPMD partitioning, where XLA puts them, is float32.
  (The final program cannot show it: XLA:CPU then promotes bfloat16 all-reduces to float32 by
  itself, which TPUs and GPUs do not.)"""
  config = tiny_config(**{"model.dtype": "bfloat16"})
  parts = train.build(config, sharding.make_mesh(), num_classes=10, steps_per_epoch=10,
                      float_views=True)
  lowered = parts.step.lower(jax.eval_shape(parts.init, jax.random.key(0)), batch(0))
  lowered.compile({"xla_dump_to": str(tmp_path), "xla_dump_hlo_pass_re": "spmd-partitioning"})
  (hlo,) = tmp_path.glob("*jit_step*after_spmd-partitioning*")
  reduced = [line.split(" all-reduce(")[0].split(" = ")[-1]
             for line in hlo.read_text().splitlines() if " all-reduce(" in line]
  kernels = [t for t in reduced if re.fullmatch(r"\w+\[\d+,\d+,\d+,\d+\]\S*", t)]
  assert len(kernels) >= 20, reduced  # the ResNet-18's convolution kernels among them
  assert all(t.startswith("f32[") for t in reduced), [t for t in reduced if "f32[" not in t]


def _target_keys(parts, state, views):
  """What the step should write to the queue: target embeddings of view 0 (CIFAR pairing)."""
  def embed(variables, x):
    out, _ = parts.target.apply(variables, x, train=True, mutable=["batch_stats"])
    return out["proj"] / jnp.linalg.norm(out["proj"], axis=-1, keepdims=True)
  return np.asarray(jax.jit(embed)({"params": state.target_params,
                                    "batch_stats": state.target_batch_stats}, views[0]))


@pytest.fixture(scope="module")
def cifar_parts():
  """One compiled step (CIFAR pairing, queue of 3 batches) shared by the tests below. One
  shuffle-BN group: the target then sees the statistics of the whole batch, in any order, so
  `_target_keys` without the shuffle must find the keys the step wrote; this checks that the
  step puts the shuffled target embeddings back in order. base_lr 0.5: at 4.0 the loss is at
  its plateau within a few steps, and how far it fell by then was the initialisation's luck
  (0.09 to 0.29 over three seeds and two stem initialisations; 0.46 to 0.84 at 0.5)."""
  config = tiny_config(**{"sce.queue": 3 * BATCH, "optim.base_lr": 0.5,
                          "sce.target_bn_splits": 1})
  return train.build(config, sharding.make_mesh(), num_classes=10, steps_per_epoch=10,
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
