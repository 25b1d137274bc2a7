"""ReSSL (Zheng et al., NeurIPS 2021): the online network's similarity distribution over a
queue of past target embeddings, sharpened less (temp 0.1), learns the EMA target's
(temp_m 0.04) on a weakly augmented view (docs/SCE.md "Other methods"). The positive is no
column: SCE's coeff = 0 limit keeps it, so the two differ.

ImageNet: KyleZheng1997/ReSSL ressl.py (script/train.sh: ResNet-50, 200 epochs, lr 0.05, t
0.04; network/ressl.py: K 131072, m 0.999, shuffle-BN). CIFAR: solo-learn's ressl.yaml.
"""
from sce_jax import losses

EMA_TARGET = True

# The heads: Linear, ReLU, Linear (ReSSL network/head.py ProjectionHead; solo-learn the same).
_HEAD = {"model.projector.num_layers": 2, "model.projector.norm": "none",
         "model.projector.activation": "relu", "model.projector.last_bn": False,
         "model.projector.last_bias": True, "model.predictor.num_layers": 0,
         "sce.symmetric": False}  # the weak view 0 is the target's, view 1 the online one's
RECIPES = {
    # ReSSL ressl.py: batch 32 x 8 GPUs, SGD lr 0.05 (not scaled), momentum 0.9, wd 1e-4
    # (not on BN and biases: ours decays them too), warmup 5 epochs then cosine; the weak
    # target_aug / strong moco_aug views of data/augmentation.py = our `cifar` preset at 224.
    "imagenet": {
        **_HEAD, "model.projector.hidden_dim": 4096, "model.projector.out_dim": 512,
        "batch_size": 256, "optim.name": "sgd", "optim.base_lr": 0.05,
        "optim.weight_decay": 1e-4, "optim.momentum": 0.9, "optim.warmup_epochs": 5,
        "sce.temp": 0.1, "sce.temp_m": 0.04, "sce.queue": 131072, "sce.m0": 0.999,
        "sce.m_schedule": "constant", "sce.target_bn_splits": 8, "data.views": "cifar"},
    # solo-learn scripts/pretrain/cifar/ressl.yaml (queue: solo/methods/ressl.py's default
    # 65536; warmup 10 epochs: solo/methods/base.py).
    "cifar": {
        **_HEAD, "model.projector.hidden_dim": 4096, "model.projector.out_dim": 256,
        "batch_size": 256, "optim.name": "sgd", "optim.base_lr": 0.05,
        "optim.weight_decay": 1e-4, "optim.momentum": 0.9, "optim.warmup_epochs": 10,
        "sce.temp": 0.1, "sce.temp_m": 0.04, "sce.queue": 65536, "sce.m0": 0.99,
        "sce.m_schedule": "cosine", "sce.m_final": 1.0, "sce.target_bn_splits": 0,
        "data.views": "cifar_ressl"},
}


pairs = losses.config_pairs  # the crop pairing the config states


def uses_queue(config):
  return True


def make_loss(config, pairs):
  """The relational loss averaged over the pairs. Metrics: the online-target cosine of the
  positives (which the loss does not see)."""
  kw = dict(temp=config.sce.temp, temp_m=config.sce.temp_m)

  def local(qs, zs, queue, keys):
    del keys  # no in-batch keys
    relational = lambda q, z: losses.relational(q, z, queue, **kw)
    loss, pos_sim = losses.pair_mean(relational, qs, zs, pairs)
    return loss, {"pos_sim": pos_sim}

  return local
