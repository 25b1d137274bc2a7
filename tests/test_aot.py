"""The check of a config against a Cloud TPU slice (sce_jax/aot.py): the smoke step compiled for
abstract TPUs that libtpu describes, on the CPU (the big configs are in benchmarks/RESULTS.md)."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import pytest

from sce_jax import aot, sharding, train
from sce_jax import config as sce_config
from tests.helpers import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEYS = ("hbm_gib_per_chip", "hbm_capacity_gib", "fits", "max_batch_per_chip", "tflop_per_chip",
        "tflop_vs_analytic", "collectives", "grad_allreduce_vs_params")


needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed, and it has wheels for Linux only: pip install -e "
    "'.[tpu]' (CI's [test] extra has it)")


@pytest.mark.parametrize("name,want", [
    ("v5e:4x4", ("v5e", "v5e:4x4")), ("v5litepod-16", ("v5e", "v5e:4x4")),
    ("v5e-8", ("v5e", "v5e:2x4")), ("v6e-256", ("v6e", "v6e:16x16")),
    ("v4-8", ("v4", "v4:2x2x1")), ("v4-32", ("v4", "v4:2x2x4")), ("v4-64", ("v4", "v4:2x4x4")),
    ("v4-128", ("v4", "v4:4x4x4")), ("v5p-256", ("v5p", "v5p:4x4x8"))])
def test_accelerator_types_are_laid_out_as_cloud_tpu_does(name, want):
  """gcloud's accelerator types count TensorCores on v4/v5p (v4-32 is 16 chips), chips on
  v5e/v6e; power-of-two slices have Cloud TPU's layouts."""
  assert aot.topology(name) == want


@pytest.mark.parametrize("name", ["v3-8", "v4-12", "v5e", "h100"])
def test_unknown_slices_are_one_line_errors(name):
  with pytest.raises(aot.AotError, match="--topology"):
    aot.topology(name)


