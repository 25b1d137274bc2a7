# Helpers shared by the launchers: argument checks and a dry-run aware command runner.
# shellcheck shell=bash

DRY_RUN="${DRY_RUN:-0}"

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# The arguments as one shell-readable line: plain words as they are, others single-quoted.
quote() {
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=("$arg"); else out+=("${arg@Q}"); fi
  done
  echo "${out[*]}"
}

# Runs a command, or only prints it with --dry-run / DRY_RUN=1.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote "$@"
  else
    "$@"
  fi
}
