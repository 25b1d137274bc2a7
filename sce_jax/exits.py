"""Exit statuses of `python -m sce_jax.main`, for job scripts and launchers (README, "Exit
codes"). 75 is EX_TEMPFAIL of sysexits.h ("try again later"); 130 is what a shell reports for a
process ended by SIGINT. Imports nothing, so that a launcher or benchmark reads them without
starting JAX."""

DONE = 0           # finished
ERROR = 1          # stopped by an error, reported in one line
PREEMPTED = 75     # a SIGTERM (preemption), or a Ctrl-C after a checkpoint was saved: rerun
INTERRUPTED = 130  # a Ctrl-C before the first step, or a second one: stopped at once
