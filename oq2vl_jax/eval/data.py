"""Benchmark inputs: the HF-datasets parquet releases (images embedded as bytes) and a uniform jsonl.

Uniform jsonl, one question per line; `image` is a path relative to the jsonl's folder or a list of them:
    multiple choice  {"id", "image", "question", "options": [..], "answer": "B"}
    open VQA         {"id", "image", "question", "answers": [..]}
    yes/no           {"id", "image", "question", "answer": "yes"|"no"}
Any other keys (e.g. POPE's "category") are kept in Question.meta. Parquet rows are mapped to the same
Question by each benchmark's reader (benchmarks.py), which names the columns it needs.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
from typing import Any

from oq2vl_jax.cli import UserError


class DataError(UserError):
    """A benchmark file that cannot be read as the benchmark needs it."""


@dataclasses.dataclass
class Question:
    id: str
    question: str
    images: list  # each a path, raw bytes or a PIL image, in prompt order
    options: list[str] | None = None  # multiple choice: option texts, letters A, B, ... in order
    answer: str | None = None  # MC letter, "yes"/"no", or a single gold answer
    answers: list[str] | None = None  # VQA: every annotator's answer
    meta: dict = dataclasses.field(default_factory=dict)


def open_image(src, base: str = ""):
    """A PIL image from a path (relative to `base`), raw bytes, an HF-datasets image struct
    ({"bytes", "path"}) or a PIL image."""
    from PIL import Image

    if isinstance(src, dict):
        src = src.get("bytes") or (os.path.join(base, src["path"]) if src.get("path") else None)
        if src is None:
            raise ValueError("image struct has neither bytes nor path")
    if isinstance(src, (bytes, bytearray)):
        im = Image.open(io.BytesIO(src))
    elif isinstance(src, (str, os.PathLike)):
        im = Image.open(os.path.join(base, src))
    else:
        return src.convert("RGB")
    with im:
        return im.convert("RGB")


def parquet_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        if not files:
            raise DataError(f"{path}: no .parquet files in this folder")
        return files
    return [path]


def read_parquet(path: str) -> list[dict[str, Any]]:
    """Every row of a parquet file (or of all *.parquet under a folder, in sorted order) as a dict."""
    import pyarrow.parquet as pq

    rows = []
    for f in parquet_files(path):
        try:
            rows.extend(pq.read_table(f).to_pylist())
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a broken file
            raise DataError(f"{f}: not a readable parquet file ({type(e).__name__}: {e})") from None
    return rows


def _images(rec: dict, where: str) -> list:
    im = rec.get("image", rec.get("images"))
    if im is None:
        return []
    ims = [im] if isinstance(im, str) else im
    if not isinstance(ims, list) or not all(isinstance(x, str) for x in ims):
        raise DataError(f"{where}: 'image' must be a path or a list of paths, got {im!r:.100}")
    return ims


def question_from_jsonl(rec: dict, where: str) -> Question:
    """A uniform-format line as a Question (see the module docstring)."""
    if not isinstance(rec, dict) or "question" not in rec or "id" not in rec:
        raise DataError(f"{where}: a question line needs 'id' and 'question'")
    options, answer, answers = rec.get("options"), rec.get("answer"), rec.get("answers")
    if options is not None and (not isinstance(options, list) or not isinstance(answer, str)):
        raise DataError(f"{where}: a multiple-choice line has 'options': [..] and 'answer': a letter")
    if answers is not None and (not isinstance(answers, list) or not answers):
        raise DataError(f"{where}: 'answers' must be a non-empty list")
    if options is None and answers is None and not isinstance(answer, str):
        raise DataError(f"{where}: a line needs 'options'+'answer', 'answers', or 'answer'")
    known = {"id", "image", "images", "question", "options", "answer", "answers"}
    return Question(id=str(rec["id"]), question=str(rec["question"]), images=_images(rec, where),
                    options=[str(o) for o in options] if options is not None else None,
                    answer=None if answer is None else str(answer),
                    answers=None if answers is None else [str(a) for a in answers],
                    meta={k: v for k, v in rec.items() if k not in known})


def read_jsonl(path: str) -> list[Question]:
    """Questions of a uniform jsonl file; image paths are made relative to the file's folder."""
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON: {e.msg}") from None
            q = question_from_jsonl(rec, f"{path}:{n}")
            q.images = [os.path.join(base, p) for p in q.images]
            out.append(q)
    return out


def _join_images(rows: list[dict]) -> list[dict]:
    """Releases that keep images in their own table (lmms-lab GQA: question rows with `imageId`, image
    rows with `id` and `image`) read as one when both tables are given (a folder holding both): each
    question row gets its image."""
    if not any("imageId" in r and "image" not in r for r in rows):
        return rows
    images = {r["id"]: r["image"] for r in rows if "question" not in r and "image" in r}
    out = []
    for r in (r for r in rows if "question" in r):
        if r["imageId"] not in images:
            raise DataError(f"question {r.get('id')!r}: image {r['imageId']!r} is in no image table given")
        out.append({**r, "image": images[r["imageId"]]})
    return out


def read_questions(path: str, parquet_reader) -> tuple[list[Question], int]:
    """(questions, rows filtered out) from a jsonl file or parquet file/folder; `parquet_reader(row, i)`
    maps a parquet row to a Question, or None to leave it out (e.g. SEED-Bench's video questions)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"benchmark data not found: {path}")
    if path.endswith(".jsonl"):
        qs = read_jsonl(path)
        filtered = 0
    else:
        qs, filtered = [], 0
        for i, row in enumerate(_join_images(read_parquet(path))):
            try:
                q = parquet_reader(row, i)
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}: row {i}: not in the expected layout ({type(e).__name__}: {e}); "
                                "see the README for the columns this benchmark reads") from None
            if q is None:
                filtered += 1
            else:
                qs.append(q)
    if not qs:
        raise DataError(f"{path}: no questions")
    ids = [q.id for q in qs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{path}: question id {dup!r} occurs more than once")
    return qs, filtered
