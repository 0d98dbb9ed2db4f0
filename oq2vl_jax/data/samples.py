"""Builds one training sample's token ids and loss mask (caption, SFT conversation, plain text).

Layout rules (docs/original_system.md §3-4), with each image expanded at pack time into ``image_tokens`` copies of the
``<|image_pad|>`` id so that a sample's length is its true multimodal length:

* caption: ``[<s>] + K×img + tok("\\n" + caption) + [<|im_end|>]``; literal ``<image>`` inside a caption
  becomes ``<image-placeholder>``. Loss on every text token (incl. ``<s>`` and ``<|im_end|>``).
* SFT: ChatML by default, or the original's quirky builder (``template="original"``). Loss only on
  assistant turns, incl. their ``<|im_end|>`` and trailing ``"\\n"``. ``<image>`` marks image slots.
* text: ``[<s>] + tok(doc) + [<|im_end|>]``, loss on all.

``loss_mask[t] = 1`` means token ``t`` is a prediction target (the trainer applies it to the label side
of its shifted cross-entropy). Image slots and padding are never targets.

The original's ``tokenizer_image_token`` offset bug (docs/original_system.md §4) (a turn whose text starts with ``<s>`` loses the
first token after each ``<image>``: in SFT the ``"\n"`` of ``"<image>\n"``) is off by default (we keep
that token) and reproduced with ``original_image_offset=True``.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from oq2vl_jax.data.tokenizer import END_OF_CHUNK, IMAGE_TAG, special_ids

DEFAULT_SYSTEM = "You are a helpful assistant."
SFT_TEMPLATES = ("chatml", "original")
_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant")


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is the short key counted in stats.json."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass
class Tokens:
    input_ids: np.ndarray  # int32[n], images already expanded
    loss_mask: np.ndarray  # uint8[n]
    num_images: int
    truncated: bool = False


class SampleBuilder:
    """Turns text into ``Tokens`` with a prepared tokenizer (see tokenizer.load_tokenizer)."""

    def __init__(self, tokenizer, image_tokens: int, sft_template: str = "chatml",
                 original_image_offset: bool = False):
        if image_tokens < 1:
            raise ValueError(f"image_tokens must be >= 1, got {image_tokens}")
        if sft_template not in SFT_TEMPLATES:
            raise ValueError(f"sft_template must be one of {SFT_TEMPLATES}, got {sft_template!r}")
        self.tok = tokenizer
        self.ids = special_ids(tokenizer)
        self.image_tokens = image_tokens
        self.sft_template = sft_template
        self.original_image_offset = original_image_offset

    # -- pieces ---------------------------------------------------------------------------------
    def _encode_text(self, text: str) -> list[int]:
        if not text:
            return []
        try:  # json "\ud83d" escapes give lone surrogates, which the tokenizer cannot take
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise SampleError("bad_utf8", str(e)) from None
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        # A literal "<|image_pad|>" in data would be parsed as the special token and break the
        # image-slot ↔ image correspondence, so such samples are refused.
        if self.ids.image in ids:
            raise SampleError("image_token_in_text", "text contains the literal image pad token")
        return ids

    def _encode_with_images(self, text: str) -> tuple[list[int], int]:
        """Tokenizes ``text``, replacing each ``<image>`` by K image-pad ids (text chunks separately).

        With ``original_image_offset``, a text whose first token is ``<s>`` loses the first token of
        every chunk after an image, as the original's ``tokenizer_image_token`` (LLaVA's Llama logic,
        where every chunk began with a BOS it meant to skip)."""
        chunks = text.split(IMAGE_TAG)
        out: list[int] = []
        skip = 0
        for i, chunk in enumerate(chunks):
            ids = self._encode_text(chunk)
            if i == 0 and self.original_image_offset and ids[:1] == [self.ids.bos]:
                skip = 1
            if i:
                out.extend([self.ids.image] * self.image_tokens)
                ids = ids[skip:]
            out.extend(ids)
        return out, len(chunks) - 1

    @staticmethod
    def _finish(pieces: list[tuple[list[int], int]], num_images: int) -> Tokens:
        ids = np.fromiter((t for p, _ in pieces for t in p), dtype=np.int32)
        mask = np.concatenate([np.full(len(p), m, np.uint8) for p, m in pieces])
        return Tokens(ids, mask, num_images)

    # -- sample kinds -----------------------------------------------------------------------------
    def caption(self, caption: str) -> Tokens:
        if not has_printable(caption):
            raise SampleError("empty_caption")
        body = self._encode_text("\n" + caption.replace(IMAGE_TAG, "<image-placeholder>"))
        ids = [self.ids.bos] + [self.ids.image] * self.image_tokens + body + [self.ids.eos]
        mask = np.ones(len(ids), np.uint8)
        mask[1:1 + self.image_tokens] = 0
        return Tokens(np.asarray(ids, np.int32), mask, 1)

    def text(self, doc: str) -> Tokens:
        if not has_printable(doc):
            raise SampleError("empty_text")
        ids = [self.ids.bos] + self._encode_text(doc) + [self.ids.eos]
        return Tokens(np.asarray(ids, np.int32), np.ones(len(ids), np.uint8), 0)

    def interleaved(self, parts: list) -> Tokens:
        """OBELICS-style document: text chunks (str) and images (None) in document order.

        As the original's packer: an image is ``"<image>\n"``, a text chunk is followed by
        ``<|endofchunk|>``, literal ``<image>`` in text becomes ``<image-placeholder>``, ``<s>`` first and
        ``<|im_end|>`` last; loss on every text token. Images after the last text chunk are dropped
        (the original meant to; its check looked for a trailing placeholder, which the "\n" after
        each image hides), and ``num_images`` counts the images kept, which are the first ones.
        """
        parts = list(parts)
        while parts and parts[-1] is None:
            parts.pop()
        if not any(p is None for p in parts):
            raise SampleError("no_image", "no image before the document's last text chunk")
        text = "".join(IMAGE_TAG + "\n" if p is None else p.replace(IMAGE_TAG, "<image-placeholder>") + END_OF_CHUNK
                       for p in parts)
        body, n_img = self._encode_with_images(text)
        ids = ([] if body[:1] == [self.ids.bos] else [self.ids.bos]) + body + [self.ids.eos]
        ids = np.asarray(ids, np.int32)
        return Tokens(ids, (ids != self.ids.image).astype(np.uint8), n_img)

    def conversation(self, turns: list[dict]) -> Tokens:
        """LLaVA ``conversations`` ([{"from": "human"|"gpt", "value": str}, ...]) → tokens."""
        if not isinstance(turns, list) or not turns:
            raise SampleError("empty_text", "no conversation turns")
        system = DEFAULT_SYSTEM
        if isinstance(turns[0], dict) and turns[0].get("from") == "system":
            system, turns = str(turns[0].get("value", "")).strip(), turns[1:]
        msgs = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise SampleError("bad_conversation", f"turn {i} is not {{'from', 'value': str}}")
            role = turn.get("from")
            want = _USER_ROLES if i % 2 == 0 else _ASSISTANT_ROLES
            # The original decides roles by parity only; the ChatML path refuses inconsistent data.
            if self.sft_template == "chatml" and role not in want:
                raise SampleError("bad_conversation", f"turn {i} has role {role!r}, expected {want}")
            msgs.append(turn["value"].strip())
        if len(msgs) < 2:
            raise SampleError("no_assistant_turn")
        if not any(m for m in msgs[1::2]):
            raise SampleError("empty_text", "all assistant turns are empty")

        if self.sft_template == "chatml":
            texts = [(f"<|im_start|>system\n{system}<|im_end|>\n", 0)]
            for i, m in enumerate(msgs):
                texts.append((f"<|im_start|>user\n{m}<|im_end|>\n<|im_start|>assistant\n", 0) if i % 2 == 0
                             else (f"{m}<|im_end|>\n", 1))
        else:  # the original Qwen2PromptBuilder, quirks included (docs/original_system.md §4)
            texts = []
            for i, m in enumerate(msgs):
                if i % 2 == 0:
                    head = f"<s><|im_start|>system\n{system}<|im_end|>\n" if i == 0 else ""
                    texts.append((f"{head}<|im_start|>user\n{m}<|im_end|>assistant\n", 0))
                else:  # the original's wrap_gpt writes an empty answer as " "
                    texts.append((f"{m or ' '}<|im_end|>\n", 1))
        pieces, n_img = [], 0
        for text, m in texts:
            ids, k = self._encode_with_images(text)
            n_img += k
            pieces.append((ids, m))
        out = self._finish(pieces, n_img)
        out.loss_mask[out.input_ids == self.ids.image] = 0
        return out


def has_printable(text: str | None) -> bool:
    """False for None, "" and text of only whitespace, NUL or other control characters."""
    return bool(text) and any(c.isprintable() and not c.isspace() for c in text)


def count_image_tags(turns) -> int:
    if not isinstance(turns, list):
        return 0
    return sum(len(re.findall(re.escape(IMAGE_TAG), str(t.get("value", "")))) for t in turns
               if isinstance(t, dict))
