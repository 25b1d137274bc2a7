"""SCE on ImageNet with ViT-S/16 or ViT-B/16 (docs/SCE.md section 10, where every value's source
is listed).

The authors' SCE ViT settings (eztorch, configs/run/pretrain/sce/vit/*.yaml and the heads they
name) for the objective, the heads, the weight-decay exclusions and the clipping; MoCo v3's
ViT-S/16 and ViT-B/16 ImageNet settings (facebookresearch/moco-v3 CONFIG.md) where an image
recipe at batch 4096 differs: batch, epochs, warm-up, learning rate and weight decay, the fixed
sin-cos position table and the frozen random patch projection. Augmentations: SCE's ImageNet
ones (docs/SCE.md 6). Linear evaluation: MoCo v3's ViT protocol (main_lincls.py, lr 3).

Variants, after the file name and comma-separated: `vit_b16` (ViT-B/16), `multicrop` (2 x 224 +
192, 160, 128, 96 crops, docs/SCE.md 6), `epochs=N` (default 300).
E.g. --config=configs/imagenet_vit_s16.py:vit_b16,multicrop.
Data: TFDS imagenet2012 (manual download; --config.data.data_dir=DIR).
"""
from sce_jax import config as sce_config
from sce_jax import methods


def get_config(arg=None):
  arg = sce_config.parse_arg(arg, vit_b16=False, multicrop=False, epochs=300, method="sce")
  c = sce_config.base()
  c.batch_size = 4096            # MoCo v3
  c.epochs = arg.epochs          # MoCo v3: 300

  c.model.trunk = "vit_base" if arg.vit_b16 else "vit_small"  # 6 heads (DeiT, eztorch)
  c.model.patch_size = 16
  c.model.pos_embed = "sincos"   # MoCo v3
  c.model.pos_resample = "dino"  # eztorch's ViT: DINO's interpolate_pos_encoding
  c.model.freeze_patch_embed = True  # MoCo v3 --stop-grad-conv1
  c.model.drop_path = 0.1        # eztorch vit_small.yaml
  c.model.dtype = "bfloat16"
  c.model.concat_views = True    # eztorch mutual_pass: a pass per crop size; exact without BN
  c.model.projector.update(hidden_dim=2048, out_dim=256, num_layers=3, last_bn=False,
                           last_bias=True, norm="none", activation="gelu")
  c.model.predictor.update(hidden_dim=2048, num_layers=2, last_bn=False, last_bias=False,
                           norm="none", activation="gelu")  # eztorch *_vit_mlp3 / _mlp2

  c.sce.temp = 0.1
  c.sce.temp_m = 0.07
  c.sce.coeff = 0.5              # the SCE paper (eztorch's SoccerNet ViT runs set 1)
  c.sce.queue = 65536
  c.sce.symmetric = True
  c.sce.num_global = 2
  c.sce.m0 = 0.99
  c.sce.m_schedule = "cosine"
  c.sce.target_bn_splits = 0     # no BatchNorm

  c.optim.name = "adamw"
  c.optim.base_lr = 1.5e-4       # MoCo v3 at batch 4096 (eztorch: 5e-4 at batch 1024)
  c.optim.weight_decay = 0.1     # MoCo v3 (eztorch: 0.05)
  c.optim.betas = (0.9, 0.999)
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0        # eztorch gradient_clip_val
  c.optim.warmup_epochs = 40     # MoCo v3

  sce_config.imagenet(c, arg.multicrop)

  # MoCo v3's ViT linear protocol (CONFIG.md, main_lincls.py -a vit_small --lr=3): SGD momentum
  # 0.9, lr 3 x batch / 256 (12 at batch 1024), weight decay 0, cosine, 90 epochs; random
  # resized crop 224 and flip; tested at resize 256, centre crop 224 (docs/SCE.md 7).
  c.eval.linear.update(epochs=90, batch_size=1024, base_lr=3.0, scale_lr=True,
                       schedule="cosine", weight_decay=0.0, momentum=0.9)
  methods.apply_recipe(c, arg.method, "imagenet_vit")
  c.lock()
  return c
