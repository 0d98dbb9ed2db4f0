"""Storage failures (disk full, read-only file system) as one named line instead of a traceback.

    with failures.writing(workdir):   # an ENOSPC anywhere inside -> DiskFull naming path + free space
        ...

Orbax and TensorStore report a full disk wrapped in their own exception types, often without the
path; the whole cause chain is searched, and `where` names the folder when the error does not.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil

from oq2vl_jax.cli import UserError

_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded")
_READ_ONLY_TEXT = "Read-only file system"


class DiskFull(UserError):
    """No space (or quota) left where the job writes; names the path and the free space."""


class ReadOnly(UserError):
    """The job must write into a read-only path."""


def free_bytes(path: str) -> int | None:
    p = os.path.abspath(path)
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _human(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def as_user_error(e: BaseException, where: str) -> UserError | None:
    """DiskFull / ReadOnly for a storage failure anywhere in `e`'s cause chain, else None."""
    for x in _chain(e):
        path = getattr(x, "filename", None) if isinstance(x, OSError) else None
        code = x.errno if isinstance(x, OSError) else None
        text = str(x)
        if code in _FULL or any(t in text for t in _FULL_TEXT):
            path = path or where
            return DiskFull(f"disk full writing {path}: {_human(free_bytes(path))} free on its file system")
        if code == errno.EROFS or _READ_ONLY_TEXT in text:
            return ReadOnly(f"{path or where} is on a read-only file system")
    return None


@contextlib.contextmanager
def writing(where: str):
    """Re-raises a storage failure inside as DiskFull / ReadOnly (one line, exit 2)."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 (anything else propagates unchanged)
        user = as_user_error(e, where)
        if user is None:
            raise
        raise user from e
