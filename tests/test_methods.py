"""The methods of sce_jax/methods/ (docs/SCE.md "Other methods"): each loss against a float64
NumPy statement of its reference's, through the sharded loss of the step (8 fake devices and
1, the gathers included); the recipes; a few steps of each method; 1 device against 8."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sce_jax import config as sce_config
from sce_jax import methods, metrics, schema, sharding, train_step
from tests import test_main
from tests.test_main import no_tf  # noqa: F401  (a fixture)
from tests.helpers import load_config
from tests.test_train_step import BATCH, close, run, tiny_config

BASELINES = [m for m in methods.METHODS if m != "sce"]
D, K = 8, 32


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# float64 NumPy statements of the references' losses (docs/SCE.md "Other methods"), over the
# whole global batch: q online embeddings, z targets ({view: (N, D)}), queue (K, D).
def np_moco_v2(q, z, queue, pairs, temp, **_):
  """moco/builder.py + main_moco.py: CrossEntropy(cat([q.k, q.queue]) / T, 0); solo-learn
  averages the directions."""
  return np.mean([-_log_softmax(np.concatenate(
      [np.sum(q[j] * z[i], -1, keepdims=True), q[j] @ queue.T], 1) / temp)[:, 0].mean()
                  for i, j in pairs])


def np_ressl(q, z, queue, pairs, temp, temp_m, **_):
  """ReSSL ressl.py: -sum(softmax(k.queue / t) * log_softmax(q.queue / 0.1)), mean."""
  def one(q, k):
    soft = np.exp(_log_softmax(k @ queue.T / temp_m))
    return -(soft * _log_softmax(q @ queue.T / temp)).sum(-1).mean()
  return np.mean([one(q[j], z[i]) for i, j in pairs])


def np_byol(q, z, queue, pairs, **_):
  """byol_experiment.py: mean over rows of the two directions' sum of |p^ - z^|^2."""
  return sum(np.mean(np.sum((_unit(q[j]) - _unit(z[i])) ** 2, -1)) for i, j in pairs)


def np_simclr(q, z, queue, pairs, temp, **_):
  """tf2/objective.py add_contrastive_loss: mean of loss_a + loss_b, the 2N x 2N logits with
  the self-similarities masked (LARGE_NUM)."""
  a, b = q[0], q[1]
  n = len(a)
  mask = np.eye(n) * 1e9
  loss_a = -_log_softmax(np.concatenate([a @ b.T, a @ a.T - mask * temp], 1) / temp)
  loss_b = -_log_softmax(np.concatenate([b @ a.T, b @ b.T - mask * temp], 1) / temp)
  return np.mean(np.diag(loss_a[:, :n]) + np.diag(loss_b[:, :n]))


def np_moco_v3(q, z, queue, pairs, temp, **_):
  """moco-v3 builder.py: the sum over the pairs of CrossEntropy(q . concat_all_gather(k) / T,
  own index) x 2T; over the global batch the own index is the row's."""
  return sum(-np.diag(_log_softmax(q[j] @ z[i].T / temp)).mean() * 2 * temp for i, j in pairs)


REFERENCES = {"moco_v2": np_moco_v2, "moco_v3": np_moco_v3, "ressl": np_ressl, "byol": np_byol,
              "simclr": np_simclr}


def test_every_baseline_has_a_reference():
  assert set(REFERENCES) == set(BASELINES)


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["one_pair", "both_pairs"])
def test_loss_matches_numpy_on_8_and_1_devices(name, symmetric):
  """The method's loss inside the step's shard_map (each device its 2 rows, gathering what it
  needs) equals the float64 statement over the 16-row global batch, on 8 devices and on 1;
  so do the gradients of the two meshes (SimCLR's flow back through its gather). Tolerance: the
  logits have float32 rounding of ~D x eps x |logit| <= 8 x 1.2e-7 x 25 (temp 0.04) = 2.4e-5,
  which a log-softmax passes on at most once; 1e-4 covers it and the 8-term mean."""
  config = tiny_config(**{"method": name, "sce.symmetric": symmetric})
  method = methods.get(name)
  pairs = method.pairs(config, 2)
  rng = np.random.default_rng(0)
  q = {v: _unit(rng.normal(size=(BATCH, D))) for v in (0, 1)}
  z = {v: _unit(rng.normal(size=(BATCH, D))) for v in (0, 1)}
  queue = _unit(rng.normal(size=(K, D)))
  kw = dict(temp=config.sce.temp, temp_m=config.sce.temp_m)
  want = REFERENCES[name](q, z, queue, pairs, **kw)
  f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  grads = []
  for devices in (jax.devices()[:8], jax.devices()[:1]):
    loss_fn = train_step.make_loss_fn(method, config, sharding.make_mesh(devices), pairs)
    use = f32(queue) if method.uses_queue(config) else None
    got, metrics = jax.jit(lambda q, z: loss_fn(q, z, use))(f32(q), f32(z))
    np.testing.assert_allclose(float(got), want, rtol=1e-4, atol=1e-4)
    assert np.isfinite(float(metrics["pos_sim"]))
    grads.append(jax.jit(jax.grad(lambda q, z: loss_fn(q, z, use)[0]))(f32(q), f32(z)))
  jax.tree.map(lambda a, b: close(a, b, "gradient"), *grads)


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_recipes_switch_the_config_files(name):
  """--config.method=NAME on the CIFAR and ImageNet files (the ViT ones where the method has a
  ViT recipe) gives the method's recipe (its module's values) and a config that validates; a
  missing combination is one line."""
  recipes = methods.get(name).RECIPES
  for file, setting in (("cifar10_r18", "cifar"), ("cifar100_r18", "cifar"),
                        ("imagenet_r50", "imagenet"), ("cifar10_vit", "cifar_vit"),
                        ("imagenet_vit_s16", "imagenet_vit")):
    if setting not in recipes:
      continue
    config = load_config(file, f"method={name}")
    recipe = recipes[setting]
    recipe = recipe(config) if callable(recipe) else recipe
    assert config.method == name
    assert all(config[key] == value for key, value in recipe.items()), (file, name)
    schema.validate(config, 8, 1)
  if "cifar_vit" not in methods.get(name).RECIPES:
    with pytest.raises(sce_config.ConfigError,
                       match=rf"^method '{name}' has no recipe for this config file's "
                             r"setting, cifar_vit \(.*; cifar_vit has sce, moco_v3\b.*\); "
                             r"pick another"):
      load_config("cifar10_vit", f"method={name}")


