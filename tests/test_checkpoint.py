"""Checkpoints: sharded round trip, keep, atomicity, corrupt latest, checksums, another config,
non-finite states, failed saves (SIGTERM and Ctrl-C: test_preemption.py)."""
import os
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sce_jax import checkpoint, sharding
from sce_jax import state as state_lib

CFG = ml_collections.ConfigDict(dict(every_steps=2, keep=2))
# After a failed read, TensorStore's callbacks land on orbax's closed event loop, harmlessly, at
# a moment of their own, possibly during a later test of this module.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


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
  message = str(e.value)
  assert message.startswith(f"The latest checkpoint, {tmp_path}/checkpoints/4, cannot be "
                            "restored (")
  assert message.endswith(f"); {advice}.") and "manifest.ocdbt" in message
  assert "\n" not in message and len(message) < 1200  # The cause: one line, capped.


def test_a_save_that_cannot_start_fails_at_once(tmp_path, mesh):
  """A save whose step directory cannot be made (a read-only checkpoints/ directory; as root,
  whom permissions do not stop, a file in its place) fails in `save` itself, in one line, and
  no orbax thread is left: when orbax made the directory in the background, such a failure
  left its threads waiting 300 s for the directory, which held the process at its exit."""
  mngr = checkpoint.manager(tmp_path, CFG)
  state = make(mesh)(jax.random.key(0), 1.0)
  folder = tmp_path / "checkpoints"
  if os.geteuid() == 0:
    folder.rmdir()
    folder.write_text("")
  else:
    folder.chmod(0o555)
  orbax_threads = lambda: {t for t in threading.enumerate()
                           if type(t).__module__.startswith("orbax")}
  before = orbax_threads()
  try:
    with pytest.raises(checkpoint.CheckpointError) as e:
      checkpoint.save(mngr, 2, state)
    assert orbax_threads() <= before
  finally:
    folder.chmod(0o755)
    mngr.close()
  message = str(e.value)
  assert message.startswith(f"Saving a checkpoint in {folder} failed (")
  assert f"{folder}/2.orbax-checkpoint-tmp" in message and "\n" not in message
  assert message.endswith("The last complete checkpoint is none (no checkpoint was saved); free "
                          "space on that disk (or fix its permissions or quota) and rerun to "
                          "resume from it.")


def test_flipped_bytes_fail_the_checksum(tmp_path, mesh):
  """64 flipped bytes of an array in its data file restore without any error from orbax; the
  checksums stored at the save catch them. The array is random bits (int32: no NaN to refuse),
  which zstd cannot compress, so its bytes lie in the file as they are and can be found."""
  mngr = checkpoint.manager(tmp_path, CFG)
  w = jax.random.randint(jax.random.key(0), (256, 64), -2**31, 2**31 - 1, jnp.int32)
  state = {"w": jax.device_put(w, NamedSharding(mesh, P())), "step": jnp.zeros((), jnp.int32)}
  for step in (2, 4):
    checkpoint.save(mngr, step, state)
  mngr.wait_until_finished()
  piece = np.asarray(w).tobytes()[4096:4160]
  data, = [f for f in (tmp_path / "checkpoints" / "4" / "state").glob("ocdbt.process_0/d/*")
           if piece in f.read_bytes()]
  raw = data.read_bytes()
  data.write_bytes(raw.replace(piece, bytes(b ^ 0x5A for b in piece)))
  with pytest.raises(checkpoint.CheckpointError, match=(
      rf"^The latest checkpoint, {tmp_path}/checkpoints/4, is corrupt: 1 of its arrays \(w, "
      r"\.\.\.\) differ from the checksums stored when it was saved; delete it to resume from "
      r"step 2\.$")):
    checkpoint.restore(checkpoint.manager(tmp_path, CFG), jax.eval_shape(lambda: state))


def test_another_config_is_not_called_corrupt(tmp_path, mesh):
  """A checkpoint of another width: the shapes say so before anything is read, and the advice
  is to change the config, not to delete the checkpoint."""
  _, abstract = saved(tmp_path, mesh, [2])
  abstract["w"] = jax.ShapeDtypeStruct((4, 5), abstract["w"].dtype,
                                       sharding=abstract["w"].sharding)
  with pytest.raises(checkpoint.CheckpointError, match=(
      rf"^The latest checkpoint, {tmp_path}/checkpoints/2, was saved with another config: w is "
      r"\(4, 3\) there, \(4, 5\) here \(and 0 more arrays differ\)\. Run with the config it was "
      rf"saved with \({tmp_path}/config.json\), or use another --workdir; the checkpoint is "
      r"fine, do not delete it\.$")):
    checkpoint.restore(checkpoint.manager(tmp_path, CFG), abstract)


def test_a_non_finite_state_is_not_saved(tmp_path, mesh):
  """inf in any array (here the weights, while a loss could still be finite) stops the save."""
  mngr, _ = saved(tmp_path, mesh, [2])
  state = make(mesh)(jax.random.key(0), 1.0)
  state["w"] = state["w"].at[1, 2].set(jnp.inf)
  with pytest.raises(FloatingPointError, match=(
      r"^The state at step 4 holds NaN or inf in 1 arrays \(w, \.\.\.\) and is not saved: "
      rf"training diverged\. The last good checkpoint is {tmp_path}/checkpoints/2 \(step 2\);")):
    checkpoint.save(mngr, 4, state)
  mngr.wait_until_finished()
  assert mngr.all_steps() == [2]


@pytest.mark.parametrize("saved_as, restored_as", [("replicate", "fsdp"), ("fsdp", "replicate")])
def test_restores_across_param_shardings(tmp_path, mesh, saved_as, restored_as):
  """A TrainState saved with one sharding.params restores into the other (orbax reads each
  device's slice for the target sharding), values and checksums equal (they are of the whole
  arrays): params, target params and Adam's moments split over `data`, the rest replicated."""
  params = {"kernel": jnp.arange(8 * 24, dtype=jnp.float32).reshape(8, 24), "bias": jnp.ones(3)}
  fresh = state_lib.TrainState(
      step=jnp.array(7), params=params, batch_stats={"mean": jnp.zeros(8)},
      target_params=jax.tree.map(lambda x: -x, params), target_batch_stats={},
      opt_state=optax.adam(1e-3).init(params), queue=jnp.full((16, 4), 0.5),
      queue_ptr=jnp.array(8), rng=jax.random.key(3))
  shapes = jax.eval_shape(lambda: fresh)

  def abstract(params):
    where = state_lib.shardings(shapes, mesh, ml_collections.ConfigDict(
        dict(params=params, min_size_mib=0.0)))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, where)

  mngr = checkpoint.manager(tmp_path, CFG)
  checkpoint.save(mngr, 2, jax.device_put(fresh, jax.tree.map(lambda x: x.sharding,
                                                              abstract(saved_as))))
  mngr.wait_until_finished()
  state = checkpoint.restore(mngr, abstract(restored_as))  # checksums verified
  split = P(None, sharding.DATA) if restored_as == "fsdp" else P()
  for tree in (state.params, state.target_params, state.opt_state[0].mu):
    assert tree["kernel"].sharding.spec == split
    assert tree["bias"].sharding.spec == P()  # no dimension that 8 devices divide
  assert state.queue.sharding.spec == P() and state.batch_stats["mean"].sharding.spec == P()
  for name, a, b in zip(checkpoint._names(state), jax.tree.leaves(state),
                        jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(checkpoint._plain(a), checkpoint._plain(b), err_msg=name)
