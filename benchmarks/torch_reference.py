"""The same SCE step in PyTorch, run as the authors' code runs it, for speed comparisons.

torchvision ResNets or timm ViTs (docs/SCE.md 10: fused scaled-dot-product attention, the position
table resampled for other crop sizes, frozen parameters as the config says) and the heads of
docs/SCE.md sections 4 and 10, the queue, the EMA target after the optimiser, LARS in the
authors' order (ImageNet), SGD (CIFAR) or AdamW without decay on norms, biases and the ViT's
tokens, with gradient clipping where the config has it; one forward pass per crop, or per run
of same-size crops with model.concat_views (eztorch's mutual_pass, the ViT configs),
shuffle-BN over 8 groups in the CIFAR target (section 3), the online linear probe; bf16
autocast (on a GPU; float32 on a CPU, where bf16 is emulated) and channels_last; eager, or with
the networks under torch.compile. Hyper-parameters
and shapes are read from the sce_jax configs of benchmarks/throughput.py's cases, so both
benchmarks time the same step. The crops are network-ready float tensors made on the device
beforehand: unlike the JAX step, no augmentation runs inside this one (the authors' code
augments in its data loaders). Timing rule as throughput.py: warm-up steps excluded (they hold
torch.compile's compilation), the median of --steps steps, each followed by a synchronisation.

Needs torch and torchvision, and timm for the ViT cases (pip install 'sce_jax[bench]'); the
library and its tests do not.

  python benchmarks/torch_reference.py --cases a,c,d --mode eager,compile --json torch.json
  python benchmarks/torch_reference.py --smoke   # tiny shapes, any CPU
"""
import argparse
import copy
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Configs only: JAX must not take the GPU.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import throughput  # noqa: E402  pylint: disable=g-import-not-at-top
import torch  # noqa: E402
from sce_jax import optim, train_step  # noqa: E402
from sce_jax.models import trunks, vit  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402


def mlp(in_dim, cfg):
  """docs/SCE.md 4: hidden layers Linear (no bias) + BN + ReLU; the last Linear has a bias only
  without a BN after it; the last BN (ImageNet projector) has no affine parameters. Section 9:
  without norm, hidden layers Linear (with bias) + GELU."""
  layers, dim = [], in_dim
  bn = cfg.get("norm", "batch") == "batch"
  for _ in range(cfg.num_layers - 1):
    layers += [nn.Linear(dim, cfg.hidden_dim, bias=not bn),
               *([nn.BatchNorm1d(cfg.hidden_dim)] if bn else []),
               nn.ReLU(inplace=True) if cfg.get("activation", "relu") == "relu" else nn.GELU()]
    dim = cfg.hidden_dim
  layers.append(nn.Linear(dim, cfg.out_dim, bias=cfg.last_bias and not cfg.last_bn))
  if cfg.last_bn:
    layers.append(nn.BatchNorm1d(cfg.out_dim, affine=False))
  return nn.Sequential(*layers)


def timm_vit(model_cfg, image_size):
  """timm's VisionTransformer of the config's size, its table for `image_size` and resampled
  for other crops, the sin-cos table and the patch projection frozen as the config says."""
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  width, depth, heads = vit.dims(model_cfg.trunk, model_cfg.width, model_cfg.depth,
                                 model_cfg.num_heads)
  net = vision_transformer.VisionTransformer(
      img_size=image_size, patch_size=model_cfg.patch_size, embed_dim=width, depth=depth,
      num_heads=heads, num_classes=0, dynamic_img_size=True, fc_norm=False,
      global_pool="token" if model_cfg.pool == "cls" else "avg",
      drop_path_rate=model_cfg.drop_path)
  net.pos_embed.requires_grad_(model_cfg.pos_embed == "learned")
  net.patch_embed.requires_grad_(not model_cfg.freeze_patch_embed)
  return net, width


