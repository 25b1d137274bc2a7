"""What a run prints: the default filter, the progress bar under log lines, short causes."""
import io
import logging
import os
import sys

import tqdm

from sce_jax import logs


def record(path, level):
  return logging.LogRecord("absl", level, path, 1, "message", None, None)


def test_default_output_keeps_our_lines_and_other_warnings():
  own = os.path.join(os.path.dirname(logs.__file__), "train.py")
  orbax = os.path.join("site-packages", "orbax", "checkpoint", "checkpoint_manager.py")
  jax_file = os.path.join("site-packages", "jax", "_src", "xla_bridge.py")
  assert logs._default_output(record(own, logging.INFO))
  assert not logs._default_output(record(jax_file, logging.INFO))  # 'Unable to initialize...'
  assert logs._default_output(record(jax_file, logging.WARNING))
  for level in (logging.INFO, logging.WARNING, logging.ERROR):  # Each failure is re-reported.
    assert not logs._default_output(record(orbax, level))
  asyncio_error = record(os.path.join("asyncio", "base_events.py"), logging.ERROR)
  asyncio_error.name = "asyncio"  # 'Task exception was never retrieved'
  assert not logs._default_output(asyncio_error)


def test_log_lines_go_above_the_progress_bar():
  """Without the wrapper a log line would continue the bar's line; with it the bar is cleared
  first and drawn again below the line."""
  terminal = io.StringIO()
  bar = tqdm.tqdm(total=10, file=terminal, ncols=60)
  try:
    bar.update(3)
    drawn = terminal.getvalue()
    logs._AboveBar(terminal).write("I1128 step 3/10: loss 6.1\n")
    after = terminal.getvalue()[len(drawn):]
  finally:
    bar.close()
  line = after.index("I1128 step 3/10: loss 6.1\n")
  assert after[:line].startswith("\r") and after[:line].strip() == ""  # The bar, erased.
  assert "3/10" in after[line + 26:]  # ... and redrawn after the line.


class _RaisesWhenCollected:
  def __init__(self, message):
    self.message = message

  def __del__(self):
    raise RuntimeError(self.message)


def test_only_the_closed_event_loop_is_silenced(capsys, monkeypatch):
  monkeypatch.setattr(sys, "unraisablehook", logs._unraisablehook)
  _RaisesWhenCollected("Event loop is closed")
  assert capsys.readouterr().err == ""
  _RaisesWhenCollected("something else")
  assert "RuntimeError: something else" in capsys.readouterr().err


def test_brief_keeps_the_first_line():
  error = ValueError("DATA_LOSS: cannot read\n" + "{'spec': 1}\n" * 5000)
  assert logs.brief(error) == "ValueError: DATA_LOSS: cannot read"
  assert logs.brief(ValueError("a" * 300 + "b" * 300), 15) == "ValueError: aaaaaaaaaa ... bbbbb"
