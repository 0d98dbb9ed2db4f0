"""Input readers for the packer: WebDataset tars, LLaVA SFT json/jsonl, text jsonl/txt, image prep.

Readers never raise on bad content. They return what could be read, plus a shard-level error message
(truncated or garbage tar, unparsable json file); tars are streamed, sample by sample, with the error
as the generator's return value. Per-sample problems surface later as ``SampleError``.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from typing import Iterator

from oq2vl_jax.data import transforms
from oq2vl_jax.cli import UserError
from oq2vl_jax.data.samples import SampleError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``{00000..00099}`` (zero padding kept) and ``{a,b}``; nests."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        width = len(a) if a.startswith("0") and len(a) > 1 else 0
        step = 1 if int(b) >= int(a) else -1
        options = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    else:
        options = body.split(",")
    return [p for opt in options for p in expand_braces(head + opt + tail)]


class MissingShards(UserError):
    """A brace pattern names shards that are not there (a partial download or copy)."""


def resolve_inputs(patterns: list[str], allow_missing: bool = False) -> list[str]:
    """Brace-expands then globs each pattern; keeps the given order, drops duplicates.
    A brace pattern whose expansions are only partly present is refused (naming a few missing)
    unless `allow_missing`."""
    out, seen, missing, expanded = [], set(), [], 0
    for pattern in patterns:
        hits = []
        names = expand_braces(pattern)
        for p in names:
            found = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.exists(p) else [])
            if not found and len(names) > 1:
                missing.append(p)
            hits.extend(found)
        expanded += len(names) if len(names) > 1 else 0
        if not hits:
            raise FileNotFoundError(f"--input pattern matched no file: {pattern!r}")
        for h in hits:
            if h not in seen:
                seen.add(h)
                out.append(h)
    if missing and not allow_missing:
        few = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise MissingShards(f"--input: {len(missing)} of {expanded} shards named by the pattern(s) are missing "
                            f"({few}); pass --allow-missing to use the {len(out)} present")
    return out


def _split_key(name: str) -> tuple[str, str]:
    # WebDataset convention: key = path up to the first dot of the basename, extension = the rest.
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(d, stem) if d else stem, ext.lower()


def iter_tar(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Streams a WebDataset tar as (key, {ext: bytes}) samples, holding one sample in memory at a time.

    A sample is a run of consecutive members with the same key (WebDataset's rule; its writers keep a
    sample's files together); a repeated key.ext starts another sample, as in WebDataset, and never
    overwrites the first. On a read error (truncated or not a tar) the samples read so far are
    yielded and the generator returns the error text (``StopIteration.value``; None when the tar is whole).
    """
    key, files, error = None, {}, None
    try:
        with tarfile.open(path, mode="r|*") as tf:  # stream mode: members are read once, in order
            for member in tf:
                if not member.isfile():
                    continue
                k, ext = _split_key(member.name)
                # Hidden files (e.g. macOS "._x.jpg" resource forks) and WebDataset "__x__" metadata
                # are not samples; a key that merely starts with "_" is one.
                base = os.path.basename(member.name)
                if not ext or base.startswith(".") or (base.startswith("__") and base.split(".")[0].endswith("__")):
                    continue
                f = tf.extractfile(member)
                data = f.read() if f is not None else b""
                if files and (k != key or ext in files):
                    yield key, files
                    files = {}
                key = k
                files[ext] = data
            end = tf.offset
        # tarfile's stream mode takes a cut header, or a cut between members, for the end of the archive;
        # a whole tar ends in two zero blocks there.
        with open(path, "rb") as f:
            f.seek(end)
            if f.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
                raise tarfile.ReadError(f"truncated: no end-of-archive marker after byte {end}")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
    if files:
        yield key, files
    return error


def caption_from_files(files: dict[str, bytes]) -> tuple[bytes, str]:
    """Picks (image bytes, caption) from one WebDataset sample, or raises SampleError."""
    image = next((files[e] for e in IMAGE_EXTS if e in files), None)
    if image is None:
        raise SampleError("missing_image")
    if "txt" in files:
        raw = files["txt"]
    elif "json" in files:
        meta = _json_or_error(files["json"])
        cap = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
        if cap is None:
            raise SampleError("missing_caption")
        if not isinstance(cap, str):
            raise SampleError("bad_json", "caption is not a string")
        return image, cap
    else:
        raise SampleError("missing_caption")
    return image, _utf8(raw)


