"""DINO (sce_jax/methods/dino.py, docs/SCE.md 12): its loss and centre against a float64 NumPy
statement of facebookresearch/dino's DINOLoss on 8 fake devices and 1; its head's shapes,
weight normalisation and initialisation, and its config read back from the weights; the teacher-temperature schedule; the optimiser's
per-tensor clipping, weight-decay cosine, lr floor and the last layer frozen in epoch 1; its
recipes."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sce_jax import methods, optim, schema, sharding, train_step, weights
from sce_jax.config import ConfigError
from sce_jax.methods import dino
from sce_jax.models import heads
from tests.helpers import load_config
from tests.test_methods import _log_softmax

N, PROTOS, VIEWS = 16, 12, 4  # 16 rows (2 a device on 8), 2 global + 2 local crops


def np_dino(student, teacher, center, pairs, *, temp, teacher_temp, center_m):
  """main_dino.py DINOLoss.forward in float64 over the global batch: (loss, new centre)."""
  t = {i: np.exp(_log_softmax((teacher[i] - center) / teacher_temp)) for i in teacher}
  loss = np.mean([np.mean(-np.sum(t[i] * _log_softmax(student[j] / temp), -1))
                  for i, j in pairs])
  batch_center = np.concatenate([teacher[i] for i in sorted(teacher)]).mean(0)
  return loss, center * center_m + batch_center * (1 - center_m)


def _config():
  config = load_config("cifar10_vit", "smoke,method=dino")
  config.model.projector.out_dim = PROTOS
  config.sce.temp_m_warmup_epochs = 3
  config.sce.temp_m = 0.07
  return config


@pytest.mark.parametrize("num_devices", [8, 1])
def test_loss_and_centre_match_numpy(num_devices):
  """The step's DINO path (make_targets on the global batch, then the loss in shard_map) gives
  DINOLoss's loss and centre at an epoch of the temperature warm-up (teacher temp 0.055),
  with rows sharded over 8 devices (the centre's mean an all-reduce) and on 1. Tolerance:
  float32 logits / 0.04 of size ~25 carry ~25 x 1.2e-7 x 12 columns ~ 4e-5 through one
  softmax and one log-softmax; 1e-4 covers it. The centre: a mean of 32 rows, 1e-6."""
  config = _config()
  pairs = methods.get("dino").pairs(config, VIEWS)
  assert pairs == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]
  rng = np.random.default_rng(0)
  student = {v: rng.normal(size=(N, PROTOS)) for v in range(VIEWS)}
  teacher = {v: 3 * rng.normal(size=(N, PROTOS)) for v in range(2)}
  center = rng.normal(size=PROTOS)
  steps_per_epoch, step = 5, 7  # epoch 1 of a 3-epoch warm-up: linspace(.04, .07, 3)[1]
  want_loss, want_center = np_dino(student, teacher, center, pairs, temp=0.1,
                                   teacher_temp=0.055, center_m=0.9)
  mesh = sharding.make_mesh(jax.devices()[:num_devices])
  rows = NamedSharding(mesh, P("data"))
  put = lambda t: {k: jax.device_put(jnp.asarray(v, jnp.float32), rows) for k, v in t.items()}
  targets = dino.make_targets(config, steps_per_epoch)
  loss_fn = train_step.make_loss_fn(dino, config, mesh, pairs)

  @jax.jit
  def run(qs, zs, c):
    probs, new_center, t_metrics = targets(zs, c, jnp.int32(step))
    loss, metrics = loss_fn(qs, probs, None)
    return loss, metrics, new_center, t_metrics

  loss, metrics, new_center, t_metrics = run(put(student), put(teacher),
                                             jnp.asarray(center, jnp.float32))
  np.testing.assert_allclose(float(t_metrics["teacher_temp"]), 0.055, rtol=1e-6)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(new_center), want_center, atol=1e-6)
  # The loss is the teacher's entropy plus KL(teacher || student), each >= 0.
  assert 0 <= float(metrics["kl"]) <= float(loss)
  np.testing.assert_allclose(float(metrics["kl"] + metrics["teacher_entropy"]), float(loss),
                             rtol=1e-5)


def test_teacher_temperature_schedule():
  """DINOLoss.teacher_temp_schedule by epoch: linspace(0.04, 0.07, 3) over 3 epochs, then
  0.07; without a warm-up, temp_m from the start."""
  config = _config()
  temp = dino.teacher_temp(config, steps_per_epoch=2)
  got = [float(temp(jnp.int32(s))) for s in range(10)]
  want = np.repeat(np.concatenate([np.linspace(0.04, 0.07, 3), [0.07, 0.07]]), 2)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  config.sce.temp_m_warmup_epochs = 0
  assert float(dino.teacher_temp(config, 2)(jnp.int32(0))) == pytest.approx(0.07)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_shapes_weight_norm_and_init(norm_last_layer):
  """DINOHead: Linear layers N(0, 0.02^2) (trunc_normal_ at +-2 absolute: no truncation at
  +-2 sigma), biases 0; the output normalise(mlp(x)) @ (g v / |v|) with unit columns of v / |v|;
  v torch's nn.Linear default, U(+-1 / sqrt(64)); g no parameter with norm_last_layer, else
  ones. Smaller than DINO's 2048-256-65536 (the recipes' values, test_recipes). Std tolerance:
  512 x 512 draws, standard error 0.02 / sqrt(2 x 262144) ~ 3e-5; 1e-4 is 3.6 of them."""
  cfg = dict(hidden_dim=512, out_dim=256, num_layers=3, last_bn=False, last_bias=True,
             norm="none", activation="gelu", bottleneck_dim=64, norm_last_layer=norm_last_layer)
  head = heads.make(cfg)
  x = jax.random.normal(jax.random.key(1), (4, 32))
  params = jax.jit(head.init)(jax.random.key(0), x)["params"]
  shapes = jax.tree.map(jnp.shape, params)
  assert weights._projector_config(params, {}) == cfg  # what convert infers from the weights
  assert shapes["mlp"] == {"linear0": {"kernel": (32, 512), "bias": (512,)},
                           "linear1": {"kernel": (512, 512), "bias": (512,)},
                           "linear2": {"kernel": (512, 64), "bias": (64,)}}
  assert shapes["last_layer"] == ({"kernel": (64, 256)} if norm_last_layer else
                                  {"kernel": (64, 256), "scale": (256,)})
  w = np.asarray(params["mlp"]["linear1"]["kernel"])
  assert abs(w.std() - 0.02) < 1e-4 and np.abs(w).max() > 3 * 0.02
  assert all(not np.asarray(params["mlp"][f"linear{i}"]["bias"]).any() for i in range(3))
  v = np.asarray(params["last_layer"]["kernel"], np.float64)
  assert np.abs(v).max() <= 1 / 8 and np.abs(v).max() > 0.9 / 8
  if not norm_last_layer:
    assert (np.asarray(params["last_layer"]["scale"]) == 1).all()
  out = np.asarray(jax.jit(head.apply)({"params": params}, x), np.float64)
  mlp = heads.MLP(512, 64, 3, norm="none", activation="gelu", weight_init="dino")
  hidden = np.asarray(jax.jit(mlp.apply)({"params": params["mlp"]}, x), np.float64)
  hidden /= np.linalg.norm(hidden, axis=-1, keepdims=True)
  np.testing.assert_allclose(out, hidden @ (v / np.linalg.norm(v, axis=0)), atol=1e-5)


def test_clipping_each_tensor():
  """DINO's clip_gradients: a tensor of gradient norm 6 is scaled by 3 / (6 + 1e-6), one of
  norm 1 is left as it is."""
  g = {"a": jnp.full((4, 9), 1.0), "b": jnp.array([0.6, 0.8])}
  out, _ = optim.clip_by_tensor_norm(3.0).update(g, None)
  np.testing.assert_allclose(out["a"], 3 / (6 + 1e-6), rtol=1e-6)
  np.testing.assert_array_equal(out["b"], g["b"])


def test_schedules_weight_decay_cosine_and_lr_floor():
  """utils.cosine_scheduler: the weight decay from 0.04 at step 0 towards 0.4 (at T / 2 their
  mean), the lr's cosine ending at min_lr (not scaled by the batch)."""
  config = _config()
  o = config.optim
  wd = optim.wd_schedule(o, total_steps=100)
  assert float(wd(0)) == pytest.approx(0.04) and float(wd(50)) == pytest.approx(0.22)
  o.warmup_epochs = 1
  lr = optim.lr_schedule(o, global_batch=256, steps_per_epoch=10, total_steps=100)
  assert float(lr(100)) == pytest.approx(1e-6) and float(lr(10)) == pytest.approx(5e-4)
  o.wd_schedule = "constant"
  assert optim.wd_schedule(o, 100) == o.weight_decay


