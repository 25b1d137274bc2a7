"""The views of the published runs (docs/SCE.md section 6), one `ViewSpec` per crop.

A preset is the single description both input paths (tf.data and grain) and the accelerator
stage read: the host uses `size`, `scale`, `ratio`; the accelerator the probabilities and
strengths. The first `num_global` views of a preset are the global crops the target sees.
"""
import dataclasses

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2009, 0.1984, 0.2023)
# The authors' STL-10 values: CIFAR-10's mean with another std (docs/SCE.md 5, 6).
STL10_MEAN = CIFAR10_MEAN
STL10_STD = (0.2471, 0.2435, 0.2616)


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """One crop of a training example and the augmentations applied to it."""
  size: int
  scale: tuple[float, float] = (0.2, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: float = 0.5
  jitter: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  gray: float = 0.2
  blur: float = 0.0
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  blur_kernel: int = 23
  solarize: float = 0.0


def imagenet_two_crop(size=224):
  """BYOL-style asymmetric blur/solarize; no flip on view 2 in the published 2-crop run."""
  return (ViewSpec(size, blur=1.0, solarize=0.0),
          ViewSpec(size, blur=0.1, solarize=0.2, flip=0.0))


_LOCAL = ((192, (0.172, 0.86)), (160, (0.143, 0.715)),
          (128, (0.114, 0.571)), (96, (0.086, 0.429)))


def imagenet_multi_crop(size=224):
  """2 global crops + the 4 local crops of the multi-crop run (192, 160, 128, 96)."""
  return (ViewSpec(size, blur=1.0, solarize=0.0),
          ViewSpec(size, blur=0.1, solarize=0.2),
          *(ViewSpec(s, scale=sc, blur=0.5, solarize=0.2) for s, sc in _LOCAL))


def cifar(size=32):
  """View 0: weak (target): crop and flip only; view 1: strong (online)."""
  return (ViewSpec(size, jitter=0.0, gray=0.0),
          ViewSpec(size, saturation=0.4, blur=0.5))


# The other methods' views (docs/SCE.md "Other methods"): the ImageNet recipes of their authors'
# code, and solo-learn's CIFAR ones (scripts/pretrain/cifar/augmentations/*.yaml).
def moco_v2(size=224):
  """MoCo v2's aug+ (moco main_moco.py --aug-plus), the same for both views."""
  return (ViewSpec(size, saturation=0.4, blur=0.5),) * 2


def simclr(size=224):
  """SimCLR's colour strength 1.0 (jitter 0.8, 0.8, 0.8, 0.2), crops of scale 0.08-1, blur
  p 0.5, both views; also solo-learn's CIFAR symmetric.yaml."""
  return (ViewSpec(size, scale=(0.08, 1.0), brightness=0.8, contrast=0.8, saturation=0.8,
                   hue=0.2, blur=0.5),) * 2


def byol(size=224):
  """BYOL's asymmetric pair (deepmind-research byol/utils/augmentations.py): crops of scale
  0.08-1, blur 1.0 / 0.1, solarize 0 / 0.2, flips on both."""
  return (ViewSpec(size, scale=(0.08, 1.0), blur=1.0),
          ViewSpec(size, scale=(0.08, 1.0), blur=0.1, solarize=0.2))


def moco_v3(size=224):
  """MoCo v3's ResNet views (moco-v3 main_moco.py augmentation1 / 2, BYOL's pair, with
  CONFIG.md's --crop-min=.2): `byol` with crops of scale 0.2-1."""
  return (ViewSpec(size, blur=1.0), ViewSpec(size, blur=0.1, solarize=0.2))


def cifar_moco_v2(size=32):
  """solo-learn's symmetric_weak.yaml (MoCo v2+): MoCo v2's aug+ with crops of scale 0.08-1."""
  return (ViewSpec(size, scale=(0.08, 1.0), saturation=0.4, blur=0.5),) * 2


def cifar_byol(size=32):
  """solo-learn's asymmetric.yaml (BYOL): BYOL's pair without blur."""
  return (ViewSpec(size, scale=(0.08, 1.0)), ViewSpec(size, scale=(0.08, 1.0), solarize=0.2))


def cifar_ressl(size=32):
  """solo-learn's ressl.yaml, the weak (target) view first: crops of scale 0.08-1; the strong
  view's jitter has saturation 0.2 (ReSSL's own ImageNet views are `cifar`'s at 224)."""
  return (ViewSpec(size, scale=(0.08, 1.0), jitter=0.0, gray=0.0),
          ViewSpec(size, scale=(0.08, 1.0), blur=0.5))


PRESETS = {
    "imagenet_two_crop": imagenet_two_crop,
    "imagenet_multi_crop": imagenet_multi_crop,
    "cifar": cifar,
    "moco_v2": moco_v2,
    "simclr": simclr,
    "byol": byol,
    "moco_v3": moco_v3,
    "cifar_moco_v2": cifar_moco_v2,
    "cifar_byol": cifar_byol,
    "cifar_ressl": cifar_ressl,
}


def get(name: str, size: int) -> tuple[ViewSpec, ...]:
  """Views of preset `name` with global crops of `size` pixels."""
  return PRESETS[name](size)