def torchvision_resnet(model_cfg, image_size):
  """torchvision ResNet without its classifier; the CIFAR stem is 3x3 stride 1, no max-pool."""
  del image_size
  net = getattr(torchvision.models, model_cfg.trunk)()
  if model_cfg.small_stem:
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
  dim = net.fc.in_features
  net.fc = nn.Identity()
  return net, dim


# Each trunk family's torch twin, by the torch layout its weights share (models/trunks.py).
TORCH_TRUNKS = {"timm": timm_vit, "torchvision": torchvision_resnet}


def trunk(model_cfg, image_size):
  """The torch trunk of config.model and its feature width."""
  return TORCH_TRUNKS[trunks.family(model_cfg).TORCH_LAYOUT](model_cfg, image_size)


class SplitBatchNorm(nn.BatchNorm2d):
  """MoCo's SplitBatchNorm2d (the authors' CIFAR target): statistics per group of the batch."""

  def __init__(self, bn, num_splits):
    super().__init__(bn.num_features)
    self.load_state_dict(bn.state_dict())
    self.num_splits = num_splits

  def forward(self, x):
    n, c, h, w = x.shape
    s = self.num_splits
    mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
    out = F.batch_norm(x.reshape(-1, c * s, h, w), mean, var, self.weight.repeat(s),
                       self.bias.repeat(s), True, self.momentum, self.eps).view(n, c, h, w)
    self.running_mean.copy_(mean.view(s, c).mean(0))
    self.running_var.copy_(var.view(s, c).mean(0))
    return out


def split_bn(module, num_splits):
  for name, child in module.named_children():
    if isinstance(child, nn.BatchNorm2d):
      setattr(module, name, SplitBatchNorm(child, num_splits))
    else:
      split_bn(child, num_splits)


class LARS(torch.optim.Optimizer):
  """The authors' LARS: buf = m * buf + trust * (g + wd * p); p -= lr * buf, with weight decay
  and the trust ratio only on tensors of more than one dimension (docs/SCE.md 5)."""

  def __init__(self, params, lr, weight_decay, momentum=0.9, trust_coefficient=1e-3):
    super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                  eta=trust_coefficient))

  @torch.no_grad()
  def step(self):
    for group in self.param_groups:
      for p in group["params"]:
        if p.grad is None:
          continue
        g = p.grad
        if p.ndim > 1:
          g = g.add(p, alpha=group["weight_decay"])
          p_norm, g_norm = torch.norm(p), torch.norm(g)
          trust = torch.where((p_norm > 0) & (g_norm > 0), group["eta"] * p_norm / g_norm, 1.0)
          g = g.mul(trust)
        buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        buf.mul_(group["momentum"]).add_(g)
        p.add_(buf, alpha=-group["lr"])


def sce_loss(q, z, queue, sce):
  """docs/SCE.md 1 with queue negatives and the authors' zero positive target logit."""
  sim_q = torch.cat([(q * z).sum(1, keepdim=True), q @ queue.T], 1) / sce.temp
  logits_z = torch.cat([torch.zeros_like(sim_q[:, :1]), z @ queue.T / sce.temp_m], 1)
  w = (1 - sce.coeff) * F.softmax(logits_z, 1)
  w[:, 0] += sce.coeff
  return -(w * F.log_softmax(sim_q, 1)).sum(1).mean()


