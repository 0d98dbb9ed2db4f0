"""Generation for model.arch qwen2_vl: images of any sizes in one batch, M-RoPE positions.

Each request's images are resized and patchified as in training (data/qwen2_vl_images.py); a batch
row's images go one after another into that row's patch row (rows padded to one patch length). A
prompt's M-RoPE positions come from models/mrope.rope_index; decoding then continues every row from
its last position + 1, i.e. the token's plain index plus the row's rope delta (HF's `rope_deltas`),
the same on all three position rows. The decode loop, sampling, stop handling and statistics are
generate.py's.

Prompt formats: caption (the image blocks, then the prompt: the qwen2vl_caption training layout),
chat (the tokenizer's chat template: Qwen2-VL's, images first in the user turn), raw (the prompt as
given; each `<image>` tag becomes an image block).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from oq2vl_jax.data.qwen2_vl_images import image_patches, pack_patch_row
from oq2vl_jax.generate import Generator, Stats, decode_loop
from oq2vl_jax.models.cache import KVCache
from oq2vl_jax.models.mrope import rope_index

FORMATS = ("caption", "chat", "raw")


@dataclasses.dataclass
class Qwen2VLPrompt:
    """Token ids (each image already expanded to its tokens) and its images' (patches, grid)."""

    ids: Sequence[int]
    images: list = dataclasses.field(default_factory=list)


def prefill(model, input_ids, positions, valid, patches, patch_segment_ids, patch_positions, max_len: int):
    """Left-padded prompts (positions int [B, 3, T]) into a fresh cache; (last logits [B, V], cache)."""
    lm = model.language_model
    cache = KVCache.init(lm.cfg, input_ids.shape[0], max_len, lm.model.embed_tokens.dtype)
    embeds = model.embed(input_ids, patches, patch_segment_ids, patch_positions)
    h, cache = lm.hidden_states_cached(embeds, jnp.moveaxis(positions, 1, 0), valid, cache)
    return lm.logits(h[:, -1]).astype(jnp.float32), cache


