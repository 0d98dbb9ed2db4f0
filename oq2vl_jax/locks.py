"""One writer per folder: an exclusive lock file naming its holder (host, PID).

    with locks.hold(workdir, "training run"):
        ...   # a second writer gets LockHeld (exit 2) naming the holder's host and PID

The lock is a file created with O_EXCL (works on shared file systems, where advisory locks may
not reach other hosts). A process killed with kill -9 leaves its file behind: when the recorded
holder ran on this host and is no longer alive (its PID is gone, or was reused by a process that
started later), the lock is taken over with a warning, so a restart needs no manual cleanup.
A lock held from another host cannot be checked from here; the error says which file to delete if
that process is gone. The check-and-take-over step runs under a short flock on a guard file so
that two restarts on one host cannot both take over the same stale lock (a flock on the folder
itself, so no second file is left behind).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time

from oq2vl_jax.cli import UserError

LOCK_FILE = ".oq2vl.lock"
log = logging.getLogger("oq2vl_jax.locks")


class LockHeld(UserError):
    """Another live process writes into the folder; the message names its host and PID."""


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])  # fields after the (comm) start at 3


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    started = _start_time(pid)
    if started is None:
        try:
            os.kill(pid, 0)  # no /proc (not Linux): existence only
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # A PID reused by an unrelated process has a different start time.
    return holder.get("start") in (None, started)


def _me(what: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
            "what": what, "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # empty or garbled: its writer died between creating and writing it


@contextlib.contextmanager
def _guard(folder: str):
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


class Lock:
    def __init__(self, folder: str, what: str, name: str = LOCK_FILE):
        self.folder, self.what = os.path.abspath(folder), what
        self.path = os.path.join(self.folder, name)
        self.held = False

    def acquire(self) -> "Lock":
        os.makedirs(self.folder, exist_ok=True)
        me = _me(self.what)
        with _guard(self.folder):
            holder = _read(self.path)
            if holder is not None:
                same_host = holder.get("host") == me["host"]
                if holder and not same_host:
                    raise LockHeld(f"{self.folder} is in use by {holder.get('what', 'another process')} on host "
                                   f"{holder.get('host')} (PID {holder.get('pid')}, since {holder.get('since')}); "
                                   f"if that process is gone, delete {self.path}")
                if holder and _alive(holder):
                    raise LockHeld(f"{self.folder} is in use by {holder.get('what', 'another process')} "
                                   f"(host {holder.get('host')}, PID {holder.get('pid')}, since "
                                   f"{holder.get('since')})")
                log.warning("taking over the lock on %s left by %s (host %s, PID %s), which is no longer running",
                            self.folder, holder.get("what", "a process"), holder.get("host"), holder.get("pid"))
                os.remove(self.path)
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
        self.held = True
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with _guard(self.folder):
            holder = _read(self.path)
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                os.remove(self.path)

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def hold(folder: str, what: str) -> Lock:
    """A context manager holding `folder`'s lock (created with the folder if needed)."""
    return Lock(folder, what)


def hold_beside(target: str, what: str) -> Lock:
    """The lock of a folder that gets replaced as a whole (an export): PARENT/.NAME.lock."""
    target = os.path.abspath(target)
    return Lock(os.path.dirname(target), what, name=f".{os.path.basename(target)}.lock")
