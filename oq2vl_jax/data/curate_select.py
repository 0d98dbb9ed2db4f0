"""Which scored samples the curator keeps: uid lists, thresholds, their union, exact dedup.

A readable sample is kept when
  1. its uid is in no --drop-uids list, and
  2. at least one *selector* accepts it: its uid is in a --keep-uids list, its MLM-Filter score is
     >= --min, or its SigLIP score is >= --siglip-min (the union: Open-Qwen2VL kept DataComp samples
     with MLM-Filter SU >= 85 OR in the DFN top-20M uid list). With no selector, all are accepted;
  3. with --dedup, no earlier kept sample (input order) has the same decoded pixels, and then none
     has the same uid (two passes: pixels first, uids among the survivors).
The first rule that fails names the drop reason. With one selector its failure is named
(``not_in_keep_uids``, ``below_mlm_min``, ``mlm_unparseable``, ``mlm_unscored``, ``below_siglip_min``,
``siglip_unscored``); with several it is ``not_selected``. Each selector's own pass/fail tally is kept.

uids are DataComp's: 32 hex digits in each sample's json ``uid``, compared as 128-bit numbers; uid
lists are .npy (the DataComp/DFN ``u8,u8`` pairs, an [N, 2] uint64 array or strings) or text (one
hex uid per line).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from oq2vl_jax.cli import UserError

U128 = np.dtype("u8,u8")  # (high, low) 64-bit halves, as DataComp's resharder


class UidListError(UserError, ValueError):
    """A uid list file that cannot be read; the message names the file."""


def uid_pair(uid) -> tuple[int, int] | None:
    """A DataComp uid string -> (high, low) halves, or None when it is not a hex number < 2**128."""
    if not isinstance(uid, str) or not uid:
        return None
    try:
        value = int(uid, 16)
    except ValueError:
        return None
    if not 0 <= value < 1 << 128:
        return None
    return divmod(value, 1 << 64)


def uid_pairs(uids) -> tuple[np.ndarray, np.ndarray]:
    """(U128 array, bool valid mask) for a sequence of uid strings (invalid ones become (0, 0))."""
    pairs = [uid_pair(u) for u in uids]
    valid = np.array([p is not None for p in pairs], bool)
    return np.array([p or (0, 0) for p in pairs], U128), valid


def load_uid_list(path: str) -> np.ndarray:
    """A sorted unique U128 array from a .npy or text uid list."""
    try:
        if path.endswith(".npy"):
            raw = np.load(path, allow_pickle=False)
            if raw.dtype.names and len(raw.dtype.names) == 2:
                arr = np.empty(len(raw), U128)
                arr["f0"], arr["f1"] = raw[raw.dtype.names[0]], raw[raw.dtype.names[1]]
            elif raw.ndim == 2 and raw.shape[1] == 2 and raw.dtype.kind in "ui":
                arr = np.empty(len(raw), U128)
                arr["f0"], arr["f1"] = raw[:, 0], raw[:, 1]
            elif raw.dtype.kind in "US":
                arr, ok = uid_pairs([u.decode() if isinstance(u, bytes) else str(u) for u in raw.ravel()])
                if not ok.all():
                    raise UidListError(f"{path}: entry {int(np.argmin(ok))} is not a hex uid")
            else:
                raise UidListError(f"{path}: a uid .npy holds (u8,u8) pairs, [N, 2] uint64 or strings; "
                                   f"got dtype {raw.dtype} shape {raw.shape}")
        else:
            with open(path, encoding="utf-8") as f:
                lines = [line.strip() for line in f if line.strip()]
            arr, ok = uid_pairs(lines)
            if not ok.all():
                raise UidListError(f"{path}:{int(np.argmin(ok)) + 1}: {lines[int(np.argmin(ok))][:40]!r} is not a hex uid")
    except (OSError, ValueError) as e:
        if isinstance(e, UidListError) or isinstance(e, FileNotFoundError):
            raise
        raise UidListError(f"{path}: cannot read a uid list ({type(e).__name__}: {e})") from None
    return np.unique(arr)


def in_sorted(sorted_list: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Membership of each query U128 in a sorted U128 array."""
    if len(sorted_list) == 0 or len(query) == 0:
        return np.zeros(len(query), bool)
    i = np.searchsorted(sorted_list, query)
    return sorted_list[np.minimum(i, len(sorted_list) - 1)] == query


