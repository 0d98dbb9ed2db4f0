"""Pooling, splicing, packing and loss of the whole VLM against a HF torch reference at float32.

The torch reference is the original's forward written with HF modules: SiglipVisionModel
hidden_states[-2] -> torch adaptive_avg_pool2d -> Linear/GELU/Linear -> spliced into the inputs_embeds
of Qwen2ForCausalLM, which computes logits and its own loss.
"""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_tiny import IMAGE_TOKEN_ID, hf_qwen2, hf_siglip, our_config, state_dict_np
from oq2vl_jax.models import build, load_hf
from oq2vl_jax.models.projector import adaptive_avg_pool

TOL = 1e-4
IMAGE_SIZE, SIDE = 70, 3  # a 5x5 patch grid pooled to 3x3: torch's overlapping bins [0,2) [1,4) [3,5)
K = SIDE * SIDE


@pytest.mark.parametrize("n,m", [(27, 12), (27, 27), (5, 3), (7, 4)])
def test_pool_matches_torch_adaptive_avg_pool2d(n, m):
    x = np.random.default_rng(0).normal(size=(2, n * n, 6)).astype(np.float32)
    ref = F.adaptive_avg_pool2d(torch.from_numpy(x).transpose(1, 2).reshape(2, 6, n, n), (m, m))
    ref = ref.reshape(2, 6, m * m).transpose(1, 2).numpy()
    np.testing.assert_allclose(np.asarray(adaptive_avg_pool(x, m)), ref, atol=1e-6, rtol=0)


def test_bf16_pool_is_unbiased():
    """bf16 features pool like torch's AdaptiveAvgPool2d on the same values (float32 accumulation),
    rounded once to bf16: no systematic scale from bf16 bin weights (1/3 is not a bf16 number)."""
    import jax.numpy as jnp

    x = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2.0, (2, 27 * 27, 8)), jnp.bfloat16)
    ours = np.asarray(adaptive_avg_pool(x, 12).astype(jnp.float32))
    xt = torch.from_numpy(np.asarray(x.astype(jnp.float32))).transpose(1, 2).reshape(2, 8, 27, 27)
    ref = F.adaptive_avg_pool2d(xt, (12, 12)).reshape(2, 8, 144).transpose(1, 2).bfloat16().float().numpy()
    np.testing.assert_allclose(ours, ref, rtol=2 ** -7)  # one bf16 ulp apart at most (rounding)
    assert abs(float(np.mean(ours / ref)) - 1) < 1e-4  # unbiased (bf16 weights gave 1.0039)
    assert float(adaptive_avg_pool(jnp.ones((1, 729, 4), jnp.bfloat16), 12).max()) == 1.0


class TorchVLM:
    """The reference forward; rows are lists of token ids, images in placeholder order."""

    def __init__(self, act="gelu"):
        self.vision = hf_siglip("gelu", image_size=IMAGE_SIZE)
        self.llm = hf_qwen2(tie=True, vocab_size=128)
        torch.manual_seed(3)
        self.proj = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))

    def image_embeds(self, images):
        with torch.no_grad():
            pix = torch.from_numpy(images).permute(0, 3, 1, 2)
            feats = self.vision(pixel_values=pix, output_hidden_states=True).hidden_states[-2]
            n, t, c = feats.shape
            g = int(t**0.5)
            pooled = F.adaptive_avg_pool2d(feats.transpose(1, 2).reshape(n, c, g, g), (SIDE, SIDE))
            return self.proj(pooled.reshape(n, c, K).transpose(1, 2))

    def __call__(self, ids, images, labels):
        with torch.no_grad():
            ids_t = torch.from_numpy(ids.astype(np.int64))[None]
            embeds = self.llm.model.embed_tokens(ids_t)
            if len(images):
                img = self.image_embeds(images).reshape(-1, 32)
                embeds[ids_t == IMAGE_TOKEN_ID] = img
            out = self.llm(inputs_embeds=embeds, labels=torch.from_numpy(labels.astype(np.int64))[None])
            return out.logits[0].numpy(), out.loss.item()

    def ours(self, **overrides):
        cfg = our_config(hf_vision=self.vision, hf_text=self.llm, image_tokens=K, **overrides)
        model = build(cfg)
        proj = {"linear_1.weight": self.proj[0].weight, "linear_1.bias": self.proj[0].bias,
                "linear_2.weight": self.proj[2].weight, "linear_2.bias": self.proj[2].bias}
        load_hf(model, vision_tower=state_dict_np(self.vision), language_model=state_dict_np(self.llm),
                multi_modal_projector={k: v.detach().numpy() for k, v in proj.items()})
        return model


def _sample(rng, n_images, n_text):
    """[bos, (K x img, newline)*, text..., eos] with loss on text only (the caption layout)."""
    ids, loss = [1], [1]
    for _ in range(n_images):
        ids += [IMAGE_TOKEN_ID] * K + [2]
        loss += [0] * K + [1]
    ids += list(rng.integers(3, 99, n_text)) + [99]
    loss += [1] * (n_text + 1)
    return np.array(ids, np.int32), np.array(loss, np.int32)


@pytest.fixture(scope="module")
def ref():
    return TorchVLM()


