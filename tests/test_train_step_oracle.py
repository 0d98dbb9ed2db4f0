"""One real train step (two micro-batches of packed rows with images) against torch autograd on the
HF-built reference: every parameter's gradient, then every updated parameter after torch's
clip_grad_norm_ and AdamW (no decay on biases and norms), with the tower frozen and trained."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from oq2vl_jax.config import Config, OptimConfig, TrainConfig
from oq2vl_jax.models import flat_params
from oq2vl_jax.models.weights import ours_to_hf
from oq2vl_jax.train_step import make_steps, optimizer, split_params
from oq2vl_jax.treepaths import flatten
from torch_vlm import TorchVLM, caption_sample, pack_row

IMAGE_SIZE, SIDE, SLOTS, ROW_LEN = 56, 2, 3, 40  # 4x4 patches pooled to 2x2 image tokens
K = SIDE * SIDE
# Clip well below the gradient norm so that the clipped update differs from the unclipped one.
OPTIM = dict(lr=1e-3, warmup_ratio=0.0, b1=0.85, b2=0.99, eps=1e-3, weight_decay=0.1, clip_grad_norm=0.25)


def _micro_batches(seed=0):
    """[micro=2, rows=2] packed rows: captions with 0-2 images and text-only samples, padded."""
    rng = np.random.default_rng(seed)
    plan = [[[(1, 6), (0, 5), (1, 3)], [(2, 4), (0, 9)]], [[(0, 12), (1, 8)], [(0, 4), (0, 6), (1, 2)]]]
    rows, samples = [], []
    for micro in plan:
        for row in micro:
            ss = [caption_sample(rng, n, t, K) for n, t in row]
            ims = [rng.uniform(-1, 1, (n, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32) for n, _ in row]
            rows.append(pack_row(ss, ims, ROW_LEN, SLOTS))
            samples += list(zip(ss, ims))
    batch = {k: np.stack([r[k] for r in rows]).reshape((2, 2) + rows[0][k].shape) for k in rows[0]}
    return batch, samples


def _capture_grads():
    """An optax stage that keeps the gradients it is given in its state (and passes them on)."""
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda updates, state, params=None: (updates, updates))


def _our_step(ref: TorchVLM, cfg: Config, batch: dict):
    model = ref.ours()
    trainable, frozen = split_params(flat_params(model), cfg)
    tx = optax.chain(_capture_grads(), optimizer(cfg, trainable))
    state = {"step": jnp.int32(0), "params": trainable, "frozen": frozen, "opt_state": tx.init(trainable)}
    train_step, _ = make_steps(nnx.graphdef(model), cfg, tx)
    new, metrics = jax.jit(train_step)(state, {k: jnp.asarray(v) for k, v in batch.items()})
    grads = {p: np.asarray(g) for p, g in flatten(new["opt_state"][0]).items()}
    params = {p: np.asarray(v) for p, v in flatten(new["params"]).items()}
    return grads, params, metrics


def _torch_step(ref: TorchVLM, samples, train_tower: bool):
    """Token-mean loss over every sample of the step, its gradients, then one clipped AdamW step."""
    named = {c: ps for c, ps in ref.parameters_by_component().items() if train_tower or c != "vision_tower"}
    for p in ref.vision.parameters():
        p.requires_grad_(train_tower)
    total, count = 0.0, 0
    for (ids, loss), images in samples:
        s, c = ref.loss_sum(ids, loss, images)
        total, count = total + s, count + c
    (total / count).backward()
    grads = {(c, k): (p.grad.numpy().copy() if p.grad is not None else np.zeros(p.shape, np.float32))
             for c, ps in named.items() for k, p in ps.items()}
    params = [p for ps in named.values() for p in ps.values()]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    no_decay = {id(p) for ps in named.values() for k, p in ps.items() if k.endswith("bias") or "norm" in k}
    groups = [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": OPTIM["weight_decay"]},
              {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
    norm = float(torch.nn.utils.clip_grad_norm_(params, OPTIM["clip_grad_norm"]))
    opt = torch.optim.AdamW(groups, lr=OPTIM["lr"], betas=(OPTIM["b1"], OPTIM["b2"]), eps=OPTIM["eps"])
    opt.step()  # get_cosine_schedule_with_warmup without warmup: lr is the peak at step 0
    new = {(c, k): p.detach().numpy().copy() for c, ps in named.items() for k, p in ps.items()}
    return grads, new, norm


def _hf_keyed(component_arrays: dict) -> dict:
    """Our flat {path: array} -> {(component, HF key): array in the HF layout}."""
    out = {}
    for component in ("vision_tower", "multi_modal_projector", "language_model"):
        part = {p: v for p, v in component_arrays.items() if p[0] == component}
        out.update({(component, k): v for k, v in ours_to_hf(component, part).items()})
    return out


@pytest.mark.parametrize("train_tower", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_train_step_gradients_and_update_equal_torch(train_tower):
    freeze = () if train_tower else (r"^vision_tower\.",)
    ref = TorchVLM(IMAGE_SIZE, SIDE)
    cfg = Config(model=ref.ours().cfg, optim=OptimConfig(freeze=freeze, **OPTIM),
                 train=TrainConfig(steps=10, micro_batches=2, loss_reduction="tokens"))
    batch, samples = _micro_batches()
    grads, params, metrics = _our_step(ref, cfg, batch)
    ref_grads, ref_params, ref_norm = _torch_step(ref, samples, train_tower)

    grads, params = _hf_keyed(grads), _hf_keyed(params)
    assert set(grads) == set(ref_grads)
    trained = {"multi_modal_projector", "language_model"} | ({"vision_tower"} if train_tower else set())
    assert {c for c, _ in grads} == trained
    scale = max(float(np.abs(g).max()) for g in ref_grads.values())
    for key, g in ref_grads.items():
        np.testing.assert_allclose(grads[key], g, rtol=1e-4, atol=1e-6 * scale, err_msg=f"gradient of {key}")
    np.testing.assert_allclose(float(metrics["grad_norm"]), ref_norm, rtol=1e-5)
    assert ref_norm > 4 * OPTIM["clip_grad_norm"]  # the step was clipped
    for key, p in ref_params.items():
        np.testing.assert_allclose(params[key], p, rtol=0, atol=1e-6, err_msg=f"updated {key}")
    # Image tokens reached the projector (and the tower when trained): real, non-zero gradients.
    assert np.abs(ref_grads[("multi_modal_projector", "linear_1.weight")]).max() > 1e-4
    if train_tower:
        assert np.abs(ref_grads[("vision_tower", "embeddings.patch_embedding.weight")]).max() > 1e-6
