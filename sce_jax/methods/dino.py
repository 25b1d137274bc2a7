"""DINO (Caron et al., ICCV 2021): self-distillation with no labels. The student's softmax
over 65,536 prototypes (temp 0.1) learns the EMA teacher's on the other crops, the teacher's
outputs centred (an EMA of their global batch mean) and sharpened (temp 0.04 -> 0.07); the
teacher sees the two global crops, the student every crop (docs/SCE.md 12, "DINO").

ImageNet ViT-S/16: facebookresearch/dino main_dino.py defaults and its README's commands (100
epochs: the vanilla run; 300: the "boosted" one). CIFAR ResNet-18: solo-learn's dino.yaml.
CIFAR ViT: ours (main_dino.py's ViT values with solo-learn's CIFAR head and views).

Its heads' outputs reach the loss as they are (`embed`), and its state beside the networks is
the centre, kept where a queue method keeps its queue (`init_memory`, `make_targets`).
"""
import jax
import jax.numpy as jnp

from sce_jax import losses

EMA_TARGET = True

# vision_transformer.py DINOHead: Linear-GELU-Linear-GELU-Linear 2048-2048-256, no BN
# (--use_bn_in_head False), L2-normalised, weight-normalised Linear to --out_dim.
_HEAD = {"model.projector.num_layers": 3, "model.projector.hidden_dim": 2048,
         "model.projector.bottleneck_dim": 256, "model.projector.norm": "none",
         "model.projector.activation": "gelu", "model.projector.last_bn": False,
         "model.predictor.num_layers": 0,
         # DINOLoss: teacher view i (the 2 global crops) against student crop j != i; student
         # temp 0.1; centre momentum 0.9.
         "sce.symmetric": True, "sce.num_global": 2, "sce.temp": 0.1, "sce.center_m": 0.9,
         "sce.m_schedule": "cosine", "sce.m_final": 1.0, "sce.target_bn_splits": 0,
         "sce.target_init": "copy", "sce.target_drop_path": False,
         "optim.freeze_last_layer": 1}
# main_dino.py's ViT optimisation: AdamW (torch's defaults), lr 5e-4 x batch / 256 after 10
# warm-up epochs, cosine to 1e-6; weight decay 0.04 -> 0.4 cosine; each tensor's gradient
# clipped at 3.0; stochastic depth 0.1 in the student; teacher momentum 0.996 -> 1.
_VIT = {**_HEAD, "optim.name": "adamw", "optim.base_lr": 5e-4, "optim.betas": (0.9, 0.999),
        "optim.eps": 1e-8, "optim.warmup_epochs": 10, "optim.min_lr": 1e-6,
        "optim.weight_decay": 0.04, "optim.wd_schedule": "cosine",
        "optim.weight_decay_end": 0.4, "optim.clip_norm": 3.0, "optim.clip_scope": "tensor",
        "model.drop_path": 0.1, "sce.m0": 0.996}


def _imagenet_vit(c):
  """README: 100 epochs on 8 GPUs x 64 (the vanilla command: teacher temp 0.04, last layer
  normalised); 300 epochs on 16 x 64 with --teacher_temp 0.07 --warmup_teacher_temp_epochs 30
  --norm_last_layer false (that only with vit_small). Both: 2 x 224 + 8 x 96 crops."""
  boosted = c.epochs >= 300
  return {**_VIT, "batch_size": 1024 if boosted else 512, "model.projector.out_dim": 65536,
          "model.projector.norm_last_layer": not (boosted and c.model.trunk == "vit_small"),
          "sce.temp_m": 0.07 if boosted else 0.04, "sce.temp_m_warmup": 0.04,
          "sce.temp_m_warmup_epochs": 30 if boosted else 0,
          "model.pos_embed": "learned", "model.freeze_patch_embed": False,
          "data.views": "dino"}


