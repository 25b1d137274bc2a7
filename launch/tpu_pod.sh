#!/usr/bin/env bash
# Runs sce_jax on a Cloud TPU VM slice: create the slice, install sce_jax on every worker, then
# start the same `python3 -m sce_jax.main --distributed` on all workers at once: JAX finds its
# peers from the TPU metadata (jax.distributed.initialize() without arguments).
#
# Usage:
#   launch/tpu_pod.sh [--dry-run] --name NAME --zone ZONE --type ACCELERATOR_TYPE \
#     --config CONFIG --workdir gs://BUCKET/DIR [--mode MODE] [--project PROJECT] \
#     [--version RUNTIME] [--spot] [--skip-create] [--source DIR|GIT_URL] [--detach] [--check] \
#     [-- EXTRA_MAIN_FLAGS...]
#
# MODE (sce_jax.main --mode): train (default) | knn | linear | transfer | voc07_svm | finetune
# Example (ImageNet from TFDS on GCS):
#   launch/tpu_pod.sh --name sce --zone us-central2-b --type v4-64 \
#     --config configs/imagenet_r50.py --workdir gs://my-bucket/sce/r50 \
#     -- --config.data.source=tfds --config.data.data_dir=gs://my-bucket/tensorflow_datasets
#
# --source: a local checkout (default: the one holding this script; its committed HEAD is
#   copied with `git archive`) or a git URL cloned on every worker.
# --detach: run in the background on the workers (log in ~/sce_jax.log), so the run survives
#   the end of this ssh session; without it the output streams here.
# --check: first compile the step for the --type slice on this machine (python -m sce_jax.aot,
#   needs `pip install -e '.[tpu]'` here; $PYTHON, default python3), with the --config.*
#   overrides among EXTRA_MAIN_FLAGS; stop before creating anything if it does not fit.
# --dry-run (or DRY_RUN=1): print the commands instead of running them.
#
# Exit status of sce_jax.main (README, "Exit codes"): 0 finished, 1 an error, 75 preempted
# (SIGTERM, e.g. a --spot slice reclaimed) after saving a checkpoint: rerun with --skip-create
# (or on a new slice) and the same --workdir to resume.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$here/common.sh"

name="" zone="" type="" config="" workdir="" project="" mode="train"
version="tpu-ubuntu2204-base" spot=0 create=1 detach=0 check=0 source_="$(dirname "$here")"
extra=()
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name) name="$2"; shift ;;
    --zone) zone="$2"; shift ;;
    --type) type="$2"; shift ;;
    --config) config="$2"; shift ;;
    --workdir) workdir="$2"; shift ;;
    --mode) mode="$2"; shift ;;
    --project) project="$2"; shift ;;
    --version) version="$2"; shift ;;
    --source) source_="$2"; shift ;;
    --spot) spot=1 ;;
    --skip-create) create=0 ;;
    --detach) detach=1 ;;
    --check) check=1 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument $1 (see the usage at the top of this script)" ;;
  esac
  shift
done
[[ -n "$name" && -n "$zone" && -n "$config" && -n "$workdir" ]] ||
  die "--name, --zone, --config and --workdir are required"
[[ "$workdir" == gs://* ]] || die "--workdir must be a gs:// path: every worker writes to it"

if ((check)); then
  [[ -n "$type" ]] || die "--check compiles for the --type slice: pass --type (e.g. v4-32)"
  [[ -d "$source_" ]] || die "--check runs the local checkout: pass --source DIR"
  overrides=()
  for arg in ${extra[@]+"${extra[@]}"}; do
    [[ "$arg" == --config.* ]] && overrides+=("$arg")
  done
  (cd "$source_" && run "${PYTHON:-python3}" -m sce_jax.aot "--config=$config" \
    "--topology=$type" ${overrides[@]+"${overrides[@]}"}) ||
    die "$config does not fit a $type slice (see the check above); nothing was created"
fi

tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone")
[[ -n "$project" ]] && where+=("--project=$project")

if ((create)); then
  [[ -n "$type" ]] || die "--type (e.g. v4-32) is required to create the slice"
  flags=("--accelerator-type=$type" "--version=$version")
  ((spot)) && flags+=(--spot)
  run "${tpu[@]}" create "$name" "${where[@]}" "${flags[@]}"
fi

# Fetch the code on every worker, then install JAX for TPU and sce_jax (with TFDS support).
if [[ -d "$source_" ]]; then
  archive="$(mktemp -u /tmp/sce_jax.XXXXXX).tar.gz"
  run git -C "$source_" archive --format=tar.gz --output="$archive" HEAD
  run "${tpu[@]}" scp "$archive" "$name:sce_jax.tar.gz" "${where[@]}" --worker=all
  fetch="rm -rf ~/sce_jax && mkdir ~/sce_jax && tar xzf ~/sce_jax.tar.gz -C ~/sce_jax"
else
  fetch="rm -rf ~/sce_jax && git clone --depth=1 $(quote "$source_") ~/sce_jax"
fi
install="python3 -m pip install -U 'jax[tpu]' && python3 -m pip install -e ~/sce_jax'[tf]'"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$fetch && $install"

main="python3 -m sce_jax.main --distributed $(quote "--config=$config" "--workdir=$workdir" \
  "--mode=$mode" \
  ${extra[@]+"${extra[@]}"})"
if ((detach)); then
  main="nohup $main > ~/sce_jax.log 2>&1 < /dev/null &"
fi
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="cd ~/sce_jax && $main"
