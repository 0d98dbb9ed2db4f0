"""Tokenizer loading (prepared exactly like Open-Qwen2VL) and an offline tiny Qwen2-style tokenizer.

Open-Qwen2VL (docs/original_system.md §3) takes the stock Qwen2.5 tokenizer and adds ``<|endofchunk|>`` and ``<s>`` as
additional special tokens, then sets ``bos_token = "<s>"``. ``<s>`` is an existing BPE entry in the real
vocabulary, so it keeps its pre-trained id (128245); in a tiny tokenizer it gets a fresh id. Ids are
always read back from the tokenizer, never hard-coded.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from oq2vl_jax.cli import UserError

BOS = "<s>"
EOS = "<|im_end|>"
PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
END_OF_CHUNK = "<|endofchunk|>"
# The real Qwen2.5 tokenizer already has this one (id 151655); we use it as the per-token image slot.
IMAGE_PAD = "<|image_pad|>"
# Marker inside caption / SFT text where an image goes (LLaVA convention, docs/original_system.md §3).
IMAGE_TAG = "<image>"

# Qwen2's pre-tokenizer split pattern. Qwen2Tokenizer rebuilds this pipeline on load (transformers v5),
# so a tiny tokenizer must be trained with the very same one or it tokenizes differently after reload.
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML with the Qwen2.5 default system prompt when none is given.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# A folder without any of these is not a tokenizer (transformers would blame a missing library).
TOKENIZER_FILES = frozenset({"tokenizer.json", "vocab.json", "tokenizer_config.json", "tokenizer.model",
                             "vocab.txt"})


class TokenizerError(UserError, ValueError):
    """A tokenizer folder that is empty, broken or not a Qwen2-style tokenizer."""


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The ids the data pipeline needs, read from a prepared tokenizer."""

    bos: int
    eos: int
    pad: int
    image: int
    vocab_len: int  # len(tokenizer): the model's vocab_size must be >= this


def _token_id(tok, token: str) -> int | None:
    tid = tok.convert_tokens_to_ids(token)
    if tid is None or (tok.unk_token_id is not None and tid == tok.unk_token_id and token != tok.unk_token):
        return None
    return int(tid)


def load_tokenizer(path: str):
    """Loads a HF tokenizer directory and prepares it as Open-Qwen2VL does (see module docstring).

    Also makes sure ``<|image_pad|>`` exists (added as a special token if missing), since packed rows
    store each image slot as that id.
    """
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path!r}")
    if not set(os.listdir(path)) & TOKENIZER_FILES:
        raise TokenizerError(f"tokenizer directory {path!r} holds no tokenizer (none of {sorted(TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 (transformers raises many types for a broken folder)
        raise TokenizerError(f"tokenizer directory {path!r} cannot be loaded: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:300]}") from e
    tok.add_special_tokens({"additional_special_tokens": [END_OF_CHUNK, BOS]})
    tok.bos_token = BOS
    if tok.eos_token != EOS:
        tok.eos_token = EOS
    if tok.pad_token != PAD:
        tok.pad_token = PAD
    tok.padding_side = "right"
    if _token_id(tok, IMAGE_PAD) is None:
        # add_tokens, not a second add_special_tokens: that would replace the specials added above
        # (and its keep-them keyword is named differently in transformers 4 and 5).
        tok.add_tokens([AddedToken(IMAGE_PAD, special=True, normalized=False)], special_tokens=True)
    for name in (EOS, PAD, IM_START):
        if _token_id(tok, name) is None:
            raise TokenizerError(f"tokenizer at {path!r} has no {name!r} token; is it a Qwen2 tokenizer?")
    return tok


# The original pickle packer's pad token: added after <|endofchunk|> and <s>, so 151666 in Qwen2.5, and
# trained on as a target (the trainer only ignored <|endoftext|>). Only added when that is reproduced.
PKL_PAD = "<|pad|>"


def add_pkl_pad(tok) -> int:
    """Adds the original packer's ``<|pad|>`` special token (if missing) and returns its id."""
    from tokenizers import AddedToken

    if _token_id(tok, PKL_PAD) is None:
        tok.add_tokens([AddedToken(PKL_PAD, special=True, normalized=False)], special_tokens=True)
    return _token_id(tok, PKL_PAD)


def special_ids(tok) -> SpecialIds:
    return SpecialIds(bos=_token_id(tok, BOS), eos=_token_id(tok, EOS), pad=_token_id(tok, PAD),
                      image=_token_id(tok, IMAGE_PAD), vocab_len=len(tok))


def build_tiny_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 512, image_pad: bool = True):
    """Trains a small Qwen2-style byte-level BPE on ``texts`` offline and saves it to ``out_dir``.

    ``AutoTokenizer.from_pretrained(out_dir)`` then returns a Qwen2Tokenizer with eos ``<|im_end|>``,
    pad ``<|endoftext|>``, ``<|im_start|>``, ``<|image_pad|>`` and a ChatML chat template. As in Qwen,
    the specials get the ids right after the BPE vocabulary. Returns the saved (unprepared) tokenizer.
    ``image_pad=False`` leaves out ``<|image_pad|>``, as Qwen2 (not 2.5) tokenizers do.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in (PAD, IM_START, EOS) + ((IMAGE_PAD,) if image_pad else ())])
    hf = Qwen2Tokenizer(tokenizer_object=tok, unk_token=None, bos_token=None, eos_token=EOS, pad_token=PAD,
                        errors="replace", model_max_length=32768, clean_up_tokenization_spaces=False,
                        split_special_tokens=False)
    hf.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    return hf
