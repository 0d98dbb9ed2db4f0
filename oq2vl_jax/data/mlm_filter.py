"""MLM-Filter quality scores: the four prompts, the prompt encoding, the score parsing, and batched
greedy scoring with the KV-cache generator over all local devices.

MLM-Filter ("mlm-filter-qwen2.5-1.5b-gpt4o") is a LLaVA-Unified SigLIP-so400m + 2-layer GELU MLP +
Qwen2.5-1.5B-Instruct model; converted by tools/convert/hf_to_jax.py --llava it is an OQ2VL (its
average-pooling projector to 144 tokens is ours; a plain per-patch MLP converts as 729 tokens). How
its authors score a sample (their WebDataset batch script for Qwen2.5 models), reproduced here:

- the caption is put into one instruction template with the metric's criteria text, then into the
  ``qwen_instruct`` conversation: ``<|im_start|>system\\nYou are a helpful assistant<|im_end|>``
  ``<|im_start|>user\\n<image>\\n{instruction}<|im_end|><|im_start|>assistant\\n`` (no newlines after
  ``<|im_end|>``: their MPT separator style);
- each text piece around ``<image>`` is tokenized on its own, the ids (the image counting as one) are
  cut to 2040, and the id of " " is appended, so the model starts straight with the digits;
- images: RGB, bicubic squash to the tower's size, (x/255 - 0.5)/0.5 (SigLIP's processor);
- greedy decoding of 2 new tokens (Qwen splits numbers into single digits, so "100" reads as "10":
  a quirk kept, their thresholds were chosen with it); the text is decoded without special tokens;
- parsing (their filter step): the first line if the text has a newline, then ``strip(",")`` and
  ``strip(";")``, then Python ``int``; anything ``int`` refuses is no score (the sample is dropped).

One deliberate difference: their batches were left-padded without an attention mask, so a sample
attended to its batch neighbours' padding and its score depended on the batch. Here every row sees
only its own tokens, which equals their result at batch size 1.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Sequence

import numpy as np

METRICS = {"itm": "image_text_matching", "odf": "object_detail_fulfillment", "ctq": "caption_text_quality",
           "su": "semantic_understanding"}
MAX_PROMPT_IDS = 2040  # their --max-len: prompt ids (image = 1 id) kept before the " " is appended
MAX_NEW_TOKENS = 2  # their setting for Qwen-based filters

TEMPLATE = (
    "Text Caption: {caption}\n\n{criteria} A higher score indicates higher level of {aspect}. Ensure that your "
    "scoring is nuanced and uses the entire range from 0 to 100, reflecting the subtle differences. The score "
    "should be given as an integer, with each number between 0 and 100 considered as a potential score, "
    "avoiding the tendency to round to multiples of 5 or 10. Please first output a single line containing the "
    "value indicating the scores. In the subsequent line, please provide a comprehensive explanation of your "
    "evaluation, avoiding any potential bias."
)

CRITERIA = {
    "itm": (
        "Please evaluate if the provided text caption accurately represents the main features and objects of the "
        "image. The caption doesn't need to detail every aspect of the image, but it should capture its primary "
        "theme. Rate the overall quality of the text caption's match to the image on a scale of 1-100, "
        "considering the criteria mentioned."
    ),
    "odf": (
        "Please evaluate the text caption to determine if it provides detailed descriptions of objects that align "
        "with the image. Specifically, assess if the caption sufficiently describes the color, size, position, "
        "shape, material, etc., of the objects. Afterward, rate the caption's overall accuracy in capturing object "
        "details from the image on a scale of 1-100, based on the criteria provided."
    ),
    "ctq": (
        "Please evaluate the text caption based on the following criteria: Grammatical Correctness, Diversity of "
        "Vocabulary (e.g., the range and uniqueness of words used), Fluency (e.g., smoothness and natural flow of "
        "sentences), Readability, Length, and Structure. Assign an overall quality score on a scale of 1-100."
    ),
    "su": (
        "Evaluate the given text caption in relation to its corresponding image. Your goal is to determine if the "
        "text caption provides additional semantic information that isn't readily apparent just from the image "
        "itself.\n\nFor example:\n\n"
        "1. If the image mentions \"a man\" but the caption elaborates he is a \"homeless man\" or a "
        "\"businessman,\" then the caption is enriching the semantic context.\n"
        "2. If the caption introduces concepts like the mathematical tangent function, which require in-depth "
        "knowledge to deduce, it is imparting external semantics.\n"
        "3. Captions revealing specific location addresses, festival details, or other nuanced data not easy to "
        "infer from the image also provide external semantic information.\n"
        "4. Directly identifying specific entities in the image such as buildings, people, bird species, animal "
        "breeds, car models, engines, etc., in the caption introduces additional insights.\n"
        "5. Should the image act as a contextual backdrop and the caption describes elements not explicitly "
        "showcased in the image, it has semantic depth.\n"
        "6. Lastly, if the caption depicts relationships between the subjects in the image, which need "
        "commonsense knowledge to understand, it should be considered semantically rich.\n\n"
        "Please assess and determine the extent of semantic enrichment the caption provides over the image. "
        "Rate the text caption's semantic depth on a scale from 1 to 100."
    ),
}

SYSTEM = "<|im_start|>system\nYou are a helpful assistant"
SEP = "<|im_end|>"
USER, ASSISTANT = "<|im_start|>user\n", "<|im_start|>assistant\n"
IMAGE_TAG = "<image>"


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown MLM-Filter metric {metric!r}; one of {sorted(METRICS)}")
    return metric


def render_prompt(caption: str, metric: str) -> str:
    """The full prompt text for one caption, with one ``<image>`` tag."""
    instruction = TEMPLATE.format(caption=caption, criteria=CRITERIA[check_metric(metric)],
                                  aspect=METRICS[metric].replace("_", " "))
    return SYSTEM + SEP + USER + IMAGE_TAG + "\n" + instruction + SEP + ASSISTANT


def parse_score(text: str) -> int | None:
    """Their parsing of a generated score: first line, "," then ";" stripped, Python int; else None."""
    if "\n" in text:
        text = text.split("\n")[0]
    text = text.strip(",").strip(";")
    try:
        return int(text)
    except ValueError:
        return None


class PromptEncoder:
    """Token ids of one caption's prompt, image slots expanded to `image_tokens` copies of `image_id`."""

    def __init__(self, tokenizer, metric: str, image_tokens: int, image_id: int, max_ids: int = MAX_PROMPT_IDS):
        self.tok, self.metric = tokenizer, check_metric(metric)
        self.image_tokens, self.image_id, self.max_ids = image_tokens, image_id, max_ids
        self.space_id = tokenizer(" ").input_ids[-1]  # appended, as theirs, after the cut
        self._slot = -1  # one id per image while cutting, as their IMAGE_TOKEN_INDEX

    def ids_before_expansion(self, caption: str) -> list[int]:
        """Their tokenizer_image_token + cut + " ": the image is one slot id (-1 here)."""
        chunks = [self.tok(c).input_ids for c in render_prompt(caption, self.metric).split(IMAGE_TAG)]
        bos = self.tok.bos_token_id
        ids, offset = [], 0
        if chunks and chunks[0] and bos is not None and chunks[0][0] == bos:  # keep one BOS, not one per piece
            ids, offset = [bos], 1
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(self._slot)
            ids.extend(chunk[offset:])
        return ids[:self.max_ids] + [self.space_id]

    def __call__(self, caption: str) -> list[int] | None:
        """The model's input ids, or None when the caption is not scorable: it holds an ``<image>`` tag
        (theirs would then take the next sample's image) or the image token itself."""
        ids = self.ids_before_expansion(caption)
        if self.image_id in ids or ids.count(self._slot) != 1:
            return None
        out = []
        for t in ids:
            out.extend([self.image_id] * self.image_tokens if t == self._slot else [t])
        return out


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> float32 [size, size, 3] in [-1, 1] (raises on a corrupt image)."""
    from PIL import Image

    from oq2vl_jax.generate import load_image

    with Image.open(io.BytesIO(data)) as im:
        return load_image(im.convert("RGB"), size)


# ---------------------------------------------------------------------------------------------
# Batched scoring over all local devices
# ---------------------------------------------------------------------------------------------

def sharded_generator_class():
    """A Generator whose parameters are replicated over the local devices and whose batch is split
    over them (a one-axis data mesh per process: scoring needs no cross-host communication)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from oq2vl_jax.generate import Generator

    class ShardedGenerator(Generator):
        def __init__(self, model, *, devices=None, **kw):
            super().__init__(model, **kw)
            devices = list(devices or jax.local_devices())
            self.mesh = Mesh(np.array(devices), ("data",))
            self.n_devices = len(devices)
            self._replicated = NamedSharding(self.mesh, P())
            self._split = NamedSharding(self.mesh, P("data"))
            self.state = jax.device_put(self.state, self._replicated)

        def _place(self, x, batch: int):
            if getattr(x, "ndim", 0) >= 1 and x.shape[0] == batch:
                return jax.device_put(x, self._split)
            return jax.device_put(x, self._replicated)

        def _run(self, fn, static, *args):
            batch = args[0].shape[0] if fn.__name__ == "prefill" else args[1].shape[0]  # ids / logits
            return super()._run(fn, static, *jax.tree.map(lambda x: self._place(x, batch), args))

    return ShardedGenerator


