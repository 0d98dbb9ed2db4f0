"""Qwen2-VL (arch qwen2_vl) against a tiny random HF Qwen2VLForConditionalGeneration at float32:
images of different sizes and aspect ratios preprocessed as HF's processor does, the tower on a
packed patch row, the whole model on a batch and on a packed row."""

import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from hf_tiny import QWEN2_VL_IDS, hf_qwen2_vl, our_qwen2_vl_config, state_dict_np
from oq2vl_jax.data.qwen2_vl_images import image_patches, pack_patch_row, smart_resize
from oq2vl_jax.models import build_from_hf
from oq2vl_jax.models.mrope import rope_index
from oq2vl_jax.models.weights import split_qwen2_vl

TOL = 1e-4
IMG, START, END = QWEN2_VL_IDS["image_token_id"], QWEN2_VL_IDS["vision_start_token_id"], QWEN2_VL_IDS["vision_end_token_id"]
# (height, width) before resizing: a square, a wide and a tall image (-> 56x56, 28x84, 84x56).
SIZES = [(50, 60), (30, 80), (90, 50)]


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def _hf_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 28 * 8)


@pytest.fixture(scope="module")
def hf():
    return hf_qwen2_vl()


@pytest.fixture(scope="module")
def ours(hf):
    cfg = our_qwen2_vl_config(hf)
    cfg = cfg.__class__(**{**cfg.__dict__, "qwen2_vl_vision": cfg.qwen2_vl_vision.__class__(
        **{**cfg.qwen2_vl_vision.__dict__, "min_pixels": 28 * 28, "max_pixels": 28 * 28 * 8})})
    return build_from_hf(cfg, **split_qwen2_vl(state_dict_np(hf)))


@pytest.fixture(scope="module")
def processed(ours):
    """Our patches/grids and HF's pixel_values/image_grid_thw of the same images."""
    images = _images()
    mine = [image_patches(im, ours.cfg.qwen2_vl_vision) for im in images]
    ref = _hf_processor()(images=images, return_tensors="pt")
    return images, mine, ref


def test_smart_resize_matches_hf():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    for h, w in [(50, 60), (30, 80), (1000, 20), (2000, 3000), (10, 10), (28, 28 * 150), (333, 777)]:
        for lo, hi in [(56 * 56, 28 * 28 * 1280), (28 * 28, 28 * 28 * 8), (100 * 100, 200 * 200)]:
            assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi)


def test_patches_match_hf_image_processor(processed):
    _, mine, ref = processed
    grids = ref["image_grid_thw"].numpy()
    assert [g for _, g in mine] == [tuple(g[1:]) for g in grids]
    assert len({g for _, g in mine}) == 3  # three different shapes
    pv = ref["pixel_values"].numpy().reshape(-1, 3, 2, 14 * 14)
    np.testing.assert_array_equal(pv[:, :, 0], pv[:, :, 1])  # HF's two identical frames
    ours_all = np.concatenate([p for p, _ in mine])
    np.testing.assert_allclose(ours_all, pv[:, :, 0].reshape(len(pv), -1), atol=1e-5, rtol=0)


