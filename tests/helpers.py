"""Shared test helpers: load a config file the way the command line does; check that an
evaluation run resumes exactly."""
import pathlib

import pytest

from sce_jax import checkpoint, metrics
from sce_jax import config as sce_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name, arg=None):
  """configs/<name>.py:get_config(arg) through `config.load`, unlocked so tests can reshape it."""
  config = sce_config.load(f"{CONFIGS / name}.py" + (f":{arg}" if arg else ""))
  config.unlock()
  return config


def resumes_exactly(evaluate, rundir, prefix, tmp_path, monkeypatch):
  """evaluate(workdir) -> results, a `loop.Run` in workdir/rundir: run whole in tmp_path/whole,
  and in tmp_path/split preempted at step 2 (it saves and raises Preempted) then run again.
  Asserts both give the same results and log the same `prefix` metrics step for step
  (throughput and ETA differ); returns (results, {step: those metrics})."""
  whole = evaluate(tmp_path / "whole")
  with monkeypatch.context() as patch:
    patch.setattr(checkpoint.Preemption, "reached", lambda self, mngr, step: step == 2)
    with pytest.raises(checkpoint.Preempted, match=f"saved step 2 to .*split/{rundir}"):
      evaluate(tmp_path / "split")
  assert evaluate(tmp_path / "split") == whole
  logged = {run: {step: {k: v for k, v in record.items() if k.startswith(prefix)}
                  for step, record in metrics.read(tmp_path / run / rundir).items()}
            for run in ("whole", "split")}
  assert logged["whole"] == logged["split"]
  return whole, logged["whole"]