class Step:
  """One SCE training step on the crops of a batch, online and target kept here."""

  def __init__(self, config, sizes, dev, backend=None):
    m, sce = config.model, config.sce
    self.config, self.dev, self.sizes = config, dev, sizes
    body, dim = trunk(m, sizes[0])
    self.online = nn.ModuleDict({"trunk": body, "projector": mlp(dim, m.projector)})
    if m.predictor.num_layers > 0:
      self.online["predictor"] = mlp(m.projector.out_dim, m.predictor)
    self.online["probe"] = nn.Linear(dim, 1000)
    self.target = copy.deepcopy(nn.ModuleDict(
        {"trunk": self.online["trunk"], "projector": self.online["projector"]}))
    splits = config.sce.get("target_bn_splits", 0 if sce.symmetric else 8)
    if splits:
      split_bn(self.target["trunk"], splits)
    for net in (self.online, self.target):
      net.to(dev, memory_format=torch.channels_last).train()
    self.target.requires_grad_(False)
    online = dict(self.online.named_parameters())
    self.ema_pairs = ([p for p in self.target.parameters()],
                      [online[n] for n, _ in self.target.named_parameters()])
    self.queue = F.normalize(torch.randn(sce.queue, m.projector.out_dim, device=dev), dim=1)
    self.ptr = 0
    named = [(n, p) for n, p in self.online.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    self.clipped = [p for n, p in named if not n.startswith("probe.")]
    o = config.optim
    lr = o.base_lr * config.batch_size / 256
    if o.name == "adamw":  # eztorch's groups: no decay on norms, biases, optim.NO_DECAY.
      decay = lambda n, p: p.ndim > 1 and n.rsplit(".", 1)[-1] not in optim.NO_DECAY
      groups = [{"params": [p for n, p in named if decay(n, p)]},
                {"params": [p for n, p in named if not decay(n, p)], "weight_decay": 0.0}]
      self.opt = torch.optim.AdamW(groups, lr, betas=tuple(o.betas), eps=o.eps,
                                   weight_decay=o.weight_decay)
    elif o.name == "lars":
      self.opt = LARS(params, lr, o.weight_decay, o.momentum, o.trust_coefficient)
    else:
      self.opt = torch.optim.SGD(params, lr, momentum=o.momentum, weight_decay=o.weight_decay)
    self.online_fn, self.target_fn = self._online, self._target
    if backend:  # torch.compile's backend; None: eager. Shapes are fixed: no dynamic graphs.
      torch._dynamo.reset()  # pylint: disable=protected-access  # Forget earlier cases' graphs.
      self.online_fn = torch.compile(self._online, backend=backend, dynamic=False)
      self.target_fn = torch.compile(self._target, backend=backend, dynamic=False)
    self.pairs = [(i, j) for i in range(sce.num_global) for j in range(len(sizes))
                  if j != i] if sce.symmetric else [(0, j) for j in range(1, len(sizes))]

  def _online(self, x):
    feat = self.online["trunk"](x)
    proj = self.online["projector"](feat)
    pred = self.online["predictor"](proj) if "predictor" in self.online else proj
    return F.normalize(pred.float(), dim=1), self.online["probe"](feat.detach())

  def _target(self, x):
    splits = self.config.sce.get("target_bn_splits", 0 if self.config.sce.symmetric else 8)
    if splits:  # Shuffle-BN: shuffled into groups, embedded, put back in order.
      order = torch.randperm(x.shape[0], device=x.device)
      z = self.target["projector"](self.target["trunk"](x[order]))
      return F.normalize(z.float(), dim=1)[torch.argsort(order)]
    return F.normalize(self.target["projector"](self.target["trunk"](x)).float(), dim=1)

  def _passes(self, fn, views, indices):
    """fn on each view, or with model.concat_views once per run of same-size views (the JAX
    step's grouping), its outputs split back per view."""
    out = {}
    passes = train_step._passes  # pylint: disable=protected-access
    for group in passes(views, indices, self.config.model.concat_views):
      y = fn(torch.cat([views[i] for i in group]))
      parts = [t.chunk(len(group)) for t in (y if isinstance(y, tuple) else (y,))]
      for k, i in enumerate(group):
        out[i] = tuple(p[k] for p in parts) if isinstance(y, tuple) else parts[0][k]
    return out

  def __call__(self, views, labels):
    sce = self.config.sce
    targets = sorted({i for i, _ in self.pairs})
    with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.dev.type == "cuda"):
      with torch.no_grad():
        zs = self._passes(self.target_fn, views, targets)
      outs = self._passes(self.online_fn, views, sorted({j for _, j in self.pairs}))
      loss = sum(sce_loss(outs[j][0], zs[i], self.queue, sce) for i, j in self.pairs)
      loss = loss / len(self.pairs)
      probed = [j for j in outs if self.sizes[j] == self.sizes[min(outs)]]
      probe = F.cross_entropy(torch.cat([outs[j][1] for j in probed]).float(),
                              labels.repeat(len(probed)))
    self.opt.zero_grad(set_to_none=True)
    (loss + probe).backward()
    if self.config.optim.get("clip_norm", 0) > 0:
      torch.nn.utils.clip_grad_norm_(self.clipped, self.config.optim.clip_norm)
    self.opt.step()
    with torch.no_grad():  # EMA at m0: the schedule's value does not change the cost.
      t_params, o_params = self.ema_pairs
      torch._foreach_mul_(t_params, sce.m0)  # pylint: disable=protected-access
      torch._foreach_add_(t_params, o_params, alpha=1 - sce.m0)  # pylint: disable=protected-access
      keys = torch.cat([zs[i] for i in targets])
      self.queue[self.ptr:self.ptr + keys.shape[0]] = keys
      self.ptr = (self.ptr + keys.shape[0]) % self.queue.shape[0]
    return loss