def test_unknown_method_is_one_line():
  with pytest.raises(sce_config.ConfigError, match=r"method='mocov9' is not a known method; "
                                                   r"set --config.method to one of 'sce', "):
    load_config("cifar10_r18", "method=mocov9")
  with pytest.raises(sce_config.ConfigError, match=r"^This config file has no other methods' "
                                                   r"recipes; --config.method works with "):
    load_config("stl10_r18", "method=byol")


def _tiny(name, **overrides):
  """The method's CIFAR recipe, shrunk as tests/test_train_step.tiny_config shrinks SCE's."""
  config = load_config("cifar10_r18", f"smoke,method={name}")
  config.update(batch_size=BATCH)
  config.data.image_size = 16
  config.model.width = 8
  config.optim.warmup_epochs = 0
  config.sce.queue = 4 * BATCH * (2 if config.sce.symmetric else 1)
  config.update_from_flattened_dict(overrides)
  return config


@pytest.mark.slow  # two compilations of the step per method
@pytest.mark.parametrize("name", BASELINES)
def test_one_device_equals_eight(name):
  """Each method's step on 1 and on 8 devices from the same state and batches: the same loss,
  gradient norm, parameters, target, BN statistics and queue after 2 steps, within `close`
  (tests/test_train_step.py: float32 sums in another order, 1e-4 of each array's scale). The
  small lr keeps the second step from amplifying the first's rounding. And the steps are
  sane: finite losses, the online trunk moves, a target and a queue exactly where the method
  has them."""
  config = _tiny(name, **{"optim.base_lr": 0.01})
  one, m1, _ = run(config, jax.devices()[:1], 2)
  eight, m8, parts = run(config, jax.devices()[:8], 2)
  assert all(np.isfinite(m["loss"]) for m in m8), m8
  start = jax.device_get(parts.init(jax.random.key(0)))
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), start.params, eight.params)
  assert min(jax.tree.leaves(moved["trunk"])) > 0
  assert (eight.target_params == {}) == (not methods.get(name).EMA_TARGET)
  assert (eight.queue is None) == (not methods.get(name).uses_queue(config))
  for a, b in zip(m1, m8):
    for k in ("loss", "grad_norm", "pos_sim", "probe_loss"):
      close(a[k], b[k], k)
  for field in ("params", "batch_stats", "target_params", "target_batch_stats", "queue"):
    jax.tree.map(lambda a, b: close(a, b, field), getattr(one, field), getattr(eight, field))


@pytest.mark.slow  # a command line run of each method, resumed, then kNN
@pytest.mark.parametrize("name", BASELINES)
def test_command_line_trains_resumes_exactly_and_evaluates(name, cifar_root, no_tf, tmp_path):
  """`python -m sce_jax.main --config=configs/cifar10_r18.py:smoke --config.method=NAME` (8
  devices, no TensorFlow): 8 steps with checkpoints at 4 and 8 and finite metrics; a run
  resumed from the step-4 checkpoint alone logs the same metrics for steps 5 to 8 (the queue,
  target and rng are in the state); --mode=knn then evaluates the result."""
  compared = ("loss", "probe_loss", "pos_sim", "grad_norm", "lr")
  def command(workdir, *flags):
    return test_main.command(cifar_root, workdir, f"--config.method={name}",
                             "--config.max_steps=8", "--config.log_every_steps=1",
                             "--config.checkpoint.every_steps=4", *flags)
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  test_main.run(command(whole), no_tf)
  shutil.copytree(whole / "checkpoints" / "4", resumed / "checkpoints" / "4")
  test_main.run(command(resumed), no_tf)
  a, b = metrics.read(whole), metrics.read(resumed)
  assert sorted(a) == list(range(1, 9)) and sorted(b) == list(range(5, 9))
  for step in range(5, 9):
    assert {k: a[step][k] for k in compared} == {k: b[step][k] for k in compared}, step
  assert all(np.isfinite(a[s][k]) for s in a for k in compared)
  test_main.run(command(resumed, "--mode=knn"), no_tf)
  knn = json.loads((resumed / "eval_knn.json").read_text())
  assert 0 <= knn["knn_top1"] <= knn["knn_top5"] <= 1
