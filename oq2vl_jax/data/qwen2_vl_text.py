"""Qwen2-VL's tokenizer and chat template.

Qwen2-VL's tokenizer is used as it ships (no `<s>` bos, unlike Open-Qwen2VL's preparation). Each
image is written `<|vision_start|>` + one `<|image_pad|>` per merged image token + `<|vision_end|>`;
the chat template writes a single `<|image_pad|>` per image, which the data path (like HF's
processor) expands to the image's own token count.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_END = "<|im_end|>"
PAD = "<|endoftext|>"

# Qwen2-VL-Instruct's template: ChatML, the default system prompt unless the first message is one,
# content a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' or 'image' in part %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class TokenizerError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Qwen2VLIds:
    image: int
    vision_start: int
    vision_end: int
    im_end: int
    pad: int
    vocab_len: int


def qwen2_vl_ids(tok) -> Qwen2VLIds:
    ids = {}
    for name, token in (("image", IMAGE_PAD), ("vision_start", VISION_START), ("vision_end", VISION_END),
                        ("im_end", IM_END), ("pad", PAD)):
        tid = tok.convert_tokens_to_ids(token)
        if tid is None or (tok.unk_token_id is not None and tid == tok.unk_token_id):
            raise TokenizerError(f"the tokenizer has no {token!r} token; is it a Qwen2-VL tokenizer?")
        ids[name] = int(tid)
    return Qwen2VLIds(**ids, vocab_len=len(tok))


def load_qwen2_vl_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path!r}")
    tok = AutoTokenizer.from_pretrained(path)
    qwen2_vl_ids(tok)  # refuses a tokenizer without the vision tokens
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_qwen2_vl_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 300):
    """A small offline Qwen2-style tokenizer with Qwen2-VL's vision tokens and chat template."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from oq2vl_jax.data.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(texts, out_dir, vocab_size=vocab_size)
    tok = AutoTokenizer.from_pretrained(out_dir)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in (VISION_START, VISION_END)],
                   special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return tok