def pad_batch(prompts: Sequence[Qwen2VLPrompt], batch_size: int, *, pad_id: int, image_token_id: int,
              patch_dim: int, merge: int = 2, multiple: int = 1, patch_multiple: int = 64):
    """Left-padded ids/valid [B, T], M-RoPE positions [B, 3, T], patch rows [B, P, ...] and each row's
    next position [B] (its last position + 1)."""
    longest = max(len(p.ids) for p in prompts)
    t = -(-longest // multiple) * multiple
    ids = np.full((batch_size, t), pad_id, np.int32)
    valid = np.zeros((batch_size, t), bool)
    positions = np.zeros((batch_size, 3, t), np.int32)
    next_pos = np.zeros(batch_size, np.int32)
    for i, p in enumerate(prompts):
        n = len(p.ids)
        ids[i, t - n:], valid[i, t - n:] = p.ids, True
        pos, delta = rope_index(np.asarray(p.ids), [g for _, g in p.images], image_token_id, merge)
        positions[i, :, t - n:] = pos
        next_pos[i] = n + delta
    most = max(sum(len(x) for x, _ in p.images) for p in prompts)
    length = max(patch_multiple, -(-most // patch_multiple) * patch_multiple)
    rows = [pack_patch_row(p.images, length, merge) for p in prompts]
    rows += [pack_patch_row([], length, merge)] * (batch_size - len(prompts))
    patches = np.zeros((batch_size, length, patch_dim), np.float32)
    for i, (x, _, _) in enumerate(rows):
        if x.shape[1]:
            patches[i] = x
    return ids, valid, positions, next_pos, patches, np.stack([r[1] for r in rows]), np.stack([r[2] for r in rows])


class Qwen2VLGenerator(Generator):
    """Generator for Qwen2VL models: prompts are Qwen2VLPrompt."""

    def __call__(self, prompts: Sequence[Qwen2VLPrompt], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 8) -> list[list[int]]:
        if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1; got "
                             f"{max_new_tokens}, {temperature}, {top_p}")
        self._check(prompts)
        v = self.cfg.qwen2_vl_vision
        batch_size = max(1, min(batch_size, len(prompts)))
        results: list[list[int]] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            ids, valid, positions, next_pos, patches, pseg, ppos = pad_batch(
                chunk, batch_size, pad_id=self.pad_id, image_token_id=self.cfg.image_token_id,
                patch_dim=v.patch_dim, merge=v.spatial_merge_size, multiple=self.pad_multiple)
            max_len = ids.shape[1] + max_new_tokens
            compile_before, t0 = self.stats.compile_s, time.perf_counter()
            logits, cache = self._run(prefill, {"max_len": max_len}, ids, positions, valid, patches, pseg, ppos)
            jax.block_until_ready(logits)
            t1 = time.perf_counter()
            prefill_compile = self.stats.compile_s - compile_before
            done = np.arange(batch_size) >= len(chunk)
            keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
                jax.random.key(seed), jnp.arange(start, start + batch_size))
            static = dict(max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                          vocab_limit=self.vocab_limit, pad_id=self.pad_id, stop_ids=self.stop_ids)
            out = np.asarray(self._run(decode_loop, static, cache, logits, next_pos, done, keys))
            t2 = time.perf_counter()
            decode_compile = self.stats.compile_s - compile_before - prefill_compile
            results += [self._trim(row) for row in out[:len(chunk)]]
            self.stats.prompt_tokens += int(valid.sum())
            self.stats.new_tokens += sum(len(r) for r in results[-len(chunk):])
            self.stats.prefill_s += t1 - t0 - prefill_compile
            self.stats.decode_s += t2 - t1 - decode_compile
        return results

    def _check(self, prompts) -> None:
        if not prompts:
            raise ValueError("no prompts")
        for i, p in enumerate(prompts):
            if not len(p.ids):
                raise ValueError(f"prompt {i} is empty")
            slots = int(np.sum(np.asarray(p.ids) == self.cfg.image_token_id))
            want = sum(len(x) for x, _ in p.images) // self.cfg.qwen2_vl_vision.spatial_merge_size**2
            if slots != want:
                raise ValueError(f"prompt {i}: {slots} image-token slots but its images give {want} tokens")


def make_prompts(model_cfg, tokenizer, requests: Sequence, *, fmt: str = "caption",
                 system: str | None = None) -> list[Qwen2VLPrompt]:
    """Renders and tokenizes requests ({"prompt", "images"} or a string; see generate._request)."""
    from PIL import Image

    from oq2vl_jax.data.qwen2_vl_text import IMAGE_PAD, VISION_END, VISION_START
    from oq2vl_jax.generate import _request

    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS} for a Qwen2-VL model")
    block = VISION_START + IMAGE_PAD + VISION_END
    prompts = []
    for r in map(_request, requests):
        images = []
        for im in r["images"]:
            if isinstance(im, np.ndarray):
                im = Image.fromarray(im)
            elif not isinstance(im, Image.Image):
                with Image.open(im) as f:
                    im = f.convert("RGB")
            images.append(image_patches(im, model_cfg.qwen2_vl_vision))
        n = len(images)
        if fmt == "caption":
            text = block * n + r["prompt"]
        elif fmt == "chat":
            content = [{"type": "image"}] * n + [{"type": "text", "text": r["prompt"]}]
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = r["prompt"].replace("<image>", block)
        pieces = text.split(IMAGE_PAD)
        if len(pieces) - 1 != n:
            raise ValueError(f"prompt has {len(pieces) - 1} image places for {n} images")
        merge = model_cfg.qwen2_vl_vision.spatial_merge_size
        ids = []
        for i, piece in enumerate(pieces):
            if i:
                ids += [model_cfg.image_token_id] * (len(images[i - 1][0]) // merge**2)
            if piece:
                ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        prompts.append(Qwen2VLPrompt(ids, images))
    return prompts


def generate(model, tokenizer, requests: Sequence, *, fmt: str = "caption", system: str | None = None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             batch_size: int = 8, stats: Stats | None = None) -> list[list[int]]:
    """Generated token ids per request; `tokenizer` from qwen2_vl_text.load_qwen2_vl_tokenizer."""
    from oq2vl_jax.data.qwen2_vl_text import qwen2_vl_ids

    ids = qwen2_vl_ids(tokenizer)
    prompts = make_prompts(model.cfg, tokenizer, requests, fmt=fmt, system=system)
    gen = Qwen2VLGenerator(model, pad_id=ids.pad, stop_ids=[ids.im_end, ids.pad], vocab_limit=len(tokenizer))
    out = gen(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
              batch_size=batch_size)
    if stats is not None:
        stats.add(gen.stats)
    return out