def test_last_layer_frozen_in_the_first_epoch():
  """cancel_gradients_last_layer: in epoch 0 (2 steps) the last layer does not move while the
  rest does; at step 2 its AdamW starts afresh, as torch's for a parameter that had no
  gradient: update -lr(2) (g / (|g| + eps) + wd(2) p), Adam's first bias-corrected step."""
  config = _config()
  config.epochs, total = 2, 4
  config.optim.update(clip_norm=0.0, warmup_epochs=0)
  lr_fn = optim.lr_schedule(config.optim, global_batch=config.batch_size, steps_per_epoch=2,
                            total_steps=total)
  tx = optim.make_optimizer(config, lr_fn, total)
  params = {"trunk": {"w": jnp.ones((3, 3))},
            "projector": {"mlp": {"kernel": jnp.ones((3, 2))},
                          "last_layer": {"kernel": jnp.full((2, 5), 0.5)}}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  state, update = tx.init(params), jax.jit(tx.update)
  for step in range(3):
    updates, state = update(grads, state, params)
    last = np.asarray(updates["projector"]["last_layer"]["kernel"])
    assert np.abs(np.asarray(updates["trunk"]["w"])).min() > 0
    if step < 2:
      assert not last.any(), step
  wd = optim.wd_schedule(config.optim, total)(2)
  want = -float(lr_fn(2)) * (0.3 / (0.3 + config.optim.eps) + float(wd) * 0.5)
  np.testing.assert_allclose(last, want, rtol=1e-5)


def test_recipes():
  """imagenet_vit: the README's vanilla command at 100 epochs, the boosted one at 300; the
  DINO views 2 x 224 + 8 x 96; the ResNet-50 ImageNet file has no DINO recipe (one line)."""
  vanilla = load_config("imagenet_vit_s16", "method=dino,epochs=100")
  boosted = load_config("imagenet_vit_s16", "method=dino")
  assert (vanilla.batch_size, vanilla.sce.temp_m, vanilla.sce.temp_m_warmup_epochs,
          vanilla.model.projector.norm_last_layer) == (512, 0.04, 0, True)
  assert (boosted.batch_size, boosted.sce.temp_m, boosted.sce.temp_m_warmup_epochs,
          boosted.model.projector.norm_last_layer) == (1024, 0.07, 30, False)
  views, pairs = schema.crops(vanilla)
  assert [v.size for v in views] == [224, 224] + [96] * 8 and len(pairs) == 2 * 9
  with pytest.raises(ConfigError, match=r"^method 'dino' has no recipe .* imagenet \("):
    load_config("imagenet_r50", "method=dino")
