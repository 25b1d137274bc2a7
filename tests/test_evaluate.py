"""Evaluation (docs/SCE.md section 7): weighted kNN, feature extraction and the linear probe."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sce_jax import checkpoint, evaluators, metrics, models, optim
from sce_jax.data import augment, sources
from sce_jax.evaluators import common, knn, linear
from sce_jax.sharding import make_mesh, replicated
from tests.helpers import load_config, resumes_exactly


def _numpy_knn(train, train_labels, test, k, temp, num_classes):
  """Float64 reference: InstDisc / lightly weighted kNN on L2-normalised features."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  sims = test.astype(np.float64) @ train.astype(np.float64).T
  scores = np.zeros((len(test), num_classes))
  for i, row in enumerate(sims):
    top = np.argsort(-row)[:k]
    np.add.at(scores[i], train_labels[top], np.exp(row[top] / temp))
  return scores


def _features(n, m, dim=16, num_classes=7, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, num_classes, n),
          rng.normal(size=(m, dim)).astype(np.float32))


def test_knn_predict_matches_numpy():
  train, labels, test = _features(300, 50)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  got = knn.knn_predict(jnp.asarray(unit(train)), jnp.asarray(labels),
                             jnp.asarray(unit(test)), k=20, temp=0.1, num_classes=7)
  np.testing.assert_allclose(got, _numpy_knn(train, labels, test, 20, 0.1, 7), rtol=1e-4)


@pytest.mark.parametrize("n,k", [(301, 20), (100, 60), (100, 200)])
def test_knn_scores_sharded_and_chunked_match_numpy(n, k):
  """8 devices, a train set that does not divide over them (padding), a ragged last chunk of
  test rows, k above one device's share of rows, and k above the train set size."""
  train, labels, test = _features(n, 45, seed=n + k)
  got = knn.knn_scores(train, labels, test, k=k, temp=0.1, num_classes=7,
                            mesh=make_mesh(), chunk=16)
  assert got.shape == (45, 7)
  np.testing.assert_allclose(got, _numpy_knn(train, labels, test, k, 0.1, 7), rtol=1e-4)


def test_topk_accuracy():
  scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
  assert common.topk_accuracy(scores, np.array([1, 1, 0]), ks=(1, 2, 5)) == [
      pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]


def test_random_pad_crop_is_a_window_of_the_padded_image():
  images = jnp.arange(4 * 6 * 6 * 3, dtype=jnp.int32).reshape(4, 6, 6, 3) + 1
  out = np.asarray(augment.random_pad_crop(jax.random.key(0), images, 2))
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
  for image, crop in zip(padded, out):
    assert any(np.array_equal(image[i:i + 6, j:j + 6], crop)
               for i in range(5) for j in range(5))


def test_extract_features_sees_every_example_once():
  """37 images in batches of 16 on 8 devices: the padded rows of the last batch are dropped."""
  n = 37
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
  data = ml_collections.ConfigDict(dict(
      image_size=8, loader="grain", num_workers=0, prefetch=2, cache=True, strict=False,
      eval_resize=0, eval_interpolation="bilinear",
      mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)))
  trunk = models.make_trunk(ml_collections.ConfigDict(dict(
      trunk="resnet18", width=2, small_stem=True, dtype="float32")))
  variables = jax.jit(trunk.init, static_argnames="train")(
      jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  feats, labels = common.extract_features(trunk, variables,
                                            sources.InMemory(images, np.arange(n)), data,
                                            batch_size=16, mesh=make_mesh())
  assert sorted(labels.tolist()) == list(range(n))
  x = (images / 255.0 - np.array(data.mean)) / np.array(data.std)
  want = jax.jit(trunk.apply, static_argnames="train")(variables, x.astype(np.float32),
                                                       train=False)
  np.testing.assert_allclose(feats, np.asarray(want)[labels], rtol=1e-4, atol=1e-5)


def test_linear_probe_learns_separable_features():
  """The probe step on given features (identity features_fn) separates Gaussian clusters."""
  num_classes, dim, mesh = 10, 32, make_mesh()
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(num_classes, dim)) * 3

  def sample(n):
    labels = rng.integers(0, num_classes, n)
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels

  head = linear.linear_head(num_classes)
  lr_fn = optax.cosine_decay_schedule(0.1, 100)
  tx = optim.sgd(lr_fn, weight_decay=0.0, momentum=0.9)
  step = linear.make_linear_step(head, tx, lr_fn, lambda frozen, key, x: x, mesh,
                                 jax.random.key(1))
  # Placed as linear.evaluate places it: replicated, so the step's donation reuses its buffers.
  state = jax.jit(linear.init(head, tx, dim), out_shardings=replicated(mesh))(jax.random.key(0))
  params = state["params"]
  # The std of 320 draws of N(0, 0.01) has a relative standard error of 1 / sqrt(2 x 319) =
  # 4 %; this seed gives 0.00939 (-1.5 SE), which rel=0.1 (2.5 SE) left 4 % of margin: 5 SE.
  assert float(jnp.std(params["kernel"])) == pytest.approx(0.01, rel=0.2)
  assert not np.any(params["bias"])
  for _ in range(100):
    x, y = sample(64)
    state, metrics = step(state, {}, x, y)
  assert int(state["step"]) == 100 and float(metrics["lr"]) == pytest.approx(float(lr_fn(99)))
  x, y = sample(1000)
  params = jax.device_get(state["params"])
  top1, top5 = common.topk_accuracy(x @ params["kernel"] + params["bias"], y)
  assert top1 > 0.9 and top5 >= top1
  assert metrics["loss"] < 0.5