RECIPES = {
    "imagenet_vit": _imagenet_vit,
    # solo-learn scripts/pretrain/cifar/dino.yaml (+ solo/methods/dino.py defaults: teacher temp
    # 0.07 from the start, no clipping, last layer frozen 1 epoch, normalised; warmup 10
    # epochs: solo/methods/base.py): LARS lr 0.3, wd 1e-6, eta 0.02, tau 0.9995 -> 1, 4096
    # prototypes, asymmetric.yaml views.
    "cifar": {**_HEAD, "model.projector.out_dim": 4096, "model.projector.norm_last_layer": True,
              "batch_size": 256, "optim.name": "lars", "optim.base_lr": 0.3,
              "optim.weight_decay": 1e-6, "optim.momentum": 0.9,
              "optim.trust_coefficient": 0.02, "optim.warmup_epochs": 10, "sce.m0": 0.9995,
              "sce.temp_m": 0.07, "sce.temp_m_warmup_epochs": 0, "data.views": "cifar_byol"},
    # Ours: main_dino.py's ViT values on cifar10_vit.py's ViT-Tiny/4, with solo-learn's CIFAR
    # prototypes and views; the teacher temp main_dino.py's default 0.04.
    "cifar_vit": {**_VIT, "model.projector.out_dim": 4096,
                  "model.projector.norm_last_layer": True, "sce.temp_m": 0.04,
                  "sce.temp_m_warmup_epochs": 0, "data.views": "cifar_byol"},
}


pairs = losses.config_pairs  # the crop pairing the config states (symmetric, 2 global)


def uses_queue(config):
  return False


def embed(x):
  """The head's logits as the loss reads them: as they are, in float32."""
  return x.astype(jnp.float32)


def init_memory(config):
  """The centre of the teacher's outputs (DINOLoss's buffer): zeros."""
  return jnp.zeros((config.model.projector.out_dim,), jnp.float32)


def teacher_temp(config, steps_per_epoch):
  """DINOLoss.teacher_temp_schedule, indexed by the step's epoch e: linspace(temp_m_warmup,
  temp_m, W)[e] for e < W = sce.temp_m_warmup_epochs, then temp_m."""
  start, end, warmup = config.sce.temp_m_warmup, config.sce.temp_m, config.sce.temp_m_warmup_epochs

  def temp(step):
    epoch = step // steps_per_epoch
    return jnp.where(epoch < warmup, start + (end - start) * epoch / max(warmup - 1, 1), end)
  return temp


def make_targets(config, steps_per_epoch):
  """targets(zs, center, step) -> (probabilities, new centre, metrics), run on the global
  batch (outside the loss's shard_map): the teacher's logits of each global crop centred by the
  old centre and sharpened, softmax((z - c) / temp(step)); the centre's EMA of the mean over
  both crops and every device's rows (DINOLoss.update_center's all_reduce)."""
  temp_fn, m = teacher_temp(config, steps_per_epoch), config.sce.center_m

  def targets(zs, center, step):
    temp = temp_fn(step)
    probs = {i: jax.nn.softmax((z - center) / temp, axis=-1) for i, z in zs.items()}
    batch_center = jnp.mean(jnp.stack([zs[i] for i in sorted(zs)]), axis=(0, 1))
    return probs, center * m + batch_center * (1 - m), {"teacher_temp": temp}

  return targets


def make_loss(config, pairs):
  """DINOLoss: the mean over the pairs (teacher crop i, student crop j != i) of the rows' mean
  cross-entropy. Metrics: the teacher's entropy and KL(teacher || student), its two parts."""
  temp = config.sce.temp

  def local(qs, zs, queue, keys):
    del queue, keys  # the centre is applied before (make_targets)
    entropy = {i: jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1))
               for i, p in zs.items()}
    loss = sum(jnp.mean(losses.dino(qs[j], zs[i], temp=temp)) for i, j in pairs) / len(pairs)
    mean_entropy = sum(entropy[i] for i, _ in pairs) / len(pairs)
    return loss, {"teacher_entropy": mean_entropy, "kl": loss - mean_entropy}

  return local
