"""The training state and the pure, jitted `train_step(state, batch) -> (state, metrics)`.

State (a plain pytree, saved as is by Orbax):
  step       int32 scalar, optimiser steps taken
  params     trainable parameters, nested dict (list indices as int keys, the form nnx.merge takes)
  frozen     frozen parameters (e.g. the vision tower): no gradient, no optimiser state
  opt_state  optax state of `params`

A batch holds the arrays of one optimiser step with a leading micro-batch axis:
[micro_batches, rows, ...]; rows are sharded over the data and fsdp mesh axes. Gradients are summed
over the micro-batches in a `lax.scan`, so memory is that of one micro-batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from oq2vl_jax.checkpoint import flatten, nest
from oq2vl_jax.config import Config
from oq2vl_jax.optim import is_frozen, lr_schedule, make_optimizer
from oq2vl_jax.sharding import logical_to_spec


def split_params(flat: dict, cfg: Config) -> tuple[dict, dict]:
    """Flat {path: array} -> (trainable, frozen) nested dicts."""
    trainable = {p: v for p, v in flat.items() if not is_frozen(p, cfg.optim)}
    frozen = {p: v for p, v in flat.items() if is_frozen(p, cfg.optim)}
    if not trainable:
        raise ValueError(f"optim.freeze={cfg.optim.freeze} freezes every parameter")
    return nest(trainable, str_keys=False), nest(frozen, str_keys=False)


def all_params(state: dict) -> dict:
    """The whole model's parameters (trainable and frozen) as one nested dict."""
    return nest({**flatten(state["params"]), **flatten(state["frozen"])}, str_keys=False)


def optimizer(cfg: Config, trainable: dict) -> optax.GradientTransformation:
    return make_optimizer(cfg.optim, flatten(trainable), lambda f: nest(f, str_keys=False), cfg.train.steps)


def state_shardings(abstract_state: dict, param_shardings_flat: dict, tx, mesh) -> dict:
    """Shardings of the whole state: parameters by the logical rules, optimiser moments like their
    parameters, scalars replicated."""
    replicated = NamedSharding(mesh, P())

    def pick(tree):
        return nest({p: param_shardings_flat[p] for p in flatten(tree)}, str_keys=False)

    params_sh = pick(abstract_state["params"])
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, abstract_state["opt_state"], params_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
    opt_sh = jax.tree.map(lambda x: replicated if isinstance(x, optax.MaskedNode) else x, opt_sh,
                          is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return {"step": replicated, "params": params_sh, "frozen": pick(abstract_state["frozen"]), "opt_state": opt_sh}


def batch_shardings(mesh, batch_example: dict, micro_axis: bool) -> dict:
    """Rows over (data, fsdp); a leading micro-batch axis, if any, replicated."""
    lead = (None,) if micro_axis else ()
    return {k: NamedSharding(mesh, logical_to_spec(lead + ("batch",) + (None,) * (v.ndim - 1 - len(lead))))
            for k, v in batch_example.items()}


MODEL_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask", "images",
              "patches", "patch_segment_ids", "patch_positions")  # the last three: model.arch qwen2_vl


def make_steps(graphdef, cfg: Config, tx):
    """(train_step, eval_step) as pure functions, to be jitted by the caller with shardings."""
    reduction = cfg.train.loss_reduction
    n_micro = cfg.train.micro_batches
    schedule = lr_schedule(cfg.optim, cfg.train.steps)

    group = cfg.train.loss_group_rows

    def row_losses(trainable, frozen, batch):
        model = nnx.merge(graphdef, nest({**flatten(trainable), **flatten(frozen)}, str_keys=False))
        return model.row_losses({k: batch[k] for k in MODEL_KEYS if k in batch})

    def objective(trainable, frozen, batch):
        sums, counts = row_losses(trainable, frozen, batch)
        total, count = jnp.sum(sums), jnp.sum(counts)
        if reduction == "tokens":  # normalised by the step's total target count afterwards
            return total, (total, count)
        g_sums, g_counts = sums.reshape(-1, group).sum(1), counts.reshape(-1, group).sum(1)
        return jnp.mean(g_sums / jnp.maximum(g_counts, 1.0)) / n_micro, (total, count)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def train_step(state, batch):
        def body(carry, micro):
            gsum, tsum, csum, osum = carry
            (obj, (total, count)), grads = grad_fn(state["params"], state["frozen"], micro)
            gsum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), gsum, grads)
            return (gsum, tsum + total, csum + count, osum + obj), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state["params"])
        init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
        (gsum, total, count, obj), _ = jax.lax.scan(body, init, batch)
        if reduction == "tokens":
            grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), gsum)
            loss = total / jnp.maximum(count, 1.0)
        else:
            grads, loss = gsum, obj
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"]),
                   "target_tokens": count, "tokens": jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32)}
        new_state = {"step": state["step"] + 1, "params": params, "frozen": state["frozen"], "opt_state": opt_state}
        return new_state, metrics

    def eval_step(state, batch):
        sums, counts = row_losses(state["params"], state["frozen"], batch)
        return {"loss_sum": jnp.sum(sums), "target_tokens": jnp.sum(counts)}

    return train_step, eval_step
