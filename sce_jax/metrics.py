"""Where a run's scalars go: process 0 only, every other process writes nothing.

Always `<workdir>/metrics.jsonl`, one JSON object per logged step (appended across restarts, so
a resumed run repeats the steps after its checkpoint; the last line of a step wins). Also clu's
TensorBoard writer when `clu.metric_writers` imports: it needs TensorFlow and TensorBoard, so it
is imported here, lazily. Every scalar is logged at --verbosity=1 (the training loop logs a
one-line summary of each log step).
"""
import importlib.util
import json

import jax
from absl import logging
from etils import epath


def _clu_writer(workdir):
  """clu's TensorBoard writer, or None. TensorBoard's absence is checked first: importing
  clu.metric_writers imports TensorFlow, seconds of start-up, before it would fail."""
  reason = "No module named 'tensorboard'"
  if importlib.util.find_spec("tensorboard") is not None:
    try:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      return metric_writers.SummaryWriter(str(workdir))
    except ImportError as e:
      reason = e
  logging.vlog(1, "No TensorBoard summaries (%s); metrics go to metrics.jsonl.", reason)
  return None


class Writer:
  """write(step, scalars) to the JSONL file and, when it imports, clu's default writer."""

  def __init__(self, workdir):
    self._jsonl = self._clu = None
    if jax.process_index() == 0:
      self._jsonl = (epath.Path(workdir) / "metrics.jsonl").open("a")
      self._clu = _clu_writer(workdir)

  def write(self, step, scalars):
    if self._jsonl is None:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    if self._clu is not None:
      self._clu.write_scalars(step, scalars)
    logging.vlog(1, "[%d] %s", step, ", ".join(f"{k}={v:.5g}" for k, v in scalars.items()))

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._clu is not None:
      self._clu.close()


def read(workdir) -> dict[int, dict]:
  """The records of a metrics.jsonl by step; for a step logged twice (resumed), the last."""
  lines = (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  records = {}
  for record in map(json.loads, lines):
    records.setdefault(record["step"], {}).update(record)
  return records
