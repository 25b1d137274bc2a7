"""Checkpoints: sharded round trip, keep, atomicity, corrupt latest, SIGTERM flag."""
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sce_jax import checkpoint, sharding

CFG = ml_collections.ConfigDict(dict(every_steps=2, keep=2))


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh()


def make(mesh):
  """A state-like pytree (arrays, a step, a typed PRNG key) replicated over the mesh."""
  def init(rng, scale):
    return {"w": scale * jax.random.normal(rng, (4, 3)), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.split(rng)[0]}
  return jax.jit(init, out_shardings=NamedSharding(mesh, P()))


def saved(tmp_path, mesh, steps):
  mngr = checkpoint.manager(tmp_path, CFG)
  init = make(mesh)
  for step in steps:
    checkpoint.save(mngr, step, init(jax.random.key(0), float(step)))
  mngr.wait_until_finished()
  return mngr, jax.eval_shape(init, jax.random.key(0), 1.0)


def test_round_trip_into_shardings_and_keep(tmp_path, mesh):
  mngr, abstract = saved(tmp_path, mesh, [2, 4, 6])
  assert mngr.all_steps() == [4, 6]  # keep=2
  state = checkpoint.restore(mngr, abstract)
  expected = make(mesh)(jax.random.key(0), 6.0)
  np.testing.assert_array_equal(state["w"], expected["w"])
  assert state["w"].sharding == abstract["w"].sharding
  assert jnp.array_equal(jax.random.key_data(state["rng"]), jax.random.key_data(expected["rng"]))
  assert checkpoint.restore(checkpoint.manager(tmp_path / "empty", CFG), abstract) is None


def test_interrupted_save_is_not_the_latest(tmp_path, mesh):
  """A save killed before its atomic rename leaves a temporary directory that is ignored."""
  _, abstract = saved(tmp_path, mesh, [2])
  (tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
  mngr = checkpoint.manager(tmp_path, CFG)
  assert mngr.latest_step() == 2
  np.testing.assert_array_equal(checkpoint.restore(mngr, abstract)["w"],
                                make(mesh)(jax.random.key(0), 2.0)["w"])


# tensorstore's callback on orbax's closed event loop after the failed read is harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("older", [True, False])
def test_corrupt_latest_checkpoint(tmp_path, mesh, older):
  """A garbled file in the latest checkpoint: an error naming the directory to delete."""
  _, abstract = saved(tmp_path, mesh, [2, 4] if older else [4])
  manifest = tmp_path / "checkpoints" / "4" / "state" / "manifest.ocdbt"
  manifest.write_bytes(manifest.read_bytes()[:20])
  mngr = checkpoint.manager(tmp_path, CFG)
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.restore(mngr, abstract)
  mngr.close()
  advice = ("delete it to resume from step 2" if older
            else "delete it (or the whole workdir) to start afresh")
  assert str(e.value).startswith(
      f"The latest checkpoint, {tmp_path}/checkpoints/4, cannot be restored; {advice}. Cause: ")
  assert "manifest.ocdbt" in str(e.value)


def test_sigterm_sets_the_flag(tmp_path):
  mngr = checkpoint.manager(tmp_path, CFG)
  preemption = checkpoint.Preemption()
  try:
    assert not preemption.reached(mngr, 1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.reached(mngr, 2)
  finally:
    preemption.close()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
