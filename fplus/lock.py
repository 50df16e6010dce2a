"""One writer at a time: an exclusive OS file lock with the holder's pid, host and command recorded (DESIGN 12).

    with exclusive_lock(run_dir / ".lock", f"run directory {run_dir}", on_stale=print):
        ...   # train / resume

The lock is a POSIX record lock (`fcntl.lockf`) on the lock file: the OS releases it when the holder exits, however
it exits (kill -9 included), so a lock can never outlive its process; unlike `flock`, it is not inherited by
forked children (DataLoader workers), so a worker that outlives a killed trainer for a few seconds does not keep
the run locked. The file itself stays, holding the last holder's details; a
new holder that finds details of a process that is gone reports it through `on_stale` ("took over the lock of pid
1234, which is no longer running") and writes its own. A second process while the first runs fails at once with
an FplusError naming the holder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fplus.errors import FplusError

LOCK_FILE = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        holder = json.loads(raw.decode()) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        holder = {}
    return holder if isinstance(holder, dict) else {}


def describe(holder: dict) -> str:
    """ "pid 1234 on host gpu-01 since 2026-12-01 08:00:00 (fplus train ...)" from a lock file's details."""
    if not holder:
        return "another process (no details recorded)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    command = f" ({holder['command']})" if holder.get("command") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {since}{command}"


@contextmanager
def exclusive_lock(path: Path, what: str, on_stale: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created with its parent directory) for the block.

    Args:
        what: what the lock protects, for messages ("run directory runs/E2").
        on_stale: called with a message when the previous holder recorded in the file is a dead process.
    Raises:
        FplusError: another live process holds the lock (its pid, host, start time and command are named).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _read_holder(fd)
            raise FplusError(f"{what} is in use by {describe(holder)} (lock file {path}); wait for it to finish "
                             "or stop it first") from None
        previous = _read_holder(fd)
        host = socket.gethostname()
        if previous.get("pid") and previous.get("pid") != os.getpid() and previous.get("host") == host \
                and not _alive(int(previous["pid"])) and on_stale is not None:
            on_stale(f"took over the lock of {what} from pid {previous['pid']}, which is no longer running")
        details = {"pid": os.getpid(), "host": host, "since": time.time(),
                   "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(details).encode())
        os.fsync(fd)
        yield
    finally:
        try:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
