"""Optimiser: freezing by parameter path, AdamW with a decay mask, clipping, warmup + cosine.

Parameters are handled as flat {path tuple: array} maps while deciding per-parameter settings, with
paths matched as dotted strings ("language_model.model.layers.0.mlp.up_proj.kernel").
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from oq2vl_jax.config import OptimConfig
from oq2vl_jax.treepaths import dotted


def is_frozen(path: tuple, cfg: OptimConfig) -> bool:
    s = dotted(path)
    return any(re.search(rx, s) for rx in cfg.freeze)


def lr_schedule(cfg: OptimConfig, run_steps: int):
    """Linear warmup then cosine to lr * final_lr_ratio, as HF get_cosine_schedule_with_warmup.

    With schedule_offset/schedule_steps, the run continues a longer curve at the given step instead
    of re-warming (the second paper's continued-training setting).
    """
    total = cfg.schedule_steps or run_steps
    warmup = int(cfg.warmup_ratio * total)
    peak, final = cfg.lr, cfg.lr * cfg.final_lr_ratio

    def schedule(step):
        s = jnp.asarray(step, jnp.float32) + cfg.schedule_offset
        warm = peak * s / max(warmup, 1)
        progress = jnp.clip((s - warmup) / max(total - warmup, 1), 0.0, 1.0)
        cosine = final + (peak - final) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(s < warmup, warm, cosine)

    return schedule


def _decays(path: tuple, value) -> bool:
    """Decay matrices only: not norms (`scale`), biases, or other 1-D parameters."""
    return value.ndim > 1 and path[-1] not in ("bias", "scale")


def _scale_by_tree(multipliers):
    """Multiplies each update by a fixed per-parameter factor (per-path learning-rate multipliers)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg: OptimConfig, params: Mapping, unflatten, run_steps: int) -> optax.GradientTransformation:
    """AdamW for the trainable `params` (a flat {path: array-like}); `unflatten` turns a flat map into
    the pytree layout the optimiser will see."""
    wd = cfg.weight_decay if cfg.weight_decay_mode == "masked" else 0.0
    mask = unflatten({p: _decays(p, v) for p, v in params.items()})
    chain = [
        optax.clip_by_global_norm(cfg.clip_grad_norm) if cfg.clip_grad_norm > 0 else optax.identity(),
        optax.adamw(lr_schedule(cfg, run_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=mask),
    ]
    if cfg.lr_multipliers:
        mults = {}
        for p in params:
            m = 1.0
            for rx, factor in cfg.lr_multipliers:
                if re.search(rx, dotted(p)):
                    m = factor
            mults[p] = m
        chain.append(_scale_by_tree(unflatten(mults)))
    return optax.chain(*chain)
