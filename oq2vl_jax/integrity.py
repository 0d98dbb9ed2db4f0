"""Checkpoint integrity: a manifest of checksums written with each save, verified before a restore.

    checkpoints/<step>/integrity.json   {"algorithm": "xxh3_64", "files": {relpath: [size, hex digest]}}

Every file Orbax writes for the step (params, optimiser state, meta, data iterator) is checksummed,
so every array's bytes are covered whatever the mesh or number of processes that wrote them, and a
reader can verify a checkpoint without restoring it. Async saves write the manifest in Orbax's
post-finalisation callback, i.e. into the temporary directory just before Orbax renames it to
`<step>`: a checkpoint that is visible as complete carries its manifest. Sync saves write it right
after the save returns.

On resume, `latest_good_step` walks the steps from the newest down: a step whose files do not match
its manifest, or that lacks one while an older step has one (a save cut off after Orbax's rename),
is moved to WORKDIR/damaged/ with a warning naming it, and the next older step is tried.
Checkpoints saved before manifests existed (none has one) are used as they are.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import logging
import os
import shutil
import time

from oq2vl_jax.cli import UserError

MANIFEST = "integrity.json"
ALGORITHM = "xxh3_64"
# Orbax rewrites this one when it commits the step (a timestamp), after the manifest is written.
_REWRITTEN = ("_CHECKPOINT_METADATA",)
DAMAGED_DIR = "damaged"
_CHUNK = 64 << 20
log = logging.getLogger("oq2vl_jax.integrity")


class CheckpointDamaged(UserError):
    """A checkpoint's files do not match its manifest; the message names the first bad file."""


def file_digest(path: str) -> str:
    """xxh3_64 of a file (non-cryptographic: it guards against damage, not tampering), read in 64 MiB
    chunks; files are hashed in parallel threads."""
    import xxhash

    h = xxhash.xxh3_64()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(min(_CHUNK, max(os.fstat(f.fileno()).st_size, 1)))
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _files(step_dir: str) -> list[str]:
    out = []
    for root, _, names in os.walk(step_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), step_dir)
            if rel != MANIFEST and n not in _REWRITTEN:
                out.append(rel)
    return sorted(out)


def compute(step_dir: str, threads: int = 8) -> dict:
    files = _files(step_dir)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        digests = list(pool.map(lambda r: file_digest(os.path.join(step_dir, r)), files))
    return {"algorithm": ALGORITHM, "files": {r: [os.path.getsize(os.path.join(step_dir, r)), d]
                                             for r, d in zip(files, digests)}}


def write_manifest(step_dir: str) -> float:
    """Checksums every file under `step_dir` into step_dir/integrity.json; returns the seconds taken."""
    t0 = time.perf_counter()
    manifest = compute(step_dir)
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))
    return time.perf_counter() - t0


def has_manifest(step_dir: str) -> bool:
    return os.path.isfile(os.path.join(step_dir, MANIFEST))


