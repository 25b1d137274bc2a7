"""MoCo v2 (Chen et al. 2020, arXiv 2003.04297): InfoNCE of the online query against its key
and a FIFO queue of past keys, an EMA key encoder with shuffle-BN (docs/SCE.md "Other methods").

ImageNet: facebookresearch/moco (main_moco.py --mlp --moco-t 0.2 --aug-plus --cos, lr 0.03 at
batch 256): one pair, the key of view 0 against the query of view 1. CIFAR: solo-learn's
mocov2plus.yaml (MoCo v2+): both pairs (symmetric), the keys of both views in one queue.
"""
from sce_jax import losses

EMA_TARGET = True

# The heads: a 2-layer MLP without BatchNorm (moco/builder.py's --mlp: Linear, ReLU, Linear).
_HEAD = {"model.projector.num_layers": 2, "model.projector.norm": "none",
         "model.projector.activation": "relu", "model.projector.last_bn": False,
         "model.projector.last_bias": True, "model.predictor.num_layers": 0}
RECIPES = {
    # facebookresearch/moco main_moco.py defaults and README's MoCo v2 command.
    "imagenet": {
        **_HEAD, "model.projector.hidden_dim": 2048, "model.projector.out_dim": 128,
        "batch_size": 256, "optim.name": "sgd", "optim.base_lr": 0.03,
        "optim.weight_decay": 1e-4, "optim.momentum": 0.9, "optim.warmup_epochs": 0,
        "sce.temp": 0.2, "sce.queue": 65536, "sce.symmetric": False, "sce.m0": 0.999,
        "sce.m_schedule": "constant",
        "sce.target_bn_splits": 8,  # shuffle-BN over the 8 GPUs of 32 images each
        "data.views": "moco_v2"},
    # solo-learn scripts/pretrain/cifar/mocov2plus.yaml (+ solo/methods/base.py defaults:
    # warmup 10 epochs).
    "cifar": {
        **_HEAD, "model.projector.hidden_dim": 2048, "model.projector.out_dim": 256,
        "batch_size": 256, "optim.name": "sgd", "optim.base_lr": 0.3,
        "optim.weight_decay": 1e-4, "optim.momentum": 0.9, "optim.warmup_epochs": 10,
        "sce.temp": 0.2, "sce.queue": 32768, "sce.symmetric": True, "sce.m0": 0.99,
        "sce.m_schedule": "cosine", "sce.m_final": 0.999,
        "sce.target_bn_splits": 0,  # one GPU with synchronised BN: no shuffle
        "data.views": "cifar_moco_v2"},
}


pairs = losses.config_pairs  # the crop pairing the config states


def uses_queue(config):
  return True


def make_loss(config, pairs):
  """InfoNCE averaged over the pairs (solo-learn: the two directions' mean). Metric: the
  online-target cosine of the positives."""
  temp = config.sce.temp

  def local(qs, zs, queue, keys):
    del keys  # no in-batch keys
    info_nce = lambda q, z: losses.info_nce(q, z, queue, temp=temp)
    loss, pos_sim = losses.pair_mean(info_nce, qs, zs, pairs)
    return loss, {"pos_sim": pos_sim}

  return local
