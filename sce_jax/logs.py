"""What a run prints on stderr.

By default: a config summary, the parameter count, one line per log step (step, loss, img/s,
ETA), one per checkpoint, the evaluation results, warnings and a one-line error. absl's
--verbosity=1 adds everything else: the whole config, the parameter table, every metric, and the
INFO logs of JAX, orbax and TensorFlow. On a terminal a progress bar sits below the log lines;
elsewhere (a batch job's log file) the per-log-step lines are the progress.
"""
import importlib.util
import logging as py_logging
import os
import sys

import jax
import tqdm
from absl import logging

_OWN = os.path.dirname(os.path.abspath(__file__))  # the sce_jax package


def brief(e: BaseException, limit: int = 800) -> str:
  """An exception as one line of at most about `limit` characters: orbax's and TensorStore's
  messages run to hundreds of lines (array specs, paths). Of a longer first line, the start
  (where TensorStore puts the cause) and the end (where it puts the OS error) are kept."""
  first = (str(e).strip().splitlines() or [""])[0]
  if len(first) > limit:
    first = f"{first[:limit * 2 // 3]} ... {first[-limit // 3:]}"
  return f"{type(e).__name__}: {first}"


def _default_output(record) -> bool:
  """sce_jax's own lines, and other libraries' warnings. orbax is left out entirely: it logs
  every save in ~40 INFO lines, warns about missing metadata when evaluation reads a checkpoint,
  and logs each failure as an error with its traceback, which sce_jax reports in one line; so
  is asyncio, which logs each of orbax's failed writes again ('Task exception was never
  retrieved', a traceback per array)."""
  if record.pathname.startswith(_OWN):
    return True
  return (record.levelno >= py_logging.WARNING and record.name != "asyncio"
          and f"{os.sep}orbax{os.sep}" not in record.pathname)


def _unraisablehook(unraisable):
  """After a failed checkpoint read, TensorStore's callbacks land on orbax's closed event loop
  and each prints an 'Event loop is closed' traceback (up to hundreds) around the one-line
  error; they are harmless and left out of the default output."""
  value = unraisable.exc_value
  if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
    sys.__unraisablehook__(unraisable)


class _AboveBar:
  """stderr while a progress bar is drawn on it: each write clears the bar and redraws it below,
  so log lines never break it."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text):
    with tqdm.tqdm.external_write_mode(file=self._stream):
      return self._stream.write(text)

  def __getattr__(self, name):
    return getattr(self._stream, name)


def _import_tensorflow_quietly():
  """TensorFlow's C++ side writes banners (oneDNN, 'All log messages before
  absl::InitializeLog()') straight to stderr as it loads, whatever the log level: it is
  imported, if installed, with stderr pointed at /dev/null. A failed import stays silent here
  and is reported where TensorFlow is needed."""
  if importlib.util.find_spec("tensorflow") is None:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  null = os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, 2)
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pass
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(null)


def quiet():
  """The default output's filter (`_default_output`) for absl's records wherever they are
  printed: by absl's handler under an absl app, by Python's own handlers elsewhere (a notebook,
  `python -m sce_jax.convert`, whose reading of a checkpoint orbax comments in 4 warnings)."""
  logging.get_absl_handler().addFilter(_default_output)
  py_logging.getLogger("absl").addFilter(_default_output)
  sys.unraisablehook = _unraisablehook


def setup(verbosity: int):
  """The output of the command line, or of a notebook, at absl's `verbosity` (0 by default).
  Before TensorFlow is imported: it reads its C++ log level (warnings such as those of a
  skipped corrupt image) once."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbosity >= 1 else "2")
  handler = logging.get_absl_handler()
  if verbosity < 1:
    quiet()
    _import_tensorflow_quietly()
  if sys.stderr.isatty():
    # absl's handler writes to its stream and, for errors, to sys.stderr when they differ.
    sys.stderr = handler.python_handler.stream = _AboveBar(sys.__stderr__)


def progress_bar(total: int, initial: int):
  """A tqdm bar of the steps on a terminal (process 0) whose log lines `setup` routes above it,
  else None."""
  if jax.process_index() > 0 or not isinstance(sys.stderr, _AboveBar):
    return None
  return tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                   file=sys.__stderr__)
