"""benchmarks/proof.py --smoke: every stage of the GPU-window command with tiny shapes on the CPU,
writing every key of the result (torch's as null with a note where torch is not installed)."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import proof  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.mark.slow
def test_proof_smoke_writes_every_key(tmp_path):
  out = subprocess.run([sys.executable, "benchmarks/proof.py", "--smoke", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  (path,) = tmp_path.glob("*-cpu.json")
  result = json.loads(path.read_text())
  assert set(proof.RESULT_KEYS) <= set(result) and result["card"] == "cpu"
  for key in ("r50_img_s", "r18_img_s", "vit_s16_img_s"):
    assert result[key] > 0, key
  assert result["cifar10_epochs"] == 2 and [e for e, _ in result["cifar10_knn_curve"]] == [1, 2]
  assert 0 <= result["cifar10_knn_top1"] <= 1
  if importlib.util.find_spec("torch") is None:
    assert result["r50_torch_eager_img_s"] is None
    assert any("skipped: torch not installed" in note for note in result["notes"])
  else:
    assert result["r50_torch_eager_img_s"] > 0 and result["r50_torch_compile_img_s"] > 0
  assert path.with_name(path.stem + ".log").stat().st_size > 0
  if importlib.util.find_spec("matplotlib") is not None:
    assert path.with_name(path.stem + "-knn.png").stat().st_size > 0


def test_cifar_epochs_fill_the_budget():
  """At 5,000 images/s a 50,000-image epoch takes 10 s: 300 s hold 90 s of start-up, the final
  kNN evaluation (15 s) and 19 epochs; 20 epochs would add an evaluation (90 + 30 + 200 s)."""
  assert proof.cifar_epochs(300, 5000, 50_000) == 19
  assert proof.cifar_epochs(60, 5000, 50_000) == 0
  assert proof.cifar_epochs(1e6, 5000, 50_000) == proof.MAX_EPOCHS
