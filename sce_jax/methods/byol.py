"""BYOL (Grill et al., NeurIPS 2020): the online predictor regresses the EMA target's
projection of the other view, normalised MSE, both directions (docs/SCE.md "Other methods").

ImageNet: google-deepmind/deepmind-research byol/ (configs/byol.py, byol_experiment.py):
batch 4096, LARS (eta 1e-3, momentum 0.9), lr base x batch / 256 with 10 warm-up epochs and a
cosine, the presets of lr, weight decay and EMA by epochs. CIFAR: solo-learn's byol.yaml.
"""
from sce_jax import losses

EMA_TARGET = True

# byol/utils/networks.py MLP: Linear(hidden), BatchNorm, ReLU, Linear(out) with a bias; the
# projector 4096-256, the predictor 4096-256. Our hidden Linear has no bias before its BN (which
# removes it); solo-learn's heads are the same.
_HEAD = {"model.projector.num_layers": 2, "model.projector.hidden_dim": 4096,
         "model.projector.out_dim": 256, "model.projector.norm": "batch",
         "model.projector.activation": "relu", "model.projector.last_bn": False,
         "model.projector.last_bias": True,
         "model.predictor.num_layers": 2, "model.predictor.hidden_dim": 4096,
         "model.predictor.norm": "batch", "model.predictor.activation": "relu",
         "model.predictor.last_bn": False, "model.predictor.last_bias": True,
         "sce.symmetric": True, "sce.target_bn_splits": 0, "sce.m_schedule": "cosine",
         "sce.m_final": 1.0, "optim.name": "lars", "optim.momentum": 0.9,
         "optim.warmup_epochs": 10}
# byol/configs/byol.py: epochs -> (lr, weight decay, base EMA); other epoch counts take the
# next published count's values (200 -> 300's).
PRESETS = {100: (0.45, 1e-6, 0.99), 300: (0.3, 1e-6, 0.99), 1000: (0.2, 1.5e-6, 0.996)}


def _imagenet(c):
  lr, wd, m0 = PRESETS[min((e for e in PRESETS if e >= c.epochs), default=1000)]
  return {**_HEAD, "batch_size": 4096, "optim.base_lr": lr, "optim.weight_decay": wd,
          "optim.trust_coefficient": 1e-3, "sce.m0": m0, "data.views": "byol",
          "sce.target_init": "random"}  # byol_experiment.py: the target from its own rng


RECIPES = {
    "imagenet": _imagenet,
    # solo-learn scripts/pretrain/cifar/byol.yaml: LARS lr 1.0, wd 1e-5, eta 0.02 (its
    # clip_lr is not ours), tau 0.99 -> 1.
    "cifar": {**_HEAD, "batch_size": 256, "optim.base_lr": 1.0, "optim.weight_decay": 1e-5,
              "optim.trust_coefficient": 0.02, "sce.m0": 0.99, "data.views": "cifar_byol"},
}


pairs = losses.config_pairs  # the crop pairing the config states


def uses_queue(config):
  return False


def make_loss(config, pairs):
  """The sum over the pairs (byol_experiment.py adds the two directions) of the mean
  normalised MSE. Metric: the online-target cosine of the positives."""

  def local(qs, zs, queue, keys):
    del keys  # no in-batch keys
    loss, pos_sim = losses.pair_mean(losses.normalized_mse, qs, zs, pairs)
    return loss * len(pairs), {"pos_sim": pos_sim}

  return local
