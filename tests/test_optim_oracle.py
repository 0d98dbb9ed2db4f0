"""Our optimiser's parameter updates against torch: AdamW (no decay on biases and norms, by param
groups), clip_grad_norm_ and transformers' get_cosine_schedule_with_warmup, step by step."""

from __future__ import annotations

import jax
import numpy as np
import optax
import torch
from transformers import get_cosine_schedule_with_warmup

from hf_tiny import our_config
from oq2vl_jax.config import Config, OptimConfig, TrainConfig
from oq2vl_jax.models import build_abstract, flat_params
from oq2vl_jax.train_step import optimizer, split_params
from oq2vl_jax.treepaths import dotted, flatten

RUN_STEPS, CLIP = 5, 1.0
# Gradient norms per step: only the third step is above CLIP, and by far, so whether it is clipped
# changes every later Adam moment.
GRAD_NORMS = (0.3, 0.6, 40.0, 0.8)
OPTIM = OptimConfig(lr=1e-2, warmup_ratio=0.4, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1,
                    clip_grad_norm=CLIP)  # warmup 2 steps: lr 0, lr/2, then cosine


def _no_decay(name: str) -> bool:
    """The usual HF Trainer grouping: biases and norm weights are not decayed."""
    return name.endswith(".bias") or "norm" in name


def _gradients(params: dict, seed: int = 0) -> list[dict]:
    """Random gradients for every step, scaled to the global norms above."""
    rng = np.random.default_rng(seed)
    out = []
    for norm in GRAD_NORMS:
        g = {p: rng.normal(size=v.shape).astype(np.float32) for p, v in params.items()}
        scale = norm / np.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in g.values()))
        out.append({p: (x * scale).astype(np.float32) for p, x in g.items()})
    return out


def _torch_run(params: dict, grads: list[dict]) -> list[dict]:
    names = {p: dotted(p) for p in params}
    tp = {p: torch.nn.Parameter(torch.from_numpy(np.array(v))) for p, v in params.items()}
    groups = [{"params": [tp[p] for p in params if not _no_decay(names[p])], "weight_decay": OPTIM.weight_decay},
              {"params": [tp[p] for p in params if _no_decay(names[p])], "weight_decay": 0.0}]
    assert groups[0]["params"] and groups[1]["params"]
    opt = torch.optim.AdamW(groups, lr=OPTIM.lr, betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps)
    sched = get_cosine_schedule_with_warmup(opt, int(OPTIM.warmup_ratio * RUN_STEPS), RUN_STEPS)
    history = []
    for g in grads:
        for p, t in tp.items():
            t.grad = torch.from_numpy(g[p].copy())
        torch.nn.utils.clip_grad_norm_(list(tp.values()), CLIP)
        opt.step()
        sched.step()
        history.append({p: t.detach().numpy().copy() for p, t in tp.items()})
    return history


def _our_run(cfg: Config, trainable: dict, grads: list[dict]) -> list[dict]:
    tx = optimizer(cfg, trainable)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(params, opt_state, g):
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    history, params = [], trainable
    for g in grads:
        params, opt_state = step(params, opt_state, _nest_like(trainable, g))
        history.append({p: np.asarray(v) for p, v in flatten(params).items()})
    return history


def _nest_like(tree: dict, flat: dict) -> dict:
    paths = flatten(tree)
    assert set(paths) == set(flat)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), [flat[p] for p in paths])


def test_optimizer_steps_equal_torch_adamw_clip_grad_norm_and_cosine_schedule():
    cfg = Config(model=our_config(), optim=OPTIM, train=TrainConfig(steps=RUN_STEPS))
    _, abstract = build_abstract(cfg.model)
    rng = np.random.default_rng(1)
    values = {p: rng.normal(0, 0.5, a.shape).astype(np.float32) for p, a in flat_params(abstract).items()}
    trainable, _ = split_params(values, cfg)  # the model's real parameter shapes, tower frozen
    start = flatten(trainable)
    grads = _gradients(start)
    ours, ref = _our_run(cfg, trainable, grads), _torch_run(start, grads)
    for step, (o, r) in enumerate(zip(ours, ref)):
        for p in start:
            np.testing.assert_allclose(o[p], r[p], atol=1e-6, rtol=0, err_msg=f"step {step}: {dotted(p)}")
    # The steps moved every parameter by far more than the tolerance (lr 0 at the first step).
    moved = [max(float(np.abs(r[p] - start[p]).max()) for p in start) for r in ref]
    assert moved[0] == 0 and min(moved[1:]) > 1e-3
