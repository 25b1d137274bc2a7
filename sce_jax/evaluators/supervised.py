"""What the linear probe and fine-tuning share (docs/SCE.md 7, 9): the supervised step of a
classifier trained with cross-entropy on labelled crops, and the score of a linear head.

Sharded over the `data` mesh like pretraining: batches split over the devices, the state
replicated.
"""
import jax
import jax.numpy as jnp
import optax

from sce_jax import sharding
from sce_jax.evaluators import common


def make_step(apply_fn, tx, lr_fn, inputs_fn, mesh, key):
  """The jitted step(state, frozen, inputs, labels) -> (state, metrics).

  state: {'step', 'params', 'opt_state'}, and 'batch_stats' for a network whose BatchNorm
  trains (fine-tuning). inputs_fn(frozen, key, inputs) -> what the classifier takes, under
  stop-gradient (a frozen trunk's float32 features, or augmented crops), with a key folded from
  `key` and the step, so a resumed run draws what an uninterrupted one does; `frozen` (a frozen
  trunk's variables, or None) is an argument, not a closure, so that weights are not baked into
  the program. apply_fn(params, batch_stats, x) -> (logits, updated batch_stats). Metrics:
  loss, top1 (of the batch), lr.
  """

  def step(state, frozen, inputs, labels):
    count = state["step"] + 1
    x = jax.lax.stop_gradient(inputs_fn(frozen, jax.random.fold_in(key, count), inputs))

    def loss_fn(params):
      logits, batch_stats = apply_fn(params, state.get("batch_stats"), x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {"step": count, "params": optax.apply_updates(state["params"], updates),
           "opt_state": opt_state}
    if "batch_stats" in state:
      new["batch_stats"] = batch_stats
    top1 = jnp.mean(jnp.argmax(logits, -1) == labels)
    return new, {"loss": loss, "top1": top1, "lr": lr_fn(count - 1)}

  replicated, rows = sharding.replicated(mesh), sharding.rows(mesh)
  return jax.jit(step, in_shardings=(replicated, replicated, rows, rows),
                 out_shardings=replicated, donate_argnums=0)


def head_accuracy(head_params, feats, labels):
  """[top-1, top-5] of a linear head {'kernel', 'bias'} on float32 features (host arrays): the
  linear probe's, the fine-tuned network's and the online probe's held-out score. The head may
  be split over the devices of several processes (the online probe's, sharding.params=fsdp)."""
  head = jax.tree.map(sharding.to_host, head_params)
  return common.topk_accuracy(feats @ head["kernel"] + head["bias"], labels)
