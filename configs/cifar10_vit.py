"""SCE on CIFAR-10 with a ViT-Tiny of patch 4 (docs/SCE.md section 10). Not a published setting.

Ours, and not yet measured (no accelerator so far; benchmarks/proof.py is where a GPU window
would measure it): the CIFAR-10 column of docs/SCE.md 5 for what depends on the data (batch
256, 200 epochs, asymmetric weak/strong views, queue 4096, temp 0.1, temp_m 0.05, coeff 0.5,
constant m 0.99) and the authors' ViT-Tiny runs in eztorch for the network and its optimiser
(docs/SCE.md 10: AdamW with lr 5e-4 x batch / 256, weight decay 0.05 off norms, biases and the
position and class tokens, 10 warm-up epochs, clipping at norm 1, stochastic depth 0.1, GELU
heads without normalisation of hidden width 1024 with a predictor). Patch 4 makes an 8 x 8
grid of 64 tokens, the usual choice for ViTs on 32-px images.
Variants: `smoke` (2 blocks of width 32, patch 8, a few dozen steps on the CPU), `epochs=N`.
"""
from sce_jax import config as sce_config
from sce_jax import methods


def get_config(arg=None):
  arg = sce_config.parse_arg(arg, smoke=False, epochs=200, method="sce")
  c = sce_config.base()
  c.epochs = arg.epochs
  c.data.on_device = True  # when the train set fits (sce_jax/data/resident.py), else the host

  c.model.trunk = "vit_tiny"     # width 192, 12 blocks, 3 heads
  c.model.patch_size = 4
  c.model.drop_path = 0.1        # eztorch vit_tiny.yaml
  c.model.pos_resample = "dino"  # eztorch's ViT: DINO's interpolate_pos_encoding
  c.model.concat_views = True    # no BatchNorm: the same as a pass per view, faster
  c.model.projector.update(hidden_dim=1024, out_dim=256, num_layers=3, last_bias=True,
                           norm="none", activation="gelu")  # eztorch projector_tiny_vit_mlp3
  c.model.predictor.update(hidden_dim=1024, num_layers=2, last_bias=False, norm="none",
                           activation="gelu")  # eztorch predictor_tiny_vit_mlp2
  c.sce.target_bn_splits = 0     # no BatchNorm, no shuffle-BN

  c.optim.name = "adamw"
  c.optim.base_lr = 5e-4
  c.optim.weight_decay = 0.05
  c.optim.betas = (0.9, 0.999)
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0
  c.optim.warmup_epochs = 10
  methods.apply_recipe(c, arg.method, "cifar_vit")
  if arg.smoke:
    sce_config.smoke(c)
    c.model.update(width=32, depth=2, num_heads=2, patch_size=8, drop_path=0.1)
  c.lock()
  return c
