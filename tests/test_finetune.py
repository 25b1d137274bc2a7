"""Semi-supervised fine-tuning, SimCLR's protocol (docs/SCE.md section 9)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sce_jax import checkpoint, models, optim
from sce_jax.data import sources
from sce_jax.data.images import DataError
from sce_jax.evaluators import finetune
from sce_jax.sharding import make_mesh
from tests.helpers import load_config, resumes_exactly


def test_label_fraction_per_class():
  """10 % of each class, rounded, at least one image: 10 -> 1, 20 -> 2, 3 -> 1; seeded."""
  labels = np.repeat([0, 1, 2], [10, 20, 3])
  rows = finetune.label_fraction(labels, 0.1, seed=0)
  assert np.bincount(labels[rows]).tolist() == [1, 2, 1]
  assert (np.diff(rows) > 0).all()
  assert np.array_equal(rows, finetune.label_fraction(labels, 0.1, seed=0))
  assert not np.array_equal(rows, finetune.label_fraction(labels, 0.5, seed=1)[:4])
  assert finetune.label_fraction(labels, 1.0, seed=0).tolist() == list(range(33))


def test_nesterov_sgd_is_tf_momentum():
  """SimCLR's TF MomentumOptimizer(use_nesterov=True): a = m a + g; w -= lr (g + m a)."""
  tx = optim.sgd(0.1, weight_decay=0.0, momentum=0.9, nesterov=True)
  w, grads = jnp.array([1.0, -2.0]), [jnp.array([0.5, 1.0]), jnp.array([-1.0, 0.25])]
  state, want, accum = tx.init(w), np.array([1.0, -2.0]), np.zeros(2)
  for g in grads:
    updates, state = tx.update(g, state, w)
    w = optax.apply_updates(w, updates)
    accum = 0.9 * accum + np.asarray(g)
    want = want - 0.1 * (np.asarray(g) + 0.9 * accum)
  np.testing.assert_allclose(w, want, rtol=1e-6)


def test_fraction_of_tfds_or_subset_of_folders_is_refused():
  """A label fraction of a TFDS set, and SimCLR's TFDS lists on class folders: one line each,
  naming the key to set."""
  config = load_config("cifar10_r18", "smoke")
  splits = type("Splits", (), {"train": object.__new__(sources.Tfds)})()
  with pytest.raises(DataError, match="set --config.eval.finetune.subset=1pct or 10pct"):
    finetune.train_source(config, splits)
  config.eval.finetune.subset = "1pct"
  with pytest.raises(DataError, match="needs data.source='tfds'; set --config.eval.finetune."
                     "subset='' to take eval.finetune.fraction"):
    finetune.train_source(config, splits)


@pytest.mark.slow  # three fine-tuning runs of a (tiny) trunk: ~40-80 s on 2 shared cores
def test_finetune_resumes_exactly(cifar_root, tmp_path, monkeypatch):
  """Half of each class of the 200-image slice (100 images, 3 steps an epoch, 180 in the
  cosine schedule), 4 steps: a run preempted at step 2 and run again logs, saves and scores
  what an uninterrupted one does. The zero head starts at loss ln 10; the lr is
  0.05 x 32 / 256 on SimCLR's cosine; the trunk is trained, not frozen."""
  config = load_config("cifar10_r18", "smoke")
  config.data.path = str(cifar_root)
  config.model.width = 2
  config.eval.batch_size = 64
  config.eval.finetune.fraction = 0.5
  config.eval.finetune.max_steps = 4
  config.log_every_steps = 1
  trunk = models.make_trunk(config.model)
  variables = jax.jit(trunk.init, static_argnames="train")(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  mesh, splits = make_mesh(), sources.Splits(config.data)

  whole, a = resumes_exactly(lambda w: finetune.evaluate(config, variables, mesh, splits, w),
                             "finetune_50pct", "finetune_", tmp_path, monkeypatch)
  assert 0 <= whole["finetune_top1"] <= whole["finetune_top5"] <= 1
  assert sorted(a) == [1, 2, 3, 4]
  assert a[1]["finetune_loss"] == pytest.approx(np.log(10), rel=1e-6)
  lr = optax.cosine_decay_schedule(0.05 * 32 / 256, 180)
  assert [a[s]["finetune_lr"] for s in a] == pytest.approx([float(lr(s)) for s in range(4)])
  tuned = checkpoint.read_numpy(tmp_path / "whole" / "finetune_50pct",
                                lambda m: {"params": {"trunk": m["params"]["trunk"]}})
  moved = jax.tree.map(lambda x, y: np.abs(x - np.asarray(y)).max(),
                       tuned["params"]["trunk"], variables["params"])
  assert max(jax.tree.leaves(moved)) > 0