@dataclasses.dataclass
class Scored:
    text: str | None  # the decoded generation (None: not scored)
    score: int | None  # parse_score(text)


class MLMFilterScorer:
    """Scores (image bytes, caption) pairs with a converted MLM-Filter checkpoint and one metric."""

    def __init__(self, checkpoint_dir: str, metric: str, *, batch_size: int = 64,
                 max_new_tokens: int = MAX_NEW_TOKENS, dtype: str | None = None, devices=None):
        from transformers import AutoTokenizer

        from oq2vl_jax.generate import load_checkpoint

        self.metric = check_metric(metric)
        model, cfg, _ = load_checkpoint(checkpoint_dir, dtype=dtype)
        self.cfg = model.cfg
        # The tokenizer as saved beside the weights; its stock specials decide the stop ids.
        self.tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
        self.encode = PromptEncoder(self.tok, metric, self.cfg.image_tokens, self.cfg.image_token_id)
        stops = {i for i in (self.tok.eos_token_id, self.tok.pad_token_id,
                             self.tok.convert_tokens_to_ids(SEP)) if isinstance(i, int) and i >= 0}
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.gen = sharded_generator_class()(model, devices=devices, pad_id=pad, stop_ids=sorted(stops),
                                             pad_multiple=64)
        n = self.gen.n_devices
        self.batch_size = -(-max(batch_size, 1) // n) * n  # whole rows per device
        self.max_new_tokens = max_new_tokens

    def prompt(self, image: np.ndarray, caption: str):
        """A generate.Prompt for one decoded image [S, S, 3] and its caption, or None."""
        from oq2vl_jax.generate import Prompt

        ids = self.encode(caption)
        return None if ids is None else Prompt(ids, image[None])

    def score_prompts(self, prompts: Sequence) -> list[Scored]:
        """Greedy scores of prompts (None entries stay unscored), in order."""
        # Rows run shortest first, so a batch pads to similar lengths (a row's score does not depend
        # on its batch); whole rows per device in every batch: copies of the last fill the tail.
        order = sorted((i for i, p in enumerate(prompts) if p is not None), key=lambda i: len(prompts[i].ids))
        result = [Scored(None, None)] * len(prompts)
        if order:
            rows = [prompts[i] for i in order]
            rows += [rows[-1]] * (-len(rows) % self.gen.n_devices)
            outs = self.gen(rows, max_new_tokens=self.max_new_tokens, batch_size=min(self.batch_size, len(rows)))
            for i, ids in zip(order, outs):
                text = self.tok.decode(ids, skip_special_tokens=True)
                result[i] = Scored(text, parse_score(text))
        return result

    def score_pairs(self, images: Sequence, captions: Sequence[str], mapper=None) -> list[Scored]:
        """Scores of decoded images (PIL, any size) with their captions, in order. `mapper` (a
        thread pool's map) prepares the prompts in parallel."""
        from oq2vl_jax.generate import load_image

        size = self.cfg.vision.image_size
        prompts = (mapper or (lambda f, xs: list(map(f, xs))))(
            lambda pair: self.prompt(load_image(pair[0], size), pair[1]), list(zip(images, captions)))
        return self.score_prompts(list(prompts))