def interleaved_from_record(doc) -> tuple[list, list[bytes]]:
    """An OBELICS-style record ({"texts": [str | None], "image_info": [{"image_base64": ...} | None]},
    one entry per document position) -> (parts: text str or None for an image, image bytes in order).

    As the original: a position without image data is a text position; images of width or height 1
    are dropped with their position. Raises SampleError for malformed records and undecodable images."""
    import base64
    import binascii

    from PIL import Image

    if not isinstance(doc, dict) or not isinstance(doc.get("texts"), list):
        raise SampleError("bad_json", "interleaved record needs a 'texts' list")
    texts, infos = doc["texts"], doc.get("image_info")
    if not isinstance(infos, list) or len(infos) != len(texts):
        raise SampleError("bad_json", "'image_info' must be a list as long as 'texts'")
    parts, images = [], []
    for text, info in zip(texts, infos):
        if isinstance(info, dict) and info.get("image_base64"):
            try:
                data = base64.b64decode(info["image_base64"], validate=True)
                with Image.open(io.BytesIO(data)) as im:
                    size = im.size
            except (binascii.Error, ValueError, TypeError) as e:
                raise SampleError("corrupt_image", f"bad base64: {e}") from None
            except Exception as e:  # PIL raises many types
                raise SampleError("corrupt_image", f"{type(e).__name__}: {e}") from None
            if 1 in size:
                continue
            parts.append(None)
            images.append(data)
        elif isinstance(text, str):
            parts.append(text)
        elif text is not None:
            raise SampleError("bad_json", f"text entry is {type(text).__name__}, not a string")
    return parts, images


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleError("bad_utf8", str(e)) from None


def _json_or_error(raw: bytes):
    try:
        return json.loads(_utf8(raw))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, over-long ints, deep nesting
        raise SampleError("bad_json", f"{type(e).__name__}: {e}") from None


def iter_json_records(path: str, errors: list):
    """Streams a .json list or a .jsonl file: yields (key, entry | SampleError), keys ``file:index``.

    Memory stays bounded whatever the file size: .jsonl is read line by line and a .json list is
    parsed incrementally (ijson), one sample at a time. A file-level problem (unreadable, not a list,
    a syntax error part way) ends the stream and is appended to ``errors``; the samples before it
    were yielded."""
    name = os.path.basename(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        errors.append(f"{type(e).__name__}: {e}")
        return
    with f:
        if path.lower().endswith(".jsonl"):
            i = 0
            try:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        yield f"{name}:{i}", _json_or_error(line)
                    except SampleError as e:
                        yield f"{name}:{i}", e
                    i += 1
            except OSError as e:
                errors.append(f"{type(e).__name__}: {e}")
            return
        yield from _iter_json_list(f, name, errors)


def _iter_json_list(f, name: str, errors: list):
    import ijson

    try:
        if f.read(3) != b"\xef\xbb\xbf":  # a UTF-8 byte order mark is skipped, as json.loads does
            f.seek(0)
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        if head != b"[":
            errors.append("json file is not a list of samples" if head else "unreadable json file: empty")
            return
        f.seek(f.tell() - 1)
        for i, entry in enumerate(ijson.items(f, "item", use_float=True)):
            yield f"{name}:{i}", entry
    except (ijson.JSONError, ValueError, RecursionError, OSError) as e:  # syntax error part way, bad bytes
        errors.append(f"unreadable json file: {type(e).__name__}: {e}")


def read_json_records(path: str) -> tuple[list[tuple[str, object]], str | None]:
    """iter_json_records, collected: ([(key, entry | SampleError)], file-level error or None)."""
    errors: list = []
    out = list(iter_json_records(path, errors))
    return out, (errors[0] if errors else None)


TEXT_EXTS = (".jsonl", ".json", ".txt")


def read_text_docs(path: str, text_key: str = "text") -> tuple[list[tuple[str, object]], str | None]:
    """Text mode: .jsonl (one {text_key: str} per line), .json (a list of them) or .txt (one document
    per non-empty line). Any other file is a shard error: read as lines, a tar shard or a parquet file
    would become garbage documents."""
    if not path.lower().endswith(TEXT_EXTS):
        return [], f"text mode reads {', '.join(TEXT_EXTS)} files, not {os.path.basename(path)!r}"
    if path.lower().endswith((".jsonl", ".json")):
        records, err = read_json_records(path)
        out = []
        for key, r in records:
            if isinstance(r, SampleError):
                out.append((key, r))
            elif not isinstance(r, dict) or not isinstance(r.get(text_key), str):
                out.append((key, SampleError("empty_text", f"no string field {text_key!r}")))
            else:
                out.append((key, r[text_key]))
        return out, err
    try:
        with open(path, "rb") as f:
            lines = [l.removesuffix(b"\r") for l in f.read().split(b"\n") if l.strip()]  # LF or CRLF
    except OSError as e:
        return [], f"{type(e).__name__}: {e}"
    name = os.path.basename(path)
    out = []
    for i, line in enumerate(lines):
        try:
            out.append((f"{name}:{i}", _utf8(line)))
        except SampleError as e:
            out.append((f"{name}:{i}", e))
    return out, None


def prepare_image(data: bytes, size: int, fmt: str = "jpeg", quality: int = 95, strategy: str = "squash",
                  alpha: str = "white", pre_squash: str = "none") -> bytes:
    """Decodes, makes RGB and size×size (transforms.to_square: squash by default, the original's
    'resize-naive', docs/original_system.md §1), re-encodes."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = transforms.to_square(im, size, strategy, alpha, pre_squash)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise SampleError("corrupt_image", f"{type(e).__name__}: {e}") from None
    out = io.BytesIO()
    if fmt == "jpeg":
        im.save(out, format="JPEG", quality=quality, subsampling=0)
    elif fmt == "png":
        im.save(out, format="PNG", compress_level=1)
    else:
        raise ValueError(f"image format must be jpeg or png, got {fmt!r}")
    return out.getvalue()