def test_max_batch_fits_a_line_and_confirms_it():
  """Memory a + s x batch with a capacity of 100 units: compiles at 8 and 64, the line
  predicts 88 (a multiple of 8), and one compile confirms it. Where memory grows faster past
  64, 88 does not fit (146); the line through 64 (74) and 88 then gives 72 (98 units; 80 would
  need 122)."""
  def compile_at(memory):
    def at(b):
      calls.append(b)
      return types.SimpleNamespace(batch_per_chip=b, hbm_bytes=memory(b),
                                   fits=memory(b) <= 100)
    return at

  calls = []
  linear = compile_at(lambda b: 10 + b)
  assert aot.max_batch(linear(8), linear, 100, step=8)[0] == 88
  assert calls == [8, 64, 88]
  calls.clear()
  kinked = compile_at(lambda b: 10 + b + 2 * max(0, b - 64))
  best, confirmed = aot.max_batch(kinked(8), kinked, 100, step=8)
  assert calls == [8, 64, 88, 72] and best == 72 and confirmed.hbm_bytes == 98
  calls.clear()  # Memory flat up to 64 (fixed costs), then growing: look 8 times further.
  flat = compile_at(lambda b: 50 + max(0, b - 64) // 16)
  best, _ = aot.max_batch(flat(8), flat, 100, step=8)
  assert calls == [8, 64, 512, 864] and best == 864 and 50 + 800 // 16 <= 100


def test_collectives_are_read_from_the_optimised_hlo():
  """One op per channel: XLA:TPU repeats an asynchronous all-gather in each fusion that
  advances it; an -start/-done pair counts once. Bytes are the result's on a chip; the backward
  pass's all-reduces are the gradients, and so is the one XLA:TPU moves out of the
  micro-batches' loop (optim.accum_steps), named after the loop."""
  hlo = "\n".join([
      '  %a = (f32[10]{0}, bf16[4,4]{1,0}) all-reduce(%x), channel_id=1, metadata={op_name="jit('
      'step)/transpose(jvp(SCENet))/probe"}',
      '  %b = f32[8]{0} all-reduce(%y), channel_id=2, metadata={op_name="jit(step)/jvp()/bn1"}',
      '  %f = f32[16]{0} all-reduce(%v), channel_id=4, metadata={op_name="jit(step)/while"}',
      "  %c = (f32[2]{0}, f32[8]{0}) all-gather-start(%z), channel_id=3",
      "  %d = f32[8]{0} all-gather-done(%c)",
      "  %g.1 = f32[32,256]{1,0:T(8,128)} all-gather(%p.1), channel_id=9, dimensions={0}",
      "  %g.2 = f32[32,256]{1,0:T(8,128)S(1)} all-gather(%p.2), channel_id=9, dimensions={0}",
      "  ROOT %e = u8[3,5]{1,0} collective-permute(%w)"])
  ops, grads = aot.collectives(hlo)
  assert ops["all-reduce"] == {"count": 3, "bytes": 40 + 32 + 32 + 64}
  assert ops["all-gather"] == {"count": 2, "bytes": 32 + 32 * 256 * 4}
  assert ops["collective-permute"] == {"count": 1, "bytes": 15}
  assert ops["all-to-all"] == ops["reduce-scatter"] == {"count": 0, "bytes": 0}
  assert grads == {"f32_bytes": 40 + 64, "other_bytes": 32}


def _check_smoke(result):
  """The smoke step fits, moves no image between chips in all-to-alls, does no chip's work
  twice, and sums its gradients in float32 at 4 bytes a parameter."""
  assert result["fits"] and 0 < result["hbm_gib_per_chip"] < result["hbm_capacity_gib"]
  assert result["collectives"]["all-to-all"]["count"] == 0
  # The only all-gather is the queue update's (one target view); shuffle-BN moves no image.
  assert result["collectives"]["all-gather"]["count"] == 1
  # XLA adds the elementwise work (BatchNorm, augmentations) to the convolutions and matmuls
  # of the analytic count, and leaves out the multiply-adds on their zero padding (up to 31%
  # of a 3x3 convolution of a 4x4 map); a step done in full on every chip would be x 4.
  assert 0.8 <= result["tflop_vs_analytic"] < 1.5
  # The backward pass's all-reduces: the gradients, plus BatchNorm's two backward sums per
  # channel, a few percent of the parameters at smoke widths.
  assert result["grad_allreduce_float32"]
  assert 1.0 <= result["grad_allreduce_vs_params"] < 1.1


@needs_libtpu
def test_command_on_a_multi_process_slice(tmp_path):
  """`python -m sce_jax.aot` for v4-16 (8 chips, 2 TPU VMs): the table, the JSON's keys, the
  smoke step's figures (the one compile of a ResNet step for TPU in the fast tests; a
  one-process slice: test_vit_smoke_step_on_a_v5e_slice)."""
  out = tmp_path / "check.json"
  run = subprocess.run(
      [sys.executable, "-m", "sce_jax.aot", "--config=configs/cifar10_r18.py:smoke",
       "--topology=v4-16", f"--json={out}"], capture_output=True, text=True, cwd=ROOT,
      env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert run.returncode == 0, run.stderr[-2000:]
  assert "| HBM per chip |" in run.stdout
  result = json.loads(out.read_text())
  assert set(KEYS) <= set(result) and result["max_batch_per_chip"] is None
  assert (result["topology"], result["chips"], result["processes"]) == ("v4:2x2x2", 8, 2)
  _check_smoke(result)


def _shipped():
  """Every config file: its smoke variant where it has one, else itself; and ViT-B/16."""
  for path in sorted((ROOT / "configs").glob("*.py")):
    try:
      sce_config.load(f"{path}:smoke")
      yield path.stem, "smoke"
    except sce_config.ConfigError:  # A file without a smoke variant.
      yield path.stem, ""
  yield "imagenet_vit_s16", "vit_b16"


@pytest.mark.parametrize("name, arg", [  # The full ViTs trace in 25-35 s on 2 loaded cores.
    pytest.param(n, a, marks=pytest.mark.slow) if n == "imagenet_vit_s16" else (n, a)
    for n, a in _shipped()])
def test_analytic_count_of_every_shipped_config(name, arg):
  """aot.step_flops on each shipped config, the analytic count of the table (a compile of the
  big ones is too slow for the suite: benchmarks/RESULTS.md). A ViT's drop_path runs its
  forward in training mode with a dropout key (it once stopped every ViT row with
  InvalidRngError); dropping blocks changes no shape, so the count is that of drop_path 0."""
  config = sce_config.load(f"{ROOT / 'configs' / name}.py" + (f":{arg}" if arg else ""))
  config.unlock()
  mesh = sharding.make_mesh()

  def count(config):
    parts = train.build(config, mesh, num_classes=10, steps_per_epoch=10)
    return aot.step_flops(config, parts, jax.eval_shape(parts.init, jax.random.key(0)))

  flops = count(config)
  assert flops > 0
  if config.model.drop_path:
    config.model.drop_path = 0.0
    assert count(config) == flops


@needs_libtpu
@pytest.mark.slow  # the ViT step compiled for a v5e slice: ~2 min on 2 loaded cores
def test_vit_smoke_step_on_a_v5e_slice():
  config = load_config("cifar10_vit", "smoke")
  assert config.model.drop_path > 0
  result = aot.check(config, "v5e:2x2", log=lambda *_: None)
  assert result["fits"] and result["tflop_per_chip"] > 0
  assert result["grad_allreduce_float32"]


def test_fsdp_state_per_chip():
  """sharding.params='fsdp' (every array of more than min_size_mib split, here 0): a chip's
  share of the step's state, as aot reports it, is about an eighth of the whole on 8 devices
  (the queue, step and rng stay whole); replicated, it is the whole state. No compile."""
  config = load_config("cifar10_vit", "smoke")
  mesh = sharding.make_mesh()
  share = {}
  for params in ("replicate", "fsdp"):
    config.sharding.update(params=params, min_size_mib=0.0)
    parts = train.build(config, mesh, num_classes=10, steps_per_epoch=10)
    state, _ = aot.step_inputs(config, parts, mesh, on_device=False, num_examples=320)
    share[params] = aot.per_chip(state)
  whole = aot.per_chip(jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=sharding.replicated(mesh)), state))
  assert share["replicate"] == whole
  assert whole / 8 < share["fsdp"] < whole / 6
