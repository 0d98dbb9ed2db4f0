"""Writing a whole output folder so that it never mixes with what the folder held before.

    check_target(out, overwrite)            # early: refuse a non-empty OUT without --overwrite
    with staged_dir(out, overwrite, "an export") as tmp:
        ...write everything into tmp...      # on success tmp replaces OUT; on failure it is deleted

The new folder is built beside OUT (same file system, so the swap is two renames) under a lock
naming the writer; an old OUT is renamed away first and deleted once the new one is in place.
A run killed between the two renames leaves PARENT/.OUT.old-*/x; the next run puts it back first.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import tempfile

from oq2vl_jax import locks
from oq2vl_jax.cli import UserError

log = logging.getLogger("oq2vl_jax.staging")


class OutputNotEmpty(UserError, ValueError):
    """The output folder holds files and --overwrite was not given."""


def check_target(target: str, overwrite: bool) -> None:
    target = os.path.abspath(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise OutputNotEmpty(f"--out {target} exists and is not a folder")
    if not overwrite and os.path.isdir(target) and os.listdir(target):
        raise OutputNotEmpty(f"--out {target} is not empty; pass --overwrite to replace its contents "
                             "(files left from an earlier export would otherwise mix with the new ones)")


def _recover(parent: str, name: str, target: str) -> None:
    """Leftovers of a killed run: a half-built tmp folder (deleted), an old OUT renamed away (restored)."""
    for d in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.tmp-*")):
        shutil.rmtree(d, ignore_errors=True)
    old = sorted(glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.old-*")))
    for d in old:
        kept = os.path.join(d, "x")
        if os.path.isdir(kept) and not os.path.exists(target):
            os.rename(kept, target)
            log.warning("restored %s from %s (an earlier run was killed while replacing it)", target, d)
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: str, overwrite: bool, what: str):
    target = os.path.abspath(target)
    parent, name = os.path.dirname(target), os.path.basename(target)
    os.makedirs(parent, exist_ok=True)
    with locks.hold_beside(target, what):
        _recover(parent, name, target)
        check_target(target, overwrite)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        try:
            yield tmp
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            if os.path.exists(target):
                old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
                os.rename(target, os.path.join(old, "x"))  # rename into a fresh dir: no name race
                os.rename(tmp, target)
                shutil.rmtree(old)
            else:
                os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
