"""Evaluators of a trunk (docs/SCE.md sections 7, 9), one module each, with one interface.

* `MODES`: what `--mode=NAME` runs on a checkpoint's or imported trunk; each is
  evaluate(config, trunk_variables, mesh, splits, workdir) -> {name: value}. Those of
  `OWN_DATA` read their own data sets and get splits=None.
* `periodic`: the evaluations a pretraining run makes at its own cadence, as `loop.Evaluator`s
  (run(state) -> (name, value) pairs); each cadence is config.eval.<name>.every_epochs.
"""
from sce_jax import loop
from sce_jax.evaluators import common, finetune, knn, linear, online_probe, transfer, voc07

MODES = {"knn": knn.evaluate, "linear": linear.evaluate, "transfer": transfer.evaluate,
         "voc07_svm": voc07.evaluate, "finetune": finetune.evaluate}
OWN_DATA = ("transfer", "voc07_svm")


def _every(every_epochs, steps_per_epoch):
  """An epoch cadence in steps: > 0 every that many epochs; 0 at the end only; < 0 never."""
  return every_epochs * steps_per_epoch if every_epochs > 0 else min(every_epochs, 0)


def periodic(config, mesh, splits, steps_per_epoch) -> list[loop.Evaluator]:
  """kNN on the online trunk, and the online probe on the eval split when it is enabled."""
  trunk = common.trunk_variables
  evaluators = [loop.Evaluator(
      "kNN", _every(config.eval.knn.every_epochs, steps_per_epoch),
      lambda state: knn.evaluate(config, trunk(state), mesh, splits).items())]
  if config.probe.enabled:
    evaluators.append(loop.Evaluator(
        "online probe", _every(config.eval.probe.every_epochs, steps_per_epoch),
        lambda state: online_probe.evaluate(config, trunk(state), state.params["probe"],
                                            mesh, splits).items()))
  return evaluators
