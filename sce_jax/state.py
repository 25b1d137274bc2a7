"""The training state as one pytree (docs/SCE.md section 3), and its initialisation."""
from typing import Any

import flax
import jax
import jax.numpy as jnp

from sce_jax import methods, sharding

# sce.target_init: a copy of the online weights (eztorch), or an independent random init (the
# WACV code); docs/SCE.md section 3.
TARGET_INITS = ("copy", "random")
# init.heads, of a run started from existing weights (pretrained.py): the file's projector and
# predictor (where it has them), or the config's fresh init.
INIT_HEADS = ("fresh", "keep")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any               # online: trunk, projector, predictor, probe
  batch_stats: Any
  target_params: Any        # EMA of the online trunk and projector; {} without EMA target
  target_batch_stats: Any   # the target's own running BN statistics (not EMA'd, docs/SCE.md 3)
  opt_state: Any
  queue: Any               # (K, D) FIFO ring of target embeddings; a method's memory in its
                           # place (DINO's (D,) centre, methods.init_memory); None without
  queue_ptr: jax.Array
  rng: jax.Array


def init_state(config, online, target, tx, rng, image_size):
  """A fresh state. The target is a copy of the online trunk and projector, or (config
  sce.target_init='random') an independent random init like the authors' code allows."""
  init_rng, target_rng, queue_rng, rng = jax.random.split(rng, 4)
  x = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
  # A network without BatchNorm (a ViT with norm-free heads) has no batch_stats: an empty dict.
  # Stochastic depth draws from 'dropout' in training mode; init's draws are discarded.
  init = lambda model, key: {"batch_stats": {}, **model.init(
      {"params": key, "dropout": key}, x, train=True)}
  variables = init(online, init_rng)
  params, batch_stats = variables["params"], variables["batch_stats"]
  method = methods.get(config.method)
  if not method.EMA_TARGET:  # the online network embeds every view: no target
    t_vars = {"params": {}, "batch_stats": {}}
  elif config.sce.target_init == "copy":
    t_vars = {k: {n: v[n] for n in ("trunk", "projector") if n in v}
              for k, v in variables.items()}
  else:
    t_vars = init(target, target_rng)
  queue = methods.init_memory(method, config)
  if method.uses_queue(config):  # random unit vectors, as the reference
    queue = jax.random.normal(queue_rng, (config.sce.queue, config.model.projector.out_dim))
    queue = queue / jnp.linalg.norm(queue, axis=1, keepdims=True)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      target_params=jax.tree.map(jnp.copy, t_vars["params"]),
      target_batch_stats=jax.tree.map(jnp.copy, t_vars["batch_stats"]),
      opt_state=tx.init(params), queue=queue, queue_ptr=jnp.zeros((), jnp.int32), rng=rng)


def shardings(abstract, mesh, sharding_cfg):
  """Where each leaf of the TrainState `abstract` (of ShapeDtypeStructs) lives on `mesh`: all
  replicated, or with sharding_cfg.params='fsdp' the parameters, target parameters and
  optimiser state split over the data axis (`sharding.fsdp`, arrays of more than
  sharding_cfg.min_size_mib). BN statistics, queue, step and rng stay replicated: small, and
  read whole by every device."""
  replicated = sharding.replicated(mesh)
  out = jax.tree.map(lambda _: replicated, abstract)
  if sharding_cfg.params == "fsdp":
    split = lambda tree: sharding.fsdp(tree, mesh, sharding_cfg.min_size_mib * 2**20)
    out = out.replace(params=split(abstract.params), target_params=split(abstract.target_params),
                      opt_state=split(abstract.opt_state))
  return out
