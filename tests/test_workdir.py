"""The workdir's lock (a second run, a stale lock, another host) and config.json."""
import json
import os
import socket
import subprocess
import types

import pytest

from sce_jax import evaluators, main
from sce_jax import workdir as workdir_lib
from sce_jax.data import sources
from tests.helpers import load_config


def write_lock(tmp_path, **holder):
  (tmp_path / workdir_lib.LOCK).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": "", "since": "then",
       **holder}))


def test_a_second_run_is_refused(tmp_path):
  """While a run holds the workdir (here this process), another stops naming its host and pid;
  the lock is gone once the first run ends."""
  with workdir_lib.lock(tmp_path):
    holder = json.loads((tmp_path / workdir_lib.LOCK).read_text())
    with pytest.raises(workdir_lib.WorkdirError) as e:
      with workdir_lib.lock(tmp_path):
        pass
  assert str(e.value) == (
      f"{tmp_path} is in use by process {os.getpid()} on {socket.gethostname()} (since "
      f"{holder['since']}); stop that run or pass another --workdir. If it is no longer "
      f"running, delete {tmp_path / workdir_lib.LOCK}.")
  assert not (tmp_path / workdir_lib.LOCK).exists()


def test_a_stale_lock_is_taken_over(tmp_path, caplog):
  """A lock left on this host by a process that has exited (killed before it could release
  it) is taken over, with a warning."""
  dead = subprocess.Popen(["true"])
  dead.wait()
  write_lock(tmp_path, pid=dead.pid)
  with workdir_lib.lock(tmp_path):
    assert json.loads((tmp_path / workdir_lib.LOCK).read_text())["pid"] == os.getpid()
  assert (f"Taking over {tmp_path / workdir_lib.LOCK} from process {dead.pid} on "
          f"{socket.gethostname()}, which is no longer running.") in caplog.text


def test_another_host_is_refused_unless_it_is_this_slurm_job(tmp_path, monkeypatch):
  """Another host cannot be asked whether its run is alive; a requeued SLURM job can tell that
  the lock is its own earlier run's."""
  write_lock(tmp_path, host="node-17", pid=4242, slurm_job="99")
  with pytest.raises(workdir_lib.WorkdirError, match=r"in use by process 4242 on node-17 "):
    with workdir_lib.lock(tmp_path):
      pass
  monkeypatch.setenv("SLURM_JOB_ID", "99")
  with workdir_lib.lock(tmp_path):
    pass


def test_config_json_and_a_differing_restart(tmp_path, caplog):
  """A fresh start writes config.json; resuming with other values warns, in one line, and keeps
  the file (the config the checkpoints were started with)."""
  config = load_config("cifar10_r18", "smoke")
  workdir_lib.record_config(tmp_path, config, resumed=False)
  saved = json.loads((tmp_path / workdir_lib.CONFIG).read_text())
  assert saved["model"]["width"] == 4 and saved["data"]["mean"] == list(config.data.mean)
  workdir_lib.record_config(tmp_path, config, resumed=True)
  assert "differs" not in caplog.text
  config.model.width, config.max_steps = 8, 100
  workdir_lib.record_config(tmp_path, config, resumed=True)
  assert caplog.records[-1].getMessage() == (
      f"The config differs from the one this workdir was started with "
      f"({tmp_path / workdir_lib.CONFIG}): max_steps 24 -> 100; model.width 4 -> 8. The run "
      "goes on with the new values.")
  assert json.loads((tmp_path / workdir_lib.CONFIG).read_text()) == saved


@pytest.mark.parametrize("mode", sorted(evaluators.MODES))
def test_every_evaluation_mode_locks_the_workdir(tmp_path, monkeypatch, mode):
  """The command line holds lock_<mode>.json while it evaluates (main._run): a second run of
  the same mode on the workdir is refused (two --mode=finetune runs would write one
  finetune_<subset>/checkpoints), pretraining beside it is not; the lock is gone after."""
  seen = []

  def evaluate(config, trunk, mesh, splits, workdir):
    with pytest.raises(workdir_lib.WorkdirError, match=f"lock_{mode}.json"):
      with workdir_lib.lock(workdir, mode):
        pass
    with workdir_lib.lock(workdir):  # pretraining's
      seen.append(sorted(p.name for p in tmp_path.iterdir()))
    return {}

  monkeypatch.setitem(evaluators.MODES, mode, evaluate)
  monkeypatch.setattr(main, "_load_trunk", lambda config, workdir, mode: ("weights", {}))
  monkeypatch.setattr(sources, "Splits", lambda data: types.SimpleNamespace(
      train=None, open_eval=lambda: None, num_classes=10))
  monkeypatch.setattr(evaluators, "provenance", lambda *args: {})
  main._run(load_config("cifar10_r18", "smoke"), str(tmp_path), mode)
  assert seen == [[workdir_lib.LOCK, f"lock_{mode}.json"]]
  assert sorted(p.name for p in tmp_path.iterdir()) == [f"eval_{mode}.json"]
