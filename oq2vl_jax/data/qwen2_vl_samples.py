"""Qwen2-VL training samples: token ids and loss mask of a caption or a chat conversation, each image
written `<|vision_start|>` + its own number of `<|image_pad|>` + `<|vision_end|>` (the number comes
from the image's resized size, see qwen2_vl_images.num_image_tokens).

* caption: `[image] + tok(caption) + <|im_end|>`, loss on the caption and `<|im_end|>`.
* SFT: Qwen2-VL's chat template (the default system prompt unless the first turn is a system one);
  `<image>` in a turn marks where its image goes (LLaVA data); loss on assistant turns including
  their `<|im_end|>` and newline.
"""

from __future__ import annotations

import numpy as np

from oq2vl_jax.data.qwen2_vl_text import qwen2_vl_ids
from oq2vl_jax.data.samples import DEFAULT_SYSTEM, SampleError, Tokens
from oq2vl_jax.data.tokenizer import IMAGE_TAG

_USER_ROLES, _ASSISTANT_ROLES = ("human", "user"), ("gpt", "assistant")


class Qwen2VLSampleBuilder:
    slack_id = None  # the pad_as_target fidelity switch is the SigLIP path's

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids = qwen2_vl_ids(tokenizer)

    def _encode(self, text: str) -> list[int]:
        if not text:
            return []
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise SampleError("bad_utf8", str(e)) from None
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if {self.ids.image, self.ids.vision_start, self.ids.vision_end} & set(ids):
            raise SampleError("image_token_in_text", "text contains a literal vision token")
        return ids

    def _image(self, n_tokens: int) -> list[int]:
        return [self.ids.vision_start] + [self.ids.image] * n_tokens + [self.ids.vision_end]

    def _with_images(self, text: str, tokens: list[int]) -> tuple[list[int], int]:
        chunks = text.split(IMAGE_TAG)
        if len(chunks) - 1 > len(tokens):
            raise SampleError("image_tag_mismatch", f"more <image> tags than the {len(tokens)} images")
        out: list[int] = []
        for i, chunk in enumerate(chunks):
            if i:
                out += self._image(tokens[i - 1])
            out += self._encode(chunk)
        return out, len(chunks) - 1

    def caption(self, caption: str, image_tokens: int) -> Tokens:
        if caption is None or not caption.strip():
            raise SampleError("empty_caption")
        img = self._image(image_tokens)
        body = self._encode(caption.replace(IMAGE_TAG, "<image-placeholder>")) + [self.ids.im_end]
        ids = np.asarray(img + body, np.int32)
        mask = np.concatenate([np.zeros(len(img), np.uint8), np.ones(len(body), np.uint8)])
        return Tokens(ids, mask, 1)

    def conversation(self, turns, image_tokens: list[int]) -> Tokens:
        """LLaVA `conversations` with the token counts of its images in `<image>` order."""
        if not isinstance(turns, list) or not turns:
            raise SampleError("empty_text", "no conversation turns")
        system = DEFAULT_SYSTEM
        if isinstance(turns[0], dict) and turns[0].get("from") == "system":
            system, turns = str(turns[0].get("value", "")).strip(), turns[1:]
        pieces = [(self._encode(f"<|im_start|>system\n{system}<|im_end|>\n"), 0)]
        used = 0
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise SampleError("bad_conversation", f"turn {i} is not {{'from', 'value': str}}")
            want = _USER_ROLES if i % 2 == 0 else _ASSISTANT_ROLES
            if turn.get("from") not in want:
                raise SampleError("bad_conversation", f"turn {i} has role {turn.get('from')!r}, expected {want}")
            text = turn["value"].strip()
            if i % 2 == 0:
                body, k = self._with_images(text, image_tokens[used:])
                used += k
                pieces.append((self._encode("<|im_start|>user\n") + body
                               + self._encode("<|im_end|>\n<|im_start|>assistant\n"), 0))
            else:
                if IMAGE_TAG in text:
                    raise SampleError("image_tag_mismatch", "an <image> tag in an assistant turn")
                pieces.append((self._encode(f"{text}<|im_end|>\n"), 1))
        if len(turns) < 2:
            raise SampleError("no_assistant_turn")
        if used != len(image_tokens):
            raise SampleError("image_tag_mismatch", f"{used} <image> tags vs {len(image_tokens)} images")
        ids = np.fromiter((t for p, _ in pieces for t in p), dtype=np.int32)
        mask = np.concatenate([np.full(len(p), m, np.uint8) for p, m in pieces])
        if not mask.any():
            raise SampleError("empty_text", "all assistant turns are empty")
        return Tokens(ids, mask, used)
