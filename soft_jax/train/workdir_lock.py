"""One trainer per work dir: a lock file naming the holder's host and PID.

The lock is an advisory `flock` on `WORKDIR/train.lock`: the kernel (or the NFS server) drops
it when the holder's process ends, however it ends (SIGKILL included), so a dead holder can
never keep the work dir. The file's contents (host, PID, start time) only name the holder:
a second trainer quotes them in its error, and a trainer that finds them left behind by a
holder that is gone says it takes over that stale lock. Readers (generate, convert, eval)
never look at the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from soft_jax.utils.log import log

LOCK_FILE = "train.lock"


class WorkdirLocked(ValueError):
    """Another live trainer holds the work dir (bad input for the CLI: exit 2)."""


def _holder(fd: int) -> dict:
    """What the lock file says about its (last) holder; {} when it says nothing."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        data = json.loads(os.read(fd, 4096) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {since}"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _stale_note(holder: dict) -> str:
    """The note a trainer logs when it takes over a lock file a gone holder left behind."""
    gone = ("is no longer running" if holder.get("host") == socket.gethostname()
            and not _pid_alive(holder.get("pid")) else "no longer holds it")
    return f"taking over the stale work-dir lock of {_describe(holder)} (that trainer {gone})"


class WorkdirLock:
    """The held lock of one work dir; `release` (or process exit) frees it."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    def release(self) -> None:
        """Clear the holder's name from the file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def acquire(workdir: Path) -> WorkdirLock:
    """Take `workdir`'s lock for this process, or raise WorkdirLocked naming the live holder
    (the lock file is then left exactly as it was). A filesystem without locks gets a warning
    and no lock."""
    path = Path(workdir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no truncation: it may be another's
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise WorkdirLocked(
            f"work dir {str(workdir)!r} is in use by another trainer ({_describe(holder)}; "
            f"lock file {path.name}): one trainer per work dir, so wait for it, stop it or "
            "choose another config.workdir") from None
    except OSError as e:  # e.g. an NFS mount without a lock daemon
        os.close(fd)
        log(f"warning: cannot lock work dir {str(workdir)!r} ({e.strerror}); nothing stops "
            "a second trainer from using it at the same time")
        return WorkdirLock(path, None)
    previous = _holder(fd)
    if previous:
        log(_stale_note(previous))
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    return WorkdirLock(path, fd)
