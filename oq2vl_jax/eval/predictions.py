"""DIR/predictions.jsonl: one JSON line per answered question, appended and flushed batch by batch, so a
killed run loses at most the batch in flight and a restart skips every id already written."""

from __future__ import annotations

import json
import os

from oq2vl_jax.eval.data import DataError


def _record(line: bytes) -> dict | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and "id" in rec else None


def load(path: str, repair: bool = False) -> dict[str, dict]:
    """id -> record of every complete line. A last line cut off by a kill (not JSON) is dropped; with
    repair=True it is also cut from the file (and a missing final newline added) so that appending
    continues cleanly. A bad line elsewhere is an error."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    *complete, tail = data.split(b"\n")
    out = {}
    for n, line in enumerate(complete, 1):
        if not line.strip():
            continue
        rec = _record(line)
        if rec is None:
            raise DataError(f"{path}:{n}: not a prediction record")
        out[str(rec["id"])] = rec
    rec = _record(tail) if tail.strip() else None
    if rec is not None:
        out[str(rec["id"])] = rec
    if repair and tail:
        with open(path, "r+b") as f:
            if rec is None:
                f.truncate(len(data) - len(tail))
            else:
                f.seek(len(data))
                f.write(b"\n")
    return out


class Writer:
    """Appends records; each write() ends flushed to the OS and synced to disk."""

    def __init__(self, path: str):
        self.f = open(path, "a", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        for r in records:
            self.f.write(json.dumps(r, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()
