"""The online linear probe, evaluated: its top-1/top-5 on the eval split (docs/SCE.md 7).

The probe head trains inside the pretraining step on stop-gradient features of the online
trunk (models/sce.py); its training accuracy is a step metric, this is its held-out one: the
trunk in inference mode (BatchNorm running statistics), the head applied to its features.
"""
from sce_jax import models
from sce_jax.evaluators import common, supervised


def evaluate(config, trunk_variables, probe_params, mesh, splits):
  """probe_top1 / probe_top5 of the head `probe_params` ({'kernel', 'bias'}) on splits.eval."""
  trunk = models.make_trunk(config.model)
  feats, labels = common.extract_features(trunk, trunk_variables, splits.eval, config.data,
                                          batch_size=config.eval.batch_size, mesh=mesh)
  top1, top5 = supervised.head_accuracy(probe_params, feats, labels)
  return {"probe_top1": top1, "probe_top5": top5}
