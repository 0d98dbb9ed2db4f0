"""Optimiser pieces: the schedule against HF's, decay masking, freezing, per-path LR multipliers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup

from hf_tiny import our_config
from oq2vl_jax.checkpoint import flatten, nest
from oq2vl_jax.config import Config, OptimConfig, TrainConfig
from oq2vl_jax.models import build_abstract, flat_params
from oq2vl_jax.optim import lr_schedule, make_optimizer
from oq2vl_jax.train_step import optimizer, split_params


def test_schedule_matches_hf_cosine_with_warmup():
    steps, cfg = 200, OptimConfig(lr=5e-5, warmup_ratio=0.03)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = get_cosine_schedule_with_warmup(opt, int(0.03 * steps), steps)
    hf = []
    for _ in range(steps):
        hf.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = np.array([float(lr_schedule(cfg, steps)(s)) for s in range(steps)])
    np.testing.assert_allclose(ours, hf, rtol=1e-5, atol=1e-12)


def test_continued_schedule_does_not_rewarm():
    full = lr_schedule(OptimConfig(lr=1.0, warmup_ratio=0.1), 100)
    tail = lr_schedule(OptimConfig(lr=1.0, warmup_ratio=0.1, schedule_offset=60, schedule_steps=100), 40)
    np.testing.assert_allclose([float(tail(s)) for s in range(40)], [float(full(60 + s)) for s in range(40)],
                               rtol=1e-6)


def _params():
    return {("a", "kernel"): jnp.ones((2, 2)), ("a", "bias"): jnp.ones(2), ("n", "scale"): jnp.ones(2)}


def _one_update(cfg: OptimConfig):
    params = _params()
    unflatten = lambda f: nest(f, str_keys=False)  # noqa: E731
    tx = make_optimizer(cfg, params, unflatten, run_steps=10)
    tree = unflatten(params)
    zero = jax.tree.map(jnp.zeros_like, tree)
    updates, _ = tx.update(zero, tx.init(tree), tree)  # zero gradient: only decay moves parameters
    return flatten(updates)


def test_decay_only_on_matrices_and_switch_reproduces_no_decay():
    cfg = OptimConfig(lr=1.0, warmup_ratio=0.0, weight_decay=0.1)
    up = _one_update(cfg)
    assert float(jnp.abs(up[("a", "kernel")]).max()) > 0
    assert float(jnp.abs(up[("a", "bias")]).max()) == 0 and float(jnp.abs(up[("n", "scale")]).max()) == 0
    none = _one_update(dataclasses.replace(cfg, weight_decay_mode="none"))
    assert all(float(jnp.abs(v).max()) == 0 for v in none.values())


def test_lr_multipliers_scale_matching_paths():
    cfg = OptimConfig(lr=1.0, warmup_ratio=0.0, weight_decay=0.1, lr_multipliers=((r"^a\.kernel$", 3.0),))
    base = _one_update(dataclasses.replace(cfg, lr_multipliers=()))
    scaled = _one_update(cfg)
    np.testing.assert_allclose(scaled[("a", "kernel")], 3.0 * base[("a", "kernel")])


def test_frozen_tower_has_no_optimizer_state():
    cfg = Config(model=our_config(), train=TrainConfig(steps=10))
    _, abstract = build_abstract(cfg.model)
    trainable, frozen = split_params(flat_params(abstract), cfg)
    assert set(frozen) == {"vision_tower"} and "vision_tower" not in trainable
    opt_state = jax.eval_shape(optimizer(cfg, trainable).init, trainable)
    paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(opt_state)}
    assert paths and not any("vision_tower" in p for p in paths)
    assert any("multi_modal_projector" in p for p in paths)
    n_moments = sum(np.prod(x.shape) for x in jax.tree.leaves(opt_state))
    n_train = sum(np.prod(x.shape) for x in jax.tree.leaves(trainable))
    assert n_moments >= 2 * n_train  # Adam mu and nu for every trainable parameter