@pytest.mark.slow  # kNN and a linear probe end to end: 156 s on the shared 2-core box
def test_knn_and_linear_eval_on_cifar_slice(cifar_root, tmp_path, monkeypatch):
  """Both evaluations end to end on a tiny random trunk: 200 train / 100 test images. A probe
  preempted at step 2 (it saves and raises Preempted) and run again resumes to the same losses,
  checkpoints and accuracy as an uninterrupted one, through an lr milestone (half an epoch)."""
  config = load_config("cifar10_r18", "smoke")
  config.data.path = str(cifar_root)
  config.model.width = 2
  config.eval.batch_size = 64
  config.eval.linear.batch_size = 32  # 6 steps an epoch
  config.eval.linear.milestones = (0.5,)
  config.eval.linear.max_steps = 4
  config.log_every_steps = 1
  trunk = models.make_trunk(config.model)
  variables = jax.jit(trunk.init, static_argnames="train")(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  mesh = make_mesh()
  splits = sources.Splits(config.data)

  knn_results = knn.evaluate(config, variables, mesh, splits)
  assert 0.0 <= knn_results["knn_top1"] <= knn_results["knn_top5"] <= 1.0

  whole, a = resumes_exactly(lambda w: linear.evaluate(config, variables, mesh, splits, w),
                             "linear", "linear_", tmp_path, monkeypatch)
  assert 0.0 <= whole["linear_top1"] <= whole["linear_top5"] <= 1.0
  assert sorted(a) == [1, 2, 3, 4]
  assert [a[s]["linear_lr"] for s in a] == pytest.approx([30, 30, 30, 3])  # unscaled, x 0.1
  assert all(np.isfinite(r["linear_loss"]) for r in a.values())
  record = evaluators.provenance(config, "linear", variables, splits, tmp_path / "whole")
  assert record["split_sizes"] == {"train": 200, "eval": 100}
  assert record["protocol"]["eval.linear"]["milestones"] == (0.5,)
  assert record["trunk_sha256"] == common.trunk_checksum(variables)
  assert "model.pos_resample" not in record["protocol"]  # a ResNet
  steps = lambda run: checkpoint.manager(tmp_path / run / "linear", config.checkpoint).all_steps()
  assert steps("whole") == [4] and steps("split") == [2, 4]
  other = jax.tree.map(lambda x: x + 1, variables)
  with pytest.raises(checkpoint.CheckpointError, match=r"linear holds a linear probe of other "
                     r"trunk weights; delete it \(or pass another --workdir\) to evaluate "
                     r"these"):
    linear.evaluate(config, other, mesh, splits, tmp_path / "whole")


@pytest.mark.slow  # kNN and a probe of a ViT end to end: 56 s on the shared 2-core box
def test_knn_and_linear_eval_of_a_vit(cifar_root, tmp_path):
  """The ViT feature (the class token's output, 32-d here) through kNN and 2 probe steps; the
  trunk's variables have no batch statistics."""
  config = load_config("cifar10_vit", "smoke")
  config.data.path = str(cifar_root)
  config.eval.batch_size = 64
  config.eval.linear.update(batch_size=32, max_steps=2)
  trunk = models.make_trunk(config.model)
  variables = {"batch_stats": {}, **jax.jit(trunk.init, static_argnames="train")(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)}
  assert models.feature_dim(config.model) == 32
  mesh, splits = make_mesh(), sources.Splits(config.data)
  knn_results = knn.evaluate(config, variables, mesh, splits)
  assert 0.0 <= knn_results["knn_top1"] <= knn_results["knn_top5"] <= 1.0
  results = linear.evaluate(config, variables, mesh, splits, tmp_path)
  assert 0.0 <= results["linear_top1"] <= results["linear_top5"] <= 1.0
  record = metrics.read(tmp_path / "linear")
  # The first step's record (time to first step, loop.Run) and the last step's losses.
  assert max(record) == 2 and np.isfinite(record[2]["linear_loss"])
