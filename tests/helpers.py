"""Shared test helpers: load a config file the way the command line does; check that an
evaluation run resumes exactly; a NumPy ViT."""
import pathlib

import numpy as np
import pytest
import scipy.special

from sce_jax import metrics, preemption
from sce_jax import config as sce_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name, arg=None):
  """configs/<name>.py:get_config(arg) through `config.load`, unlocked so tests can reshape it."""
  config = sce_config.load(f"{CONFIGS / name}.py" + (f":{arg}" if arg else ""))
  config.unlock()
  return config


def resumes_exactly(evaluate, rundir, prefix, tmp_path, monkeypatch):
  """evaluate(workdir) -> results, a `loop.Run` in workdir/rundir: run whole in tmp_path/whole,
  and in tmp_path/split preempted at step 2 (it saves and raises Preempted) then run again.
  Asserts both give the same results and log the same `prefix` metrics step for step
  (throughput and ETA differ); returns (results, {step: those metrics})."""
  whole = evaluate(tmp_path / "whole")
  with monkeypatch.context() as patch:
    patch.setattr(preemption.Preemption, "reached", lambda self, mngr, step: step == 2)
    with pytest.raises(preemption.Preempted, match=f"saved step 2 to .*split/{rundir}"):
      evaluate(tmp_path / "split")
  assert evaluate(tmp_path / "split") == whole
  logged = {run: {step: {k: v for k, v in record.items() if k.startswith(prefix)}
                  for step, record in metrics.read(tmp_path / run / rundir).items()}
            for run in ("whole", "split")}
  assert logged["whole"] == logged["split"]
  return whole, logged["whole"]


def np_vit(sd, x_nhwc, num_heads, pool="cls"):
  """A float64 NumPy statement of timm's VisionTransformer forward up to the feature, from a
  timm-layout state dict: patch projection (a p x p, stride-p convolution with a bias), the
  class token, the position table added (for the table's own grid), pre-norm blocks of
  LayerNorm (eps 1e-6, biased variance), multi-head attention (qkv rows split as (3, heads,
  D / heads), softmax of q k^T / sqrt(D / heads)), the exact erf GELU, the final LayerNorm;
  the class token's output, or the mean of the patch tokens ('mean')."""
  g = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  width, _, p, _ = g["patch_embed.proj.weight"].shape
  n, h, w, _ = x_nhwc.shape
  patches = x_nhwc.astype(np.float64).reshape(n, h // p, p, w // p, p, 3)
  patches = patches.transpose(0, 1, 3, 5, 2, 4).reshape(n, -1, 3 * p * p)  # (c, ky, kx) order
  x = patches @ g["patch_embed.proj.weight"].reshape(width, -1).T + g["patch_embed.proj.bias"]
  x = np.concatenate([np.broadcast_to(g["cls_token"], (n, 1, width)), x], axis=1)
  x = x + g["pos_embed"]

  def layer_norm(x, key):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * g[f"{key}.weight"] + g[f"{key}.bias"]

  linear = lambda x, key: x @ g[f"{key}.weight"].T + g[f"{key}.bias"]
  depth = len({k.split(".")[1] for k in g if k.startswith("blocks.")})
  hd = width // num_heads
  for i in range(depth):
    b = f"blocks.{i}"
    qkv = linear(layer_norm(x, f"{b}.norm1"), f"{b}.attn.qkv")
    q, k, v = qkv.reshape(n, -1, 3, num_heads, hd).transpose(2, 0, 3, 1, 4)  # (n, heads, t, hd)
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn = attn / attn.sum(-1, keepdims=True)
    y = (attn @ v).transpose(0, 2, 1, 3).reshape(n, -1, width)
    x = x + linear(y, f"{b}.attn.proj")
    y = linear(layer_norm(x, f"{b}.norm2"), f"{b}.mlp.fc1")
    y = 0.5 * y * (1 + scipy.special.erf(y / np.sqrt(2)))
    x = x + linear(y, f"{b}.mlp.fc2")
  x = layer_norm(x, "norm")
  return x[:, 0] if pool == "cls" else x[:, 1:].mean(1)
