"""SIGTERM (a preemption) and Ctrl-C (SIGINT) as a request to stop, acted on at safe points.

Python's SIGINT raises KeyboardInterrupt wherever the main thread happens to be: inside a
library's callback (JAX's garbage-collection hook prints and drops it, and the run goes on),
halfway through the start of XLA (a segmentation fault at exit) or in an import (a traceback);
SIGTERM's default ends the process without a word. So from the moment the command line starts
(`install`, before JAX is imported) both signals only set a flag, and the run looks at it where
stopping is safe:

* before the first step, between the start-up stages (`check`): the run stops at once with one
  line (`Stopped`; the command line exits 130 for Ctrl-C, 75 for SIGTERM so that a requeued job
  starts again), nothing saved, the workdir lock released;
* after each step (`Preemption`, in loop.Run): it saves a checkpoint, then stops (`Preempted`);
* in the evaluations that save as they go (transfer, VOC07 SVMs: features of each split,
  results of each set), after each saved stage (`kept`, `Preempted`); where nothing is saved
  (kNN), between stages (`Stopped`).

After the first Ctrl-C a second one stops the process at once (SIGINT's default action: the
steps since the last checkpoint are lost). Python runs the handler between bytecodes, so a signal
while XLA compiles takes effect when the compilation returns. Several processes: SIGTERM belongs
to JAX's preemption service (`share_sigterm`, before jax.distributed.initialize installs its
handler), which agrees on one step at which every process saves and stops, read by orbax in
`reached_preemption`; a Ctrl-C is passed on to it as a SIGTERM.

Nothing here imports JAX: the command line installs the handlers before it does.
"""
import signal

from absl import logging

_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
_REASONS = {signal.SIGINT: "Interrupted (Ctrl-C)", signal.SIGTERM: "Preempted (SIGTERM)"}


class Stopped(Exception):
  """A stop requested before this process's first step (or, `where`, an evaluation's first
  saved stage): nothing new was saved. `signum` is the signal (main.py turns it into the exit
  status)."""

  def __init__(self, signum, where="before the first step"):
    super().__init__(f"{_REASONS[signum]} {where}: stopped at once, nothing new was saved; "
                     "rerun the same command to start again.")
    self.signum = signum


class Preempted(Exception):
  """Raised by a loop after it saved at a preemption or a Ctrl-C (`Preemption.stop`); the
  command line then exits with exits.PREEMPTED."""


class _State:
  """The process's one request to stop."""

  def __init__(self):
    self.signum = None      # the first signal received that this process acts on alone
    self.received = None    # the first signal received (with several processes, passed on)
    self.forward = False    # several processes: a Ctrl-C goes to JAX's preemption service
    self.training = False   # a loop runs: the handler says what happens next
    self.previous = None    # {signal: handler before `install`}, None when not installed


_state = _State()


def _handle(signum, frame):
  del frame
  if signum == signal.SIGINT:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # A second Ctrl-C stops at once.
  _state.received = _state.received or signum
  if signum == signal.SIGINT and _state.forward:
    signal.raise_signal(signal.SIGTERM)  # To JAX's preemption service: every process stops.
  else:
    _state.signum = _state.signum or signum
  if _state.training:
    logging.warning("%s: saving a checkpoint after this step, then stopping.%s", _NAMES[signum],
                    " Ctrl-C again stops at once, losing the steps since the last checkpoint."
                    if signum == signal.SIGINT else "")


def install(signals=(signal.SIGINT, signal.SIGTERM)) -> bool:
  """Turns `signals` into the flag from now on, unless done already; whether it was done now.
  The command line calls it first thing; a loop run from code, for its own duration."""
  if _state.previous is not None:
    return False
  _state.previous = {s: signal.signal(s, _handle) for s in signals}
  return True


def uninstall():
  """Puts back the handlers `install` replaced and forgets any request (a loop run from code,
  at its end)."""
  for s, previous in (_state.previous or {}).items():
    if previous is not None:  # None: a handler installed outside Python, left as it was.
      signal.signal(s, previous)
  _state.__init__()


def share_sigterm():
  """Several processes, before jax.distributed.initialize: SIGTERM goes back to its default for
  JAX's preemption service to take over, and a Ctrl-C is passed on to it."""
  if _state.previous is not None and signal.SIGTERM in _state.previous:
    signal.signal(signal.SIGTERM, _state.previous.pop(signal.SIGTERM) or signal.SIG_DFL)
  _state.forward = True


def check():
  """At a safe point before the first step: `Stopped` if a stop was requested."""
  if _state.signum is not None:
    raise Stopped(_state.signum)


def requested() -> bool:
  """Whether this process was asked to stop (an evaluation's safe points,
  evaluators.common.safe_point, agree on it across processes)."""
  return _state.signum is not None


def stopped(where) -> Stopped:
  """What an evaluation raises at a safe point before it saved anything (exit 130 / 75)."""
  return Stopped(_state.received or signal.SIGTERM, where)


def kept(what) -> Preempted:
  """What an evaluation raises at a safe point after `what` was saved (exit 75, as a loop
  that saved a checkpoint)."""
  return Preempted(f"{_REASONS[_state.received or signal.SIGTERM]}: stopped after {what}; "
                   "rerun the same command to resume from there.")


class Preemption:
  """Whether a loop should save and stop at this step boundary, for the loop's duration: the
  flag, or the step JAX's preemption service agreed on (several processes)."""

  def __init__(self, process_count: int):
    one = process_count == 1
    _state.forward = _state.forward or not one
    self._installed = install((signal.SIGINT, signal.SIGTERM) if one else (signal.SIGINT,))
    _state.training = True

  def reached(self, mngr, step) -> bool:
    return _state.signum is not None or mngr.reached_preemption(step)

  def stop(self, step, where) -> Preempted:
    """What the loop raises once the save of `step` into `where` has started."""
    reason = _REASONS[_state.received or signal.SIGTERM]
    return Preempted(f"{reason}: saved step {step} to {where}; rerun the same command to "
                     "resume from it.")

  def close(self):
    _state.training = False
    if self._installed:
      uninstall()