def problem(step_dir: str) -> str | None:
    """What is wrong with the checkpoint at `step_dir` ('' = no manifest), None if it verifies."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(path):
        return ""
    try:
        with open(path) as f:
            manifest = json.load(f)
        want, algorithm = manifest["files"], manifest["algorithm"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({type(e).__name__})"
    if algorithm != ALGORITHM:
        return f"{MANIFEST} uses {algorithm!r}, this version checks {ALGORITHM!r}"
    for rel, (size, _) in sorted(want.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, {size} when saved"
    got = compute(step_dir)["files"]
    for rel, (size, digest) in sorted(want.items()):
        if got[rel][1] != digest:
            return f"{rel} does not match its checksum (changed on disk since the save)"
    return None


def verify(step_dir: str) -> None:
    """Raises CheckpointDamaged if `step_dir` has a manifest its files do not match (readers)."""
    bad = problem(step_dir)
    if bad:
        raise CheckpointDamaged(f"checkpoint {step_dir} is damaged: {bad}")


def move_aside(run_dir: str, step_dir: str, reason: str) -> str:
    dest_root = os.path.join(os.path.abspath(run_dir), DAMAGED_DIR)
    os.makedirs(dest_root, exist_ok=True)
    dest = os.path.join(dest_root, f"{os.path.basename(step_dir)}-{time.strftime('%Y%m%d-%H%M%S')}")
    while os.path.exists(dest):
        dest += "_"
    shutil.move(step_dir, dest)
    log.warning("checkpoint %s is damaged or incomplete (%s): moved to %s; resuming from the previous one",
                step_dir, reason, dest)
    return dest


def latest_good_step(run_dir: str, steps, checkpoint_dir: str) -> int | None:
    """The newest step that verifies, moving damaged or incomplete newer ones aside (main process).
    If none verifies, nothing is moved and CheckpointDamaged is raised: starting afresh in a workdir
    whose checkpoints are all damaged must be the user's decision."""
    steps = sorted(steps, reverse=True)
    if not steps:
        return None
    dirs = {s: os.path.join(checkpoint_dir, str(s)) for s in steps}
    bad = []
    for i, s in enumerate(steps):
        why = problem(dirs[s])
        older_has_manifest = any(has_manifest(dirs[t]) for t in steps[i + 1:])
        if why is None or (why == "" and not older_has_manifest):  # no manifest anywhere older: legacy
            break
        bad.append((s, why or f"no {MANIFEST}: the save did not complete"))
    else:
        raise CheckpointDamaged(f"no intact checkpoint under {checkpoint_dir}: " +
                                "; ".join(f"{s}: {why}" for s, why in bad[:3]) +
                                " (move them away to start afresh)")
    for s, why in bad:
        move_aside(run_dir, dirs[s], why)
    return steps[len(bad)]


def in_flight_dir(checkpoint_dir: str, step: int) -> str | None:
    """The temporary directory of an async save of `step` before Orbax renames it (see module doc)."""
    hits = glob.glob(os.path.join(glob.escape(checkpoint_dir), f"{step}.orbax-checkpoint-tmp*"))
    return hits[0] if len(hits) == 1 else None


class Manifests:
    """Writes each save's manifest at the right moment (see module doc); one per checkpoint manager.

        m = Manifests(ckpt_dir, async_save, main_process)
        mngr = make_manager(..., on_finalized=m.on_finalized)
        m.before_save(step); mngr.save(step, ...); m.after_save(step)
    """

    def __init__(self, checkpoint_dir: str, async_save: bool, main_process: bool = True):
        self.dir, self.async_save, self.main = checkpoint_dir, async_save, main_process
        self.pending: list[int] = []  # async saves run one at a time, in order
        self.seconds: list[float] = []

    def before_save(self, step: int) -> None:
        if self.async_save and self.main:
            self.pending.append(step)

    def after_save(self, step: int) -> None:
        if not self.async_save and self.main:
            self._write(os.path.join(self.dir, str(step)))

    def on_finalized(self) -> None:
        if not self.pending:
            return
        step = self.pending.pop(0)
        d = in_flight_dir(self.dir, step)
        if d is None:
            d = os.path.join(self.dir, str(step))
            if not os.path.isdir(d):  # resume will treat it as incomplete and use the previous step
                log.warning("no directory found for the save of step %d: no integrity manifest written", step)
                return
        self._write(d)

    def _write(self, step_dir: str) -> None:
        self.seconds.append(write_manifest(step_dir))
        log.debug("checksummed %s in %.2fs", step_dir, self.seconds[-1])


def resume_step(mngr, run_dir: str) -> int | None:
    """The step a training run resumes from: the newest that verifies (see latest_good_step).
    The main process checks and moves; every process gets its answer and re-reads the step list."""
    import jax
    import numpy as np

    steps = list(mngr.all_steps())
    if not steps:
        return None
    step = -1
    if jax.process_index() == 0:
        good = latest_good_step(run_dir, steps, os.path.join(os.path.abspath(run_dir), "checkpoints"))
        step = -1 if good is None else good
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        step = int(multihost_utils.broadcast_one_to_all(np.int32(step)))
    if step != max(steps):
        mngr.reload()  # newer steps were moved aside
    return None if step < 0 else step