def _sync(dev):
  if dev.type == "cuda":
    torch.cuda.synchronize()


def measure(key, mode, *, steps, warmup, small, dev, backend="inductor"):
  case = throughput.smoke(throughput.CASES[key]) if small else throughput.CASES[key]
  devices = max(torch.cuda.device_count(), 1) if dev.type == "cuda" else 1
  config, views = throughput.case_config(case, small, devices=devices)
  sizes = [v.size for v in views]
  step = Step(config, sizes, dev, backend if mode == "compile" else None)
  n = config.batch_size
  crops = [torch.randn(n, 3, s, s, device=dev).contiguous(memory_format=torch.channels_last)
           for s in sizes]
  labels = torch.randint(0, 1000, (n,), device=dev)
  start = time.perf_counter()
  for _ in range(warmup):
    loss = step(crops, labels)
  _sync(dev)
  warmup_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    loss = step(crops, labels)
    _sync(dev)
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  return {"key": key, "case": case.name, "mode": mode, "batch": n, "views": sizes,
          "backend": backend if mode == "compile" else None,
          "warmup_s": round(warmup_s, 2), "step_ms": step_s * 1e3, "steps_per_s": 1 / step_s,
          "images_per_s": n / step_s, "loss": float(loss.detach()), "timed_steps": steps}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="a,c,d", help="comma-separated: a, b, c, d, e")
  parser.add_argument("--mode", default="eager,compile", help="eager, compile or both")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--backend", default="inductor", help="torch.compile backend (the "
                      "CPU smoke uses aot_eager: traced, no code generation)")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
  parser.add_argument("--json", help="write the results here")
  args = parser.parse_args()
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  kind = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
  torch.backends.cudnn.benchmark = True
  print(f"torch {torch.__version__}, torchvision {torchvision.__version__} on {kind}")
  print("| case | mode | batch | warm-up s | step ms | steps/s | images/s |")
  print("|---|---|---|---|---|---|---|")
  rows = []
  for key in args.cases.split(","):
    for mode in args.mode.split(","):
      r = measure(key, mode, steps=args.steps, warmup=args.warmup, small=args.smoke, dev=dev,
                  backend=args.backend)
      rows.append(r)
      print(f"| ({key}) {r['case']} | {mode} | {r['batch']} | {r['warmup_s']:.0f} | "
            f"{r['step_ms']:.1f} | {r['steps_per_s']:.2f} | {r['images_per_s']:.0f} |", flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        {"device_kind": kind, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
  main()
