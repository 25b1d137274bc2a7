"""SimCLR (Chen et al., ICML 2020; v2: NeurIPS 2020): NT-Xent over the global batch, both views
through the one network with gradients, no target network (docs/SCE.md "Other methods").

ImageNet: google-research/simclr (tf2/run.py defaults, README's pretraining command: batch
4096, 100 epochs, temp 0.1, lr 0.075 x sqrt(batch) = 0.3 x batch / 256 at 4096, wd 1e-4, LARS,
10 warm-up epochs; tf2/model.py's 3-layer projection head). CIFAR: solo-learn's simclr.yaml.
"""
import jax
import jax.numpy as jnp

from sce_jax import losses
from sce_jax.sharding import DATA

EMA_TARGET = False

RECIPES = {
    # tf2/model.py ProjectionHead (proj_head_mode nonlinear, num_proj_layers 3): two hidden
    # layers of the trunk's width with BN and ReLU, the last one to proj_out_dim 128 with BN
    # and no bias (SimCLR's last BN keeps its scale; ours has no affine).
    "imagenet": {
        "model.projector.num_layers": 3, "model.projector.hidden_dim": 2048,
        "model.projector.out_dim": 128, "model.projector.norm": "batch",
        "model.projector.activation": "relu", "model.projector.last_bn": True,
        "model.projector.last_bias": False, "model.predictor.num_layers": 0,
        "batch_size": 4096, "optim.name": "lars", "optim.base_lr": 0.3,
        "optim.weight_decay": 1e-4, "optim.momentum": 0.9, "optim.trust_coefficient": 1e-3,
        "optim.warmup_epochs": 10, "sce.temp": 0.1, "sce.symmetric": True,
        "sce.target_bn_splits": 0, "data.views": "simclr"},
    # solo-learn scripts/pretrain/cifar/simclr.yaml: Linear, ReLU, Linear 2048-256, LARS lr
    # 0.4, wd 1e-4, eta 0.02 (its clip_lr is not ours), temp 0.2.
    "cifar": {
        "model.projector.num_layers": 2, "model.projector.hidden_dim": 2048,
        "model.projector.out_dim": 256, "model.projector.norm": "none",
        "model.projector.activation": "relu", "model.projector.last_bn": False,
        "model.projector.last_bias": True, "model.predictor.num_layers": 0,
        "batch_size": 256, "optim.name": "lars", "optim.base_lr": 0.4,
        "optim.weight_decay": 1e-4, "optim.momentum": 0.9, "optim.trust_coefficient": 0.02,
        "optim.warmup_epochs": 10, "sce.temp": 0.2, "sce.symmetric": True,
        "sce.target_bn_splits": 0, "data.views": "simclr"},
}


def pairs(config, num_views):
  """Both directions between the two views (NT-Xent is symmetric)."""
  return losses.crop_pairs(2, 2, symmetric=True)


def uses_queue(config):
  return False


def make_loss(config, pairs):
  """NT-Xent of views 0 and 1 (qs: the online network's embeddings of both, with gradients):
  every device's rows gathered, the gradient flowing back through the gather as through
  SimCLR's cross-replica concat. The mean over the rows of loss_a + loss_b, as the reference.
  Metric: the cosine of the positives."""
  temp = config.sce.temp

  def local(qs, zs, queue, keys):
    del keys  # the online embeddings, gathered with their gradients below
    a, b = qs[0], qs[1]
    gather = lambda x: jax.lax.all_gather(x, DATA, tiled=True)
    index = jax.lax.axis_index(DATA) * a.shape[0] + jnp.arange(a.shape[0])
    loss = losses.nt_xent(a, b, gather(a), gather(b), index, temp=temp)
    return jnp.mean(loss), {"pos_sim": jnp.mean(jnp.sum(a * b, axis=-1))}

  return local
