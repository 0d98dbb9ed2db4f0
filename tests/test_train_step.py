"""The train step's loss weighting against HF torch: the original's mean of per-GPU micro-batch means
(docs/original_system.md §4) and our token mean, in loss value and gradient norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_tiny import hf_qwen2, our_config, state_dict_np
from oq2vl_jax.config import Config, OptimConfig, TrainConfig
from oq2vl_jax.models import build, flat_params, load_hf
from oq2vl_jax.train_step import make_steps, optimizer, split_params

MICRO, ROWS, T, GROUP = 2, 4, 16, 2


def _batch(seed=0):
    """[MICRO, ROWS, T] right-padded text rows of very different lengths (so weightings differ)."""
    rng = np.random.default_rng(seed)
    lengths = np.array([[16, 3, 9, 12], [5, 16, 4, 14]])
    ids = rng.integers(0, 100, (MICRO, ROWS, T)).astype(np.int32)
    real = np.arange(T)[None, None] < lengths[..., None]
    return {"input_ids": np.where(real, ids, 0), "segment_ids": real.astype(np.int32),
            "positions": np.where(real, np.arange(T), 0).astype(np.int32), "loss_mask": real.astype(np.int32)}


def _torch_reference(hf, batch, reduction):
    """The objective as the original computes it: HF's loss (token mean) per GPU micro-batch of GROUP
    rows, averaged over GPUs and divided by the accumulation steps; or the token mean of the step."""
    hf.zero_grad()
    ids = torch.from_numpy(batch["input_ids"]).long()
    labels = torch.where(torch.from_numpy(batch["loss_mask"]).bool(), ids, -100)
    if reduction == "micro_batch_mean":
        losses = [hf(input_ids=ids[m, g:g + GROUP], labels=labels[m, g:g + GROUP]).loss
                  for m in range(MICRO) for g in range(0, ROWS, GROUP)]
        loss = torch.stack(losses).mean()  # = sum over micro-batches of (mean over GPUs) / MICRO
    else:
        logits = hf(input_ids=ids.reshape(MICRO * ROWS, T)).logits[:, :-1]
        target = labels.reshape(MICRO * ROWS, T)[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in hf.parameters() if p.grad is not None))
    return loss.item(), norm.item()


@pytest.mark.parametrize("reduction", ["micro_batch_mean", "tokens"])
def test_loss_weighting_equals_torch(reduction):
    hf = hf_qwen2()
    model_cfg = our_config(hf_text=hf)
    cfg = Config(model=model_cfg, optim=OptimConfig(freeze=(r"^vision_tower\.", r"^multi_modal_projector\.")),
                 train=TrainConfig(steps=10, micro_batches=MICRO, loss_reduction=reduction, loss_group_rows=GROUP))
    model = build(model_cfg)
    load_hf(model, language_model=state_dict_np(hf))
    trainable, frozen = split_params(flat_params(model), cfg)
    tx = optimizer(cfg, trainable)
    state = {"step": jnp.int32(0), "params": trainable, "frozen": frozen, "opt_state": tx.init(trainable)}
    train_step, _ = make_steps(nnx.graphdef(model), cfg, tx)
    batch = _batch()
    _, metrics = jax.jit(train_step)(state, {k: jnp.asarray(v) for k, v in batch.items()})

    ref_loss, ref_norm = _torch_reference(hf, batch, reduction)
    np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), ref_norm, rtol=1e-4)
    other_loss, _ = _torch_reference(hf, batch, "tokens" if reduction != "tokens" else "micro_batch_mean")
    # The other weighting is off by far more than the tolerance here, so the check above can fail.
    assert abs(other_loss - ref_loss) > 10 * 1e-5 * abs(ref_loss)