@pytest.fixture(scope="module")
def packed():
    """A row of 3 samples (1, 0 and 2 images) and padding, plus the pieces."""
    rng = np.random.default_rng(0)
    samples = [_sample(rng, 1, 7), _sample(rng, 0, 5), _sample(rng, 2, 4)]
    all_images = rng.uniform(-1, 1, (3, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    per_sample_images = [all_images[:1], all_images[:0], all_images[1:]]
    length = sum(len(s[0]) for s in samples) + 6
    ids = np.zeros(length, np.int32)
    seg, pos, loss = np.zeros_like(ids), np.zeros_like(ids), np.zeros_like(ids)
    start = 0
    for i, (s_ids, s_loss) in enumerate(samples):
        sl = slice(start, start + len(s_ids))
        ids[sl], seg[sl], pos[sl], loss[sl] = s_ids, i + 1, np.arange(len(s_ids)), s_loss
        start += len(s_ids)
    images = np.zeros((1, 4) + all_images.shape[1:], np.float32)  # 4 slots, 3 real
    images[0, :3] = all_images
    batch = dict(input_ids=ids[None], segment_ids=seg[None], positions=pos[None], loss_mask=loss[None], images=images)
    return samples, per_sample_images, batch


@pytest.mark.parametrize("chunk", [0, 5])
def test_vlm_single_sample_matches_torch(ref, chunk):
    rng = np.random.default_rng(5)
    ids, loss = _sample(rng, 2, 9)
    images = rng.uniform(-1, 1, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    labels = np.where(loss == 1, ids, -100)
    ref_logits, ref_loss = ref(ids, images, labels)
    model = ref.ours(loss_chunk_size=chunk)
    batch = dict(input_ids=ids[None], segment_ids=np.ones_like(ids)[None], positions=np.arange(len(ids))[None],
                 loss_mask=loss[None], images=images[None])
    logits = np.asarray(model(batch["input_ids"], batch["images"], batch["positions"], batch["segment_ids"]))[0]
    np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=0)
    total, count = model.loss(batch)
    np.testing.assert_allclose(float(total / count), ref_loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("vision_chunk_size", [0, 3])  # 3: the 4th, empty slot's chunk is skipped
def test_packed_row_equals_each_sample_alone(ref, packed, vision_chunk_size):
    samples, per_sample_images, batch = packed
    model = ref.ours(vision_chunk_size=vision_chunk_size)
    logits = np.asarray(model(batch["input_ids"], batch["images"], batch["positions"], batch["segment_ids"]))[0]
    start, total_loss, total_count = 0, 0.0, 0
    for (ids, loss), images in zip(samples, per_sample_images):
        ref_logits, ref_loss = ref(ids, images, np.where(loss == 1, ids, -100))
        np.testing.assert_allclose(logits[start:start + len(ids)], ref_logits, atol=TOL, rtol=0)
        n = int(loss[1:].sum())
        total_loss, total_count = total_loss + ref_loss * n, total_count + n
        start += len(ids)
    # The packed loss is the token-weighted mean of the per-sample losses (no cross-sample targets).
    s, c = model.loss(batch)
    assert int(c) == total_count
    np.testing.assert_allclose(float(s / c), total_loss / total_count, atol=1e-5, rtol=0)


def test_cross_segment_attention_equals_torch_on_whole_row(ref, packed):
    _, _, batch = packed
    model = ref.ours(cross_segment_attention=True)
    real = int((batch["segment_ids"][0] != 0).sum())
    ids, loss = batch["input_ids"][0][:real], batch["loss_mask"][0][:real]
    ref_logits, ref_loss = ref(ids, batch["images"][0][:3], np.where(loss == 1, ids, -100))
    logits = np.asarray(model(batch["input_ids"], batch["images"], batch["positions"], batch["segment_ids"]))[0]
    np.testing.assert_allclose(logits[:real], ref_logits, atol=TOL, rtol=0)
    s, c = model.loss(batch)  # the original also predicts each sample's <s> from the previous one
    np.testing.assert_allclose(float(s / c), ref_loss, atol=1e-5, rtol=0)


def test_config_validation():
    cfg = our_config()
    with pytest.raises(ValueError, match="not a square"):
        dataclasses.replace(cfg, image_tokens=10)
    with pytest.raises(ValueError, match="exceeds"):
        dataclasses.replace(cfg, image_tokens=25)


def test_chunked_loss_gradients_equal_unchunked(ref, packed):
    import jax
    from flax import nnx

    _, _, batch = packed
    grads = []
    for chunk in (0, 7):
        graphdef, state = nnx.split(ref.ours(loss_chunk_size=chunk))

        def loss(state):
            total, count = nnx.merge(graphdef, state).loss(batch)
            return total / count

        grads.append(jax.grad(loss)(state))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_uint8_images_are_normalised_on_device(ref, packed):
    _, _, batch = packed
    model = ref.ours()
    pixels = np.random.default_rng(0).integers(0, 256, batch["images"].shape).astype(np.uint8)
    as_float = pixels.astype(np.float32) * (2 / 255) - 1
    args = (batch["input_ids"], None, batch["positions"], batch["segment_ids"])
    out_u8 = model(args[0], pixels, *args[2:])
    out_f = model(args[0], as_float, *args[2:])
    np.testing.assert_allclose(np.asarray(out_u8), np.asarray(out_f), atol=1e-5, rtol=0)