@dataclasses.dataclass
class Selection:
    keep_uids: np.ndarray | None = None  # sorted U128, union of the --keep-uids lists
    drop_uids: np.ndarray | None = None
    mlm_min: float | None = None  # None: no MLM selector
    siglip_min: float | None = None
    dedup: bool = False


# Decision codes (int8 per sample); UNREADABLE samples are named by their status instead.
REASONS = ("kept", "drop_uids", "not_selected", "not_in_keep_uids", "below_mlm_min", "mlm_unparseable",
           "mlm_unscored", "below_siglip_min", "siglip_unscored", "duplicate_pixels", "duplicate_uid")
CODE = {name: i for i, name in enumerate(REASONS)}
UNREADABLE, OPEN = -1, -2


@dataclasses.dataclass
class Columns:
    """What the decision reads, one entry per sample in input order (numpy, vectorised)."""

    readable: np.ndarray  # bool
    uid: np.ndarray  # U128 (0, 0 where has_uid is False)
    has_uid: np.ndarray  # bool
    pixels: np.ndarray  # U128 pixel hash (meaningful where readable)
    mlm: np.ndarray | None = None  # float score, NaN where none
    mlm_generated: np.ndarray | None = None  # bool: the model produced text (NaN score = unparseable)
    siglip: np.ndarray | None = None  # float, NaN where none


def decide(cols: Columns, sel: Selection) -> tuple[np.ndarray, dict]:
    """int8 decision codes (REASONS index, or UNREADABLE) and each selector's tally for stats.json."""
    n = len(cols.readable)
    code = np.where(cols.readable, OPEN, UNREADABLE).astype(np.int8)
    if sel.drop_uids is not None:
        code[(code == OPEN) & cols.has_uid & in_sorted(sel.drop_uids, cols.uid)] = CODE["drop_uids"]
    open_ = code == OPEN

    verdicts = {}  # selector -> failure code per row (CODE["kept"] where it accepts)
    if sel.keep_uids is not None:
        ok = cols.has_uid & in_sorted(sel.keep_uids, cols.uid)
        verdicts["keep_uids"] = np.where(ok, CODE["kept"], CODE["not_in_keep_uids"])
    if sel.mlm_min is not None:
        score = cols.mlm
        why = np.where(~cols.mlm_generated, CODE["mlm_unscored"],
                       np.where(np.isnan(score), CODE["mlm_unparseable"], CODE["below_mlm_min"]))
        verdicts["mlm"] = np.where(score >= sel.mlm_min, CODE["kept"], why)
    if sel.siglip_min is not None:
        why = np.where(np.isnan(cols.siglip), CODE["siglip_unscored"], CODE["below_siglip_min"])
        verdicts["siglip"] = np.where(cols.siglip >= sel.siglip_min, CODE["kept"], why)
    tallies = {}
    if verdicts:
        accepted = np.zeros(n, bool)
        for name, v in verdicts.items():
            accepted |= v == CODE["kept"]
            values, counts = np.unique(v[open_], return_counts=True)
            tallies[name] = dict(sorted(("pass" if c == CODE["kept"] else REASONS[c], int(k))
                                        for c, k in zip(values, counts)))
        reason = next(iter(verdicts.values())) if len(verdicts) == 1 else np.full(n, CODE["not_selected"])
        rejected = open_ & ~accepted
        code[rejected] = reason[rejected]

    if sel.dedup:
        for name, keys, valid in (("duplicate_pixels", cols.pixels, cols.readable),
                                  ("duplicate_uid", cols.uid, cols.has_uid)):
            idx = np.flatnonzero((code == OPEN) & valid)
            if len(idx):
                _, first = np.unique(keys[idx], return_index=True)  # the earliest of each value
                dup = np.ones(len(idx), bool)
                dup[first] = False
                code[idx[dup]] = CODE[name]
    code[code == OPEN] = CODE["kept"]
    return code, tallies
