"""Batched generation with a KV cache, from a checkpoint directory or an in-memory model.

    python -m oq2vl_jax.generate --checkpoint DIR --image cat.jpg --prompt "Describe the image."
    python -m oq2vl_jax.generate --checkpoint DIR --input requests.jsonl --json   # {"prompt", "images"}

How a batch runs: prompts are tokenized (each ``<image>`` becomes ``image_tokens`` copies of the
image token id), left-padded to one length, and prefilled in one forward with the image embeddings
spliced in (OQ2VL.embed). The decode loop then runs on device (``lax.while_loop``) one token per row
per step against the KV cache until every row has emitted a stop token or ``max_new_tokens`` is
reached. Each (batch, prompt length, max length) shape compiles once; prompt lengths are rounded up
to ``pad_multiple`` so that different batches mostly share a compilation.

Prompt formats (docs/original_system.md §3-4):
  caption  ``<s>`` + ``<image>\\n`` per image + prompt (the pre-training layout; the default)
  chat     the tokenizer's chat template with a system message (SFT models trained with ChatML)
  chat-original  the original's Qwen2PromptBuilder, quirks included
                 (``<s><|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>assistant\\n``)
  fewshot  ``<s>`` + demonstrations from --shots, each
           ``<image>\\nQuestion: {q}\\nAnswer the question using a single word or phrase.\\nAnswer: {a}<|endofchunk|>``,
           then the query in the same form without the answer
  raw      the prompt as given (its ``<image>`` tags must match the images)
In caption and chat formats a prompt that already contains ``<image>`` tags is used as is.
A model.arch qwen2_vl checkpoint generates through generate_qwen2_vl.py (formats caption, chat, raw).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oq2vl_jax import preflight
from oq2vl_jax.cli import UserError
from oq2vl_jax.images import normalize
from oq2vl_jax.models.cache import KVCache
from oq2vl_jax.treepaths import dotted

FORMATS = ("caption", "chat", "chat-original", "fewshot", "raw")
DEFAULT_SYSTEM = "You are a helpful assistant."  # as oq2vl_jax.data.samples (SFT training)
FEWSHOT_QUERY = "<image>\nQuestion: {q}\nAnswer the question using a single word or phrase.\nAnswer:"


# ---------------------------------------------------------------------------------------------
# Device functions (pure in the model; jitted by Generator over the split state)
# ---------------------------------------------------------------------------------------------

def prefill(model, input_ids, images, positions, valid, max_len: int):
    """Runs the (left-padded) prompts through the model into a fresh cache of `max_len` slots.

    input_ids/positions int [B, T], valid bool [B, T], images float [B, M, H, W, 3] or None.
    Returns (float32 logits of the last slot [B, V], cache)."""
    lm = model.language_model
    cache = KVCache.init(lm.cfg, input_ids.shape[0], max_len, lm.model.embed_tokens.dtype)
    h, cache = lm.hidden_states_cached(model.embed(input_ids, images), positions, valid, cache)
    return lm.logits(h[:, -1]).astype(jnp.float32), cache


def decode_step(model, cache: KVCache, tokens, positions):
    """One token per row: tokens/positions int [B]. Returns (float32 logits [B, V], cache)."""
    lm = model.language_model
    valid = jnp.ones(tokens.shape + (1,), bool)
    h, cache = lm.hidden_states_cached(lm.embed(tokens[:, None]), positions[:, None], valid, cache)
    return lm.logits(h[:, 0]).astype(jnp.float32), cache


def _limit_vocab(logits, vocab_limit: int | None):
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    return logits


def sampling_logits(logits, *, temperature: float, top_p: float, vocab_limit: int | None):
    """The logits `sample` draws from when temperature > 0 (their softmax is the distribution):
    divided by the temperature, then restricted to the nucleus of mass top_p; ids >= vocab_limit -inf."""
    logits = _limit_vocab(logits, vocab_limit) / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1, stable=True)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is
        # below top_p (so the most likely token always stays). By rank, not by logit value, so tokens
        # tied with the last kept one do not all come in.
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def sample(logits, keys, *, temperature: float, top_p: float, vocab_limit: int | None):
    """Next token per row from float32 logits [B, V] and one PRNG key per row [B]: argmax when
    temperature == 0, else nucleus sampling. Ids >= vocab_limit (embedding rows past the tokenizer)
    are never chosen."""
    if temperature == 0:
        return jnp.argmax(_limit_vocab(logits, vocab_limit), axis=-1).astype(jnp.int32)
    logits = sampling_logits(logits, temperature=temperature, top_p=top_p, vocab_limit=vocab_limit)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def decode_loop(model, cache: KVCache, logits, positions, done, keys, *, max_new_tokens: int,
                temperature: float, top_p: float, vocab_limit: int | None, pad_id: int,
                stop_ids: tuple[int, ...]):
    """Samples up to max_new_tokens per row on device. positions int [B]: the next token's position;
    done bool [B]: rows that need no tokens (batch filler); keys [B]: one PRNG key per row. Returns int32 [B, max_new_tokens]; a
    row's stop token is kept and everything after it is pad_id."""
    b = logits.shape[0]
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)

    def cond(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, positions, done, out = carry
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        tok = sample(logits, step_keys, temperature=temperature, top_p=top_p,
                     vocab_limit=vocab_limit)
        tok = jnp.where(done, pad_id, tok)
        out = out.at[:, step].set(tok)
        done = done | jnp.isin(tok, stops)
        # Rows already done still run (the batch moves together); their tokens are discarded.
        logits, cache = decode_step(model, cache, tok, positions)
        return step + 1, cache, logits, positions + 1, done, out

    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    carry = (jnp.zeros((), jnp.int32), cache, logits, positions, done, out)
    return jax.lax.while_loop(cond, body, carry)[-1]


# ---------------------------------------------------------------------------------------------
# Host side: batching, padding, compilation cache
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Prompt:
    """A tokenized request: ids with image slots already expanded, and its images in slot order."""

    ids: Sequence[int]
    images: np.ndarray | None = None  # float [n, H, W, 3] in [-1, 1]


@dataclasses.dataclass
class Stats:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    new_tokens: int = 0
    decode_s: float = 0.0
    compile_s: float = 0.0

    def add(self, other: "Stats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def summary(self) -> str:
        rate = lambda n, s: f"{n / s:,.1f} tok/s" if s > 0 else "n/a"  # noqa: E731
        return (f"prefill {self.prompt_tokens} tokens in {self.prefill_s:.3f}s "
                f"({rate(self.prompt_tokens, self.prefill_s)}); decode {self.new_tokens} tokens in "
                f"{self.decode_s:.3f}s ({rate(self.new_tokens, self.decode_s)}); "
                f"compile {self.compile_s:.1f}s")


def pad_batch(prompts: Sequence[Prompt], batch_size: int, *, pad_id: int, image_size: int, multiple: int = 1):
    """Left-padded ids/positions/valid [B, T] (T a multiple of `multiple`; rows past the prompts are
    empty) and images [B, M, S, S, 3], zero-filled past each row's own (None when no row has any).
    A row's positions count its real tokens 0, 1, ..., whatever its padding."""
    longest = max(len(p.ids) for p in prompts)
    t = -(-longest // multiple) * multiple
    ids = np.full((batch_size, t), pad_id, np.int32)
    valid = np.zeros((batch_size, t), bool)
    for i, p in enumerate(prompts):
        if len(p.ids):
            ids[i, t - len(p.ids):] = p.ids
            valid[i, t - len(p.ids):] = True
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    counts = [0 if p.images is None else len(p.images) for p in prompts]
    images = None
    if max(counts) > 0:
        images = np.zeros((batch_size, max(counts), image_size, image_size, 3), np.float32)
        for i, p in enumerate(prompts):
            if counts[i]:
                images[i, :counts[i]] = p.images
    return ids, positions, valid, images


class Generator:
    """Batched generation for one model; compiled functions are kept per shape across calls.

    pad_id fills prompt padding and finished rows; a row stops after emitting any of stop_ids."""

    def __init__(self, model, *, pad_id: int, stop_ids: Sequence[int] = (), vocab_limit: int | None = None,
                 pad_multiple: int = 32):
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.cfg
        self.pad_id, self.stop_ids = int(pad_id), tuple(sorted({int(i) for i in stop_ids}))
        self.vocab_limit, self.pad_multiple = vocab_limit, pad_multiple
        self.stats = Stats()
        self._compiled: dict = {}

    def _run(self, fn: Callable, static: dict, *args):
        """fn(model, *args, **static), compiled ahead of time once per argument shapes (so compile
        time is kept out of the throughput numbers)."""
        leaves, treedef = jax.tree.flatten(args)
        key = (fn.__name__, tuple(sorted(static.items())), treedef,
               tuple((a.shape, str(a.dtype)) for a in leaves))
        if key not in self._compiled:
            graphdef = self.graphdef

            def run(state, *a):
                return fn(nnx.merge(graphdef, state), *a, **static)

            t0 = time.perf_counter()
            self._compiled[key] = jax.jit(run).lower(self.state, *args).compile()
            self.stats.compile_s += time.perf_counter() - t0
        return self._compiled[key](self.state, *args)

    def __call__(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 8) -> list[list[int]]:
        """Generated token ids per prompt, in order, ending with the stop token when one was emitted.

        Prompts run in chunks of batch_size rows (the last chunk is filled with empty rows so all
        chunks share one shape). Request i samples with PRNG key (seed, i), so its tokens do not depend
        on the batch size or on the other requests (up to float rounding of the batched logits)."""
        if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1; got "
                             f"{max_new_tokens}, {temperature}, {top_p}")
        self._check(prompts)
        batch_size = max(1, min(batch_size, len(prompts)))
        results: list[list[int]] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            ids, positions, valid, images = pad_batch(chunk, batch_size, pad_id=self.pad_id,
                                                      image_size=self.cfg.vision.image_size,
                                                      multiple=self.pad_multiple)
            max_len = ids.shape[1] + max_new_tokens
            compile_before, t0 = self.stats.compile_s, time.perf_counter()
            logits, cache = self._run(prefill, {"max_len": max_len}, ids, images, positions, valid)
            jax.block_until_ready(logits)
            t1 = time.perf_counter()
            prefill_compile = self.stats.compile_s - compile_before
            done = np.arange(batch_size) >= len(chunk)
            next_pos = valid.sum(axis=1).astype(np.int32)
            keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
                jax.random.key(seed), jnp.arange(start, start + batch_size))
            static = dict(max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                          vocab_limit=self.vocab_limit, pad_id=self.pad_id, stop_ids=self.stop_ids)
            out = self._run(decode_loop, static, cache, logits, next_pos, done, keys)
            out = np.asarray(out)
            t2 = time.perf_counter()
            decode_compile = self.stats.compile_s - compile_before - prefill_compile
            for row in out[:len(chunk)]:
                results.append(self._trim(row))
            self.stats.prompt_tokens += int(valid.sum())
            self.stats.new_tokens += sum(len(r) for r in results[-len(chunk):])
            self.stats.prefill_s += t1 - t0 - prefill_compile
            self.stats.decode_s += t2 - t1 - decode_compile
        return results

    def _check(self, prompts: Sequence[Prompt]) -> None:
        if not prompts:
            raise ValueError("no prompts")
        k, img_id = self.cfg.image_tokens, self.cfg.image_token_id
        for i, p in enumerate(prompts):
            if not len(p.ids):
                raise ValueError(f"prompt {i} is empty")
            slots = int(np.sum(np.asarray(p.ids) == img_id))
            n = 0 if p.images is None else len(p.images)
            if slots != n * k:
                raise ValueError(f"prompt {i}: {slots} image-token slots but {n} images x {k} tokens")

    def _trim(self, row: np.ndarray) -> list[int]:
        row = row.tolist()
        for j, t in enumerate(row):
            if t in self.stop_ids:
                return row[:j + 1]
        return row


# ---------------------------------------------------------------------------------------------
# Prompts, images, tokenizer
# ---------------------------------------------------------------------------------------------

def load_image(image, size: int, strategy: str = "squash", alpha: str = "white") -> np.ndarray:
    """Inference preprocessing, the packer's (data/transforms.py; default "resize-naive", docs/original_system.md §1): RGB
    (transparency on white), PIL bicubic squash to size x size, (x/255 - 0.5)/0.5. Accepts a path, a
    PIL image or an HWC uint8 array; returns float32 [S, S, 3]."""
    from PIL import Image

    from oq2vl_jax.data.transforms import to_square

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return normalize(np.asarray(to_square(im, size, strategy, alpha)))
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return normalize(np.asarray(to_square(image, size, strategy, alpha)))


def _with_image_tags(prompt: str, n_images: int) -> str:
    from oq2vl_jax.data.tokenizer import IMAGE_TAG

    return prompt if IMAGE_TAG in prompt else "<image>\n" * n_images + prompt


def render_prompt(tokenizer, prompt: str, n_images: int, fmt: str, *, system: str | None = None,
                  shots: Sequence[dict] = ()) -> tuple[str, bool]:
    """(text with <image> tags, whether BOS is prepended) for one request; see the module docstring.
    For fewshot, the shots' images come before the request's own images."""
    from oq2vl_jax.data.tokenizer import END_OF_CHUNK

    system = DEFAULT_SYSTEM if system is None else system
    if fmt == "caption":
        return _with_image_tags(prompt, n_images), True
    if fmt == "chat":
        msgs = [{"role": "system", "content": system},
                {"role": "user", "content": _with_image_tags(prompt.strip(), n_images)}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), False
    if fmt == "chat-original":
        user = _with_image_tags(prompt.strip(), n_images)
        return f"<s><|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>assistant\n", False
    if fmt == "fewshot":
        if not shots:
            raise ValueError("format 'fewshot' needs demonstrations (--shots)")
        demos = "".join(FEWSHOT_QUERY.format(q=s["question"]) + f" {s['answer']}{END_OF_CHUNK}" for s in shots)
        query = FEWSHOT_QUERY.format(q=prompt)
        if n_images != 1:  # the query template holds one image; put any others before it
            query = "<image>\n" * (n_images - 1) + query if n_images else query.removeprefix("<image>\n")
        return demos + query, True
    if fmt == "raw":
        return prompt, False
    raise ValueError(f"unknown prompt format {fmt!r} (expected one of {FORMATS})")


def encode(tokenizer, text: str, image_tokens: int, image_token_id: int, bos_id: int | None) -> list[int]:
    """Token ids with each <image> tag replaced by image_tokens copies of image_token_id. Text pieces
    between tags are tokenized separately, as the training data builder does."""
    from oq2vl_jax.data.tokenizer import IMAGE_TAG

    ids = [] if bos_id is None else [bos_id]
    for i, chunk in enumerate(text.split(IMAGE_TAG)):
        if i:
            ids += [image_token_id] * image_tokens
        if chunk:
            ids += tokenizer(chunk, add_special_tokens=False)["input_ids"]
    return ids


def stop_ids_for(tokenizer, fmt: str) -> list[int]:
    """<|im_end|>, the pad token and the tokenizer's eos; plus <|endofchunk|> after few-shot prompts."""
    from oq2vl_jax.data.tokenizer import END_OF_CHUNK, EOS, PAD

    names = [EOS, PAD] + ([END_OF_CHUNK] if fmt == "fewshot" else [])
    ids = [tokenizer.convert_tokens_to_ids(n) for n in names] + [tokenizer.eos_token_id]
    return [int(i) for i in ids if i is not None and i != tokenizer.unk_token_id]


def _request(r) -> dict:
    """A request as {"prompt": str, "images": [path, ...]}; a bare string is a text-only prompt."""
    if isinstance(r, str):
        return {"prompt": r, "images": []}
    if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
        raise ValueError(f"a request is a prompt string or {{'prompt': str, 'images': [path, ...]}}, got {r!r}")
    extra = set(r) - {"prompt", "images"}
    if extra:  # e.g. "image": silently ignoring it would caption without the image
        raise ValueError(f"request has unknown key(s) {sorted(extra)}; a request has 'prompt' and 'images'")
    images = r.get("images")
    images = [] if images is None else images
    # A list of images (paths, PIL images or arrays, see load_image); a bare path would be iterated
    # character by character.
    if isinstance(images, (str, os.PathLike, np.ndarray)) or not isinstance(images, (list, tuple)):
        raise ValueError(f"request 'images' must be a list of images (paths), got {images!r:.200}")
    images = list(images)
    return {"prompt": r["prompt"], "images": images}


def _shot(s) -> dict:
    """A few-shot demonstration: {"image": path, "question": str, "answer": str}."""
    keys = {"image", "question", "answer"}
    if not isinstance(s, dict) or set(s) != keys or not all(isinstance(s[k], str) for k in keys):
        raise ValueError(f"a shot is {{'image': path, 'question': str, 'answer': str}}, got {s!r}")
    return s


def make_prompts(model_cfg, tokenizer, requests: Sequence, *, fmt: str = "caption", system: str | None = None,
                 shots: Sequence[dict] = ()) -> list[Prompt]:
    """Renders, tokenizes and loads the images of each request ({"prompt", "images"} or a string).
    Shots are {"image", "question", "answer"}."""
    from oq2vl_jax.data.tokenizer import BOS

    size = model_cfg.vision.image_size
    shots = [_shot(s) for s in shots]
    shot_images = [load_image(s["image"], size) for s in shots] if fmt == "fewshot" else []
    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    prompts = []
    for r in map(_request, requests):
        text, with_bos = render_prompt(tokenizer, r["prompt"], len(r["images"]), fmt, system=system, shots=shots)
        ids = encode(tokenizer, text, model_cfg.image_tokens, model_cfg.image_token_id,
                     bos_id if with_bos else None)
        images = shot_images + [load_image(im, size) for im in r["images"]]
        prompts.append(Prompt(ids, np.stack(images) if images else None))
    return prompts


def generate(model, tokenizer, requests: Sequence, *, fmt: str = "caption", system: str | None = None,
             shots: Sequence[dict] = (), max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, batch_size: int = 8, stats: Stats | None = None) -> list[list[int]]:
    """Generated token ids per request (see Generator.__call__). `tokenizer` is prepared with
    oq2vl_jax.data.tokenizer.load_tokenizer. Pass a Stats to receive token counts and timings.
    For repeated calls build one Generator and reuse it: it keeps its compiled functions."""
    from oq2vl_jax.data.tokenizer import PAD

    prompts = make_prompts(model.cfg, tokenizer, requests, fmt=fmt, system=system, shots=shots)
    gen = Generator(model, pad_id=tokenizer.convert_tokens_to_ids(PAD), stop_ids=stop_ids_for(tokenizer, fmt),
                    vocab_limit=len(tokenizer))
    out = gen(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
              batch_size=batch_size)
    if stats is not None:
        stats.add(gen.stats)
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoints and the CLI
# ---------------------------------------------------------------------------------------------

def load_checkpoint(run_dir: str, step: int | None = None, *, dtype: str | None = None):
    """(model, run Config, step) from DIR/config.yaml and DIR/checkpoints/<step>/params (latest by
    default), on one device, without a random initialisation. dtype overrides the compute dtype.
    The Config's relative tokenizer path is resolved against DIR when it exists there."""
    from oq2vl_jax import checkpoint
    from oq2vl_jax.models import build_abstract, flat_params

    cfg = checkpoint.resolve_checkpoint_config(run_dir)
    # Inference: no activation checkpointing; the cached decode uses XLA attention regardless.
    overrides = dict(remat="none")
    if dtype:
        overrides.update(dtype=dtype, vision_dtype=dtype)
    model_cfg = dataclasses.replace(cfg.model, **overrides)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    graphdef, abstract = build_abstract(model_cfg)
    targets = checkpoint.single_device_targets(checkpoint.nest(flat_params(abstract)))
    step, params = checkpoint.load_params(run_dir, targets, step)
    loaded = checkpoint.flatten(params)
    for path, var in nnx.to_flat_state(abstract):
        if path not in loaded:
            raise KeyError(f"checkpoint {run_dir} step {step} has no parameter {dotted(path)}")
        var.set_value(loaded[path])
    return nnx.merge(graphdef, abstract), cfg, step


class BadRequest(UserError, ValueError):
    """A request or shots file line that cannot be used (named by path:line; exit 2 from the CLI)."""


def _read_jsonl(path: str, parse) -> list:
    """parse(record) of every non-blank line; a bad line is an error naming path:line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(parse(json.loads(line)))
            except json.JSONDecodeError as e:
                raise BadRequest(f"{path}:{n}: not JSON: {e.msg} (column {e.colno})") from None
            except ValueError as e:
                raise BadRequest(f"{path}:{n}: {e}") from None
    if not out:
        raise BadRequest(f"{path} has no records")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from oq2vl_jax import cli

    p = cli.parser("python -m oq2vl_jax.generate", __doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run or converted-checkpoint directory")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    cli.add_tokenizer(p, help="tokenizer directory (default: the checkpoint config's)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--input", help="JSONL file, one {\"prompt\": str, \"images\": [path, ...]} per line")
    p.add_argument("--image", action="append", default=[], help="image for --prompt (repeatable, in order)")
    p.add_argument("--format", choices=FORMATS, help="prompt format (default: fewshot with --shots, else caption)")
    p.add_argument("--shots", help="JSONL of {\"image\", \"question\", \"answer\"} demonstrations (fewshot)")
    p.add_argument("--system", help=f"system message for chat formats (default {DEFAULT_SYSTEM!r})")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    cli.add_dtype(p)
    p.add_argument("--json", action="store_true", help="one JSON object per request: token_ids, text")
    args = p.parse_args(argv)
    return cli.run(lambda: _main(p, args), args)


def _main(p, args) -> int:
    preflight.check_generate_args(args)
    fmt = args.format or ("fewshot" if args.shots else "caption")
    if (fmt == "fewshot") != bool(args.shots):
        p.error("--shots goes with --format fewshot (and fewshot needs --shots)")
    if args.input and args.image:
        p.error("--image goes with --prompt; put images in the --input records")
    requests = _read_jsonl(args.input, _request) if args.input else [{"prompt": args.prompt, "images": args.image}]
    shots = _read_jsonl(args.shots, _shot) if args.shots else []
    preflight.check_images([im for r in requests for im in r["images"]] + [s["image"] for s in shots])

    from oq2vl_jax import checkpoint
    from oq2vl_jax.data.tokenizer import load_tokenizer

    tok_path = args.tokenizer or checkpoint.resolve_checkpoint_config(args.checkpoint).tokenizer
    if not tok_path:
        p.error(f"{args.checkpoint}/config.yaml names no tokenizer; pass --tokenizer")
    run_cfg = checkpoint.resolve_checkpoint_config(args.checkpoint)
    qwen2_vl = run_cfg.model.arch == "qwen2_vl"
    if qwen2_vl:  # Qwen2-VL: its own tokenizer, images at their own resolution, M-RoPE
        from oq2vl_jax import generate_qwen2_vl
        from oq2vl_jax.data.qwen2_vl_text import load_qwen2_vl_tokenizer

        if fmt not in generate_qwen2_vl.FORMATS:
            p.error(f"--format {fmt} is not one of {generate_qwen2_vl.FORMATS} for a Qwen2-VL model")
        tokenizer = load_qwen2_vl_tokenizer(tok_path)  # a broken folder is named before the model loads
    else:
        tokenizer = load_tokenizer(tok_path)  # a broken folder is named before the model loads
    t0 = time.perf_counter()
    model, cfg, step = load_checkpoint(args.checkpoint, args.step, dtype=args.dtype)
    print(f"loaded {args.checkpoint} step {step} in {time.perf_counter() - t0:.1f}s on {jax.devices()[0]}",
          file=sys.stderr)
    stats = Stats()
    common = dict(fmt=fmt, system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_p=args.top_p, seed=args.seed, batch_size=args.batch_size, stats=stats)
    if qwen2_vl:
        outputs = generate_qwen2_vl.generate(model, tokenizer, requests, **common)
    else:
        outputs = generate(model, tokenizer, requests, shots=shots, **common)
    for ids in outputs:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        print(json.dumps({"token_ids": ids, "text": text}, ensure_ascii=False) if args.json else text, flush=True)
    print(stats.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