def test_tower_on_a_packed_patch_row_matches_hf(hf, ours, processed):
    _, mine, ref = processed
    with torch.no_grad():
        want = hf.model.visual(ref["pixel_values"], grid_thw=ref["image_grid_thw"]).pooler_output.numpy()
    n = sum(len(p) for p, _ in mine)
    # Row 0: all three images and 8 patches of padding; row 1: the last image alone.
    rows = [pack_patch_row(mine, n + 8), pack_patch_row(mine[2:], n + 8)]
    patches, seg, pos = (np.stack(x) for x in zip(*rows))
    got = np.asarray(nnx.jit(lambda m, *a: m(*a))(ours.visual, patches, seg, pos))
    np.testing.assert_allclose(got[0, :n // 4], want, atol=TOL, rtol=0)
    last = len(mine[2][0]) // 4
    np.testing.assert_allclose(got[1, :last], want[-last:], atol=TOL, rtol=0)


def _sample(rng, grids, n_text):
    """[1, (start, image tokens, end)*, text...] with targets on the text after the images."""
    ids, loss = [1], [0]
    for gh, gw in grids:
        k = gh * gw // 4
        ids += [START] + [IMG] * k + [END]
        loss += [0] * (k + 2)
    ids += list(rng.integers(3, 99, n_text))
    loss += [1] * n_text
    return np.array(ids, np.int32), np.array(loss, np.int32)


def _hf_forward(hf, rows, image_sets, processed):
    """HF logits and loss of right-padded rows with their images (row-major order)."""
    _, mine, _ = processed
    proc = _hf_processor()
    flat = [im for imgs in image_sets for im in imgs]
    ref = proc(images=flat, return_tensors="pt")
    t = max(len(ids) for ids, _ in rows)
    ids = torch.zeros((len(rows), t), dtype=torch.long)
    att, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for b, (s_ids, s_loss) in enumerate(rows):
        ids[b, :len(s_ids)] = torch.from_numpy(s_ids.astype(np.int64))
        att[b, :len(s_ids)] = 1
        labels[b, :len(s_ids)] = torch.from_numpy(np.where(s_loss == 1, s_ids, -100).astype(np.int64))
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=att, pixel_values=ref["pixel_values"],
                 image_grid_thw=ref["image_grid_thw"], mm_token_type_ids=(ids == IMG).int(), labels=labels)
    return out.logits.numpy(), out.loss.item()


def _row(samples, image_lists, length, patch_len, vcfg):
    """One packed text row and its patch row from (ids, loss) samples with their (patches, grid)s."""
    ids, seg, loss = (np.zeros(length, np.int32) for _ in range(3))
    pos = np.zeros((3, length), np.int32)
    start = 0
    for i, ((s_ids, s_loss), imgs) in enumerate(zip(samples, image_lists)):
        sl = slice(start, start + len(s_ids))
        ids[sl], seg[sl], loss[sl] = s_ids, i + 1, s_loss
        pos[:, sl] = rope_index(s_ids, [g for _, g in imgs], IMG, vcfg.spatial_merge_size)[0]
        start += len(s_ids)
    patches, pseg, ppos = pack_patch_row([im for imgs in image_lists for im in imgs], patch_len)
    return dict(input_ids=ids, segment_ids=seg, loss_mask=loss, positions=pos, patches=patches,
                patch_segment_ids=pseg, patch_positions=ppos)


def _batch(rows):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@nnx.jit
def _logits_and_loss(model, batch):
    """One compiled forward (eager dispatch of every op costs more than the tiny model's compile)."""
    logits = model(batch["input_ids"], batch["positions"], batch["segment_ids"], batch["patches"],
                   batch["patch_segment_ids"], batch["patch_positions"])
    return logits, model.loss(batch)


@pytest.fixture(scope="module")
def samples(processed):
    images, mine, _ = processed
    rng = np.random.default_rng(3)
    # Sample 0: the wide and the tall image; sample 1: the square one.
    s0 = _sample(rng, [mine[1][1], mine[2][1]], 7)
    s1 = _sample(rng, [mine[0][1]], 5)
    return [(s0, [images[1], images[2]], [mine[1], mine[2]]), (s1, [images[0]], [mine[0]])]


def test_whole_model_matches_hf_on_a_batch_of_different_images(hf, ours, processed, samples):
    ref_logits, ref_loss = _hf_forward(hf, [s for s, _, _ in samples], [i for _, i, _ in samples], processed)
    t = ref_logits.shape[1]
    batch = _batch([_row([s], [m], t, 40, ours.cfg.qwen2_vl_vision) for s, _, m in samples])
    logits, (total, count) = _logits_and_loss(ours, batch)
    for b, (s, _, _) in enumerate(samples):
        n = len(s[0])
        np.testing.assert_allclose(np.asarray(logits)[b, :n], ref_logits[b, :n], atol=TOL, rtol=0)
    np.testing.assert_allclose(float(total / count), ref_loss, atol=1e-5, rtol=0)


def test_packed_row_equals_each_sample_alone(hf, ours, processed, samples):
    t = sum(len(s[0]) for s, _, _ in samples) + 5
    row = _row([s for s, _, _ in samples], [m for _, _, m in samples], t, 56, ours.cfg.qwen2_vl_vision)
    batch = _batch([row])
    logits, (total, count) = _logits_and_loss(ours, batch)
    logits = np.asarray(logits)[0]
    start, total_loss, total_count = 0, 0.0, 0
    for s, imgs, _ in samples:
        ref_logits, ref_loss = _hf_forward(hf, [s], [imgs], processed)
        n = len(s[0])
        np.testing.assert_allclose(logits[start:start + n], ref_logits[0], atol=TOL, rtol=0)
        c = int(s[1][1:].sum())
        total_loss, total_count = total_loss + ref_loss * c, total_count + c
        start += n
    assert int(count) == total_count
    np.testing.assert_allclose(float(total / count), total_loss / total_count, atol=1e-5, rtol=0)
