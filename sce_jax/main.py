"""Command line: pretrain SCE, or evaluate a trunk.

  python -m sce_jax.main --config=configs/cifar10_r18.py:smoke \\
      --config.data.path=cifar-10-python.tar.gz --workdir=/tmp/w
  python -m sce_jax.main --config=configs/imagenet_r50.py:multicrop,epochs=200 --workdir=DIR

--mode=train (default) pretrains, resuming from the workdir's latest checkpoint, then runs the
final evaluations (config.eval.<name>.every_epochs >= 0). --mode=knn, linear, transfer,
voc07_svm and finetune evaluate the workdir's latest checkpoint, or imported weights with
--config.eval.checkpoint=PATH, and write <workdir>/eval_<mode>.json. Config values are
overridden with --config.KEY=VALUE.

Several processes (TPU pods, GPU clusters): --distributed lets jax.distributed.initialize()
find the cluster (also when JAX_COORDINATOR_ADDRESS is set); or name it explicitly:
--coordinator_address=HOST:PORT --num_processes=N --process_id=I. Each process reads its share
of the data; process 0 alone writes logs and metrics. On a CPU, JAX's own setting
JAX_NUM_CPU_DEVICES=8 makes 8 devices (tests).

Output (logs.py): a short account by default; --verbosity=1 prints everything;
--config_help lists the config keys. From the moment the process starts, a SIGTERM (preemption)
or a first Ctrl-C is a request to stop (preemption.py): before the first step it stops at once,
after it saves a checkpoint and stops; a second Ctrl-C stops at once. The exit status says how
the run ended (exits.py, README "Exit codes").
"""
import json
import os
import signal
import sys

from sce_jax import goodput, preemption  # noqa: F401  (goodput first: its clock starts)

if __name__ == "__main__":  # The command line, not an import: before the imports below.
  preemption.install()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from absl import app, flags, logging
from etils import epath

from sce_jax import checkpoint, cli, compile_cache, evaluators, exits, logs, schema, sharding
from sce_jax import train, weights
from sce_jax import config as sce_config
from sce_jax import workdir as workdir_lib
from sce_jax.data import images, sources

_CONFIG = cli.CONFIG
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results go here.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", *evaluators.MODES],
                          "Pretrain, or evaluate a trunk (sce_jax/evaluators/: kNN, linear "
                          "probe, linear transfer, VOC07 SVMs, semi-supervised fine-tuning).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Several processes: jax.distributed.initialize() finds them (SLURM, "
    "Open MPI, Cloud TPU, Kubernetes). Implied by --coordinator_address or the environment "
    "variable JAX_COORDINATOR_ADDRESS.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0, for an explicit multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])


def _set_xla_flags(config):
  """Before JAX starts its backend, which reads XLA_FLAGS once."""
  if config.fast_compile:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0").strip()


def _initialize_distributed():
  if not (_DISTRIBUTED.value or _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")):
    return
  # Cross-process collectives on CPU devices (tests); no effect on TPU and GPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  preemption.share_sigterm()
  jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def _load_trunk(config, workdir, mode):
  """The trunk to evaluate: eval.checkpoint, or the workdir's latest checkpoint; a missing or
  mismatched one is a CheckpointError, found before the data are opened."""
  source = config.eval.checkpoint or workdir
  if not config.eval.checkpoint:
    try:
      checkpoint.find_state(workdir)
    except ValueError as e:
      raise checkpoint.CheckpointError(
          f"--mode={mode} evaluates a checkpoint, and {checkpoint.checkpoints_dir(workdir)} "
          "has none; train first with this --workdir, or pass --config.eval.checkpoint=PATH (a "
          "workdir or weights to evaluate).") from e
  try:
    return source, weights.load_trunk(source, config.model)
  except ValueError as e:  # convert's messages name the file and what does not fit.
    raise checkpoint.CheckpointError(f"cannot evaluate {source}: {e}") from e


def _evaluate(config, workdir, mode, mesh, splits, source, trunk):
  """The evaluator `mode` of `trunk` (read from `source`); results to eval_<mode>.json, with
  what they depend on (`evaluators.provenance`)."""
  results = evaluators.MODES[mode](config, trunk, mesh, splits, workdir)
  logging.info("%s evaluation of %s: %s", mode, source, results)
  if jax.process_index() == 0:
    (epath.Path(workdir) / f"eval_{mode}.json").write_text(json.dumps(
        {"checkpoint": str(source), **results,
         "provenance": evaluators.provenance(config, mode, trunk, splits, workdir)}, indent=1))


def _run(config, workdir, mode):
  """The run, with a look at the stop flag (`preemption.check`) after each start-up stage."""
  preemption.check()
  schema.validate(config, jax.device_count(), jax.process_count(), workdir)
  preemption.check()
  if mode != "train":
    source, trunk = _load_trunk(config, workdir, mode)
  splits = None if mode in evaluators.OWN_DATA else sources.Splits(config.data)
  mesh = sharding.make_mesh()
  if mode == "train":
    train.train(config, workdir, mesh, splits)
  else:
    if splits is not None:  # OWN_DATA evaluators open their own sets
      splits = sources.labelled(splits, config.data, config.eval.data)
      if splits is None:
        raise sce_config.ConfigError(
            f"--mode={mode} needs labels, and data.path={config.data.path} has none; set "
            "--config.eval.data.path to a labelled set (class folders, a test split beside "
            "them) or --config.eval.data.name to a TFDS name.")
      splits.open_eval()
      preemption.check()
    with workdir_lib.lock(workdir, mode):
      _evaluate(config, workdir, mode, mesh, splits, source, trunk)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.setup(flags.FLAGS.verbosity)
  config, workdir = _CONFIG.value, _WORKDIR.value
  _set_xla_flags(config)
  compile_cache.enable(config)
  _initialize_distributed()
  if jax.process_index() > 0:  # Process 0 logs the run; the others only what goes wrong.
    logging.set_verbosity(logging.WARNING)
  logging.vlog(1, "Process %d of %d, %d of %d devices; config:\n%s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), config)
  try:
    _run(config, workdir, _MODE.value)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.exit(exits.PREEMPTED)
  except preemption.Stopped as e:
    logging.warning("%s", e)
    sys.exit(exits.INTERRUPTED if e.signum == signal.SIGINT else exits.PREEMPTED)
  except (sce_config.ConfigError, images.DataError, checkpoint.CheckpointError,
          workdir_lib.WorkdirError, FloatingPointError, evaluators.common.MissingPackage) as e:
    logging.debug("Traceback of the error below:", exc_info=True)  # --verbosity=1
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(exits.ERROR)
  return exits.DONE  # app.run exits with it.


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
