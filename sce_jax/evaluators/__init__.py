"""Evaluators of a trunk (docs/SCE.md sections 7, 9), one module each, with one interface.

* `MODES`: what `--mode=NAME` runs on a checkpoint's or imported trunk; each is
  evaluate(config, trunk_variables, mesh, splits, workdir) -> {name: value}. Those of
  `OWN_DATA` read their own data sets and get splits=None.
* `periodic`: the evaluations a pretraining run makes at its own cadence, as `loop.Evaluator`s
  (run(state) -> (name, value) pairs); each cadence is config.eval.<name>.every_epochs.
* `provenance`: what a mode's numbers depend on, recorded with them (eval_<mode>.json).
"""
from absl import logging

from sce_jax import loop, models
from sce_jax.evaluators import common, finetune, knn, linear, online_probe, transfer, voc07

MODES = {"knn": knn.evaluate, "linear": linear.evaluate, "transfer": transfer.evaluate,
         "voc07_svm": voc07.evaluate, "finetune": finetune.evaluate}
OWN_DATA = ("transfer", "voc07_svm")
# Each mode's config section, config.eval.<section>: its protocol's choices.
SECTIONS = {"knn": "knn", "linear": "linear", "transfer": "transfer", "voc07_svm": "voc07",
            "finetune": "finetune"}
# What an OWN_DATA evaluator recorded of the sets it read: recorded(config, workdir) ->
# {"split_sizes": ..., and "protocol": per set where a set has choices of its own}.
RECORDED = {"transfer": transfer.recorded, "voc07_svm": voc07.recorded}


def provenance(config, mode, trunk_variables, splits, workdir):
  """What the numbers of --mode=`mode` depend on (README, Results): the protocol's choices
  (config.eval.<section>, the evaluation crop, a ViT's position resampling, and what each set
  recorded), the trunk weights' `common.trunk_checksum`, the sizes of the splits read and the
  library versions. Called after `mode` ran, on process 0."""
  data = config.data
  protocol = {f"eval.{SECTIONS[mode]}": config.eval[SECTIONS[mode]].to_dict(),
              "data": {"image_size": data.image_size, "eval_resize": data.eval_resize,
                       "eval_interpolation": data.eval_interpolation}}
  for key in models.trunks.family(config.model).EVAL_KEYS:
    protocol[f"model.{key}"] = config.model[key]
  if mode in OWN_DATA:
    recorded = RECORDED[mode](config, workdir)
    protocol.update(recorded.get("protocol", {}))
    sizes = recorded["split_sizes"]
  else:
    sizes = {"train": splits.train.num_examples, "eval": splits.eval.num_examples}
    if mode == "finetune":
      sizes["labelled"] = finetune.train_source(config, splits)[0].num_examples
  return {"protocol": protocol, "trunk_sha256": common.trunk_checksum(trunk_variables),
          "split_sizes": sizes, "versions": common.versions()}


def _every(every_epochs, steps_per_epoch):
  """An epoch cadence in steps: > 0 every that many epochs; 0 at the end only; < 0 never."""
  return every_epochs * steps_per_epoch if every_epochs > 0 else min(every_epochs, 0)


def periodic(config, mesh, splits, labelled, steps_per_epoch) -> list[loop.Evaluator]:
  """kNN on the online trunk over `labelled` (`sources.labelled`: the training splits, or the
  labelled set given apart), and the online probe on its eval split when it is enabled and the
  training data have labels; one skipped for want of labels says so in one line."""
  trunk = common.trunk_variables
  evaluators, skipped = [], []
  knn_every = _every(config.eval.knn.every_epochs, steps_per_epoch)
  if labelled is not None:
    evaluators.append(loop.Evaluator(
        "kNN", knn_every,
        lambda state: knn.evaluate(config, trunk(state), mesh, labelled).items()))
  elif knn_every >= 0:
    skipped.append("kNN")
  probe_every = _every(config.eval.probe.every_epochs, steps_per_epoch)
  if config.probe.enabled and splits.num_classes and labelled is not None:
    evaluators.append(loop.Evaluator(
        "online probe", probe_every,
        lambda state: online_probe.evaluate(config, trunk(state), state.params["probe"],
                                            mesh, labelled).items()))
  elif config.probe.enabled:  # a labelled mixture's probe trains, but has no eval split
    skipped.append("the online probe's evaluation" if splits.num_classes else "the online probe")
  if skipped:
    logging.info("Skipping %s: %s%s.", " and ".join(skipped),
                 "the training data have no labels" if not splits.num_classes else
                 "a data.mixture has no evaluation split of its own",
                 "" if labelled is not None else
                 " (--config.eval.data.path or eval.data.name gives kNN a labelled set)")
  return evaluators
