#!/usr/bin/env bash
# Runs sce_jax on GPU nodes under SLURM: submits itself with sbatch, and inside the allocation
# starts `python -m sce_jax.main --distributed` with srun on every node. sce_jax.main then calls
# jax.distributed.initialize(), which reads the process count and ids from SLURM; this script
# sets the coordinator (the allocation's first node) and, per node, which GPUs a process owns.
#
# Usage (from a checkout, with sce_jax's environment active; sbatch passes it on):
#   launch/slurm_gpu.sh [--dry-run] --config CONFIG --workdir DIR [--nodes N] [--gpus-per-node G]
#     [--per-node] [--mode MODE] [--partition P] [--account A] [--time HH:MM:SS]
#     [--cpus-per-task C] [-- EXTRA_MAIN_FLAGS...]
#
# MODE (sce_jax.main --mode): train (default) | knn | linear | transfer | voc07_svm | finetune
# Processes: one per GPU by default (SLURM_LOCALID picks the GPU; every task sees all of its
# node's GPUs, so do not bind GPUs per task), or --per-node: one per node owning all G GPUs
# (JAX_LOCAL_DEVICE_IDS, since JAX would otherwise give the single local process GPU 0 only).
# DIR must be on a file system every node sees. PYTHON overrides the interpreter (python3).
# --dry-run (or DRY_RUN=1): print the commands instead of running them.
#
# Exit status (README, "Exit codes"): 0 finished, 1 an error, 75 stopped by SIGTERM (SLURM's
# preemption or time limit, with --signal) or Ctrl-C after saving a checkpoint: requeue the job
# (`scontrol requeue $SLURM_JOB_ID`) or rerun this command to resume. A requeued job takes over
# its own earlier run's workdir lock.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$here/common.sh"

args=()  # what the job re-reads: everything but --dry-run
for arg in "$@"; do [[ "$arg" == --dry-run ]] || args+=("$arg"); done
config="" workdir="" mode="train" nodes=1 gpus=8 per_node=0 cpus=""
sbatch_flags=()
extra=()
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --config) config="$2"; shift ;;
    --workdir) workdir="$2"; shift ;;
    --mode) mode="$2"; shift ;;
    --nodes) nodes="$2"; shift ;;
    --gpus-per-node) gpus="$2"; shift ;;
    --per-node) per_node=1 ;;
    --cpus-per-task) cpus="$2"; shift ;;
    --partition | --account | --time) sbatch_flags+=("$1=$2"); shift ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument $1 (see the usage at the top of this script)" ;;
  esac
  shift
done
[[ -n "$config" && -n "$workdir" ]] || die "--config and --workdir are required"
tasks=$((per_node ? 1 : gpus))
[[ -n "$cpus" ]] && sbatch_flags+=("--cpus-per-task=$cpus")

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  # Outside an allocation: submit this script (by its path in the checkout) as the job.
  run sbatch --job-name=sce_jax "--nodes=$nodes" "--ntasks-per-node=$tasks" \
    "--gpus-per-node=$gpus" ${sbatch_flags[@]+"${sbatch_flags[@]}"} \
    --wrap="$(quote "$here/slurm_gpu.sh" "${args[@]}")"
  exit 0
fi

# Inside the allocation (the job above, or salloc): one srun step over all nodes.
# The first line of the expanded host list, without a pipe into `head`: under pipefail, head
# closing the pipe early could kill scontrol with SIGPIPE (exit 141) at random.
head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
head_node="${head_node%%$'\n'*}"
env_vars=("JAX_COORDINATOR_ADDRESS=$head_node:$((SLURM_JOB_ID % 4096 + 61440))")
if ((per_node)); then
  env_vars+=("JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))")
fi
run env "${env_vars[@]}" srun --kill-on-bad-exit=1 "--nodes=$nodes" "--ntasks-per-node=$tasks" \
  "${PYTHON:-python3}" -m sce_jax.main --distributed "--config=$config" "--workdir=$workdir" "--mode=$mode" \
  ${extra[@]+"${extra[@]}"}
