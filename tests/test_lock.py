"""fplus.lock: one writer per run directory / latents cache; a dead holder's lock is taken over."""

import json
import os
import subprocess
import sys
import time

import pytest

from fplus.errors import FplusError
from fplus.lock import exclusive_lock

HOLD = """
import sys, time
from pathlib import Path
from fplus.lock import exclusive_lock
with exclusive_lock(Path(sys.argv[1]), "run directory X"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_second_process_fails_at_once_naming_the_holder(tmp_path):
    lock = tmp_path / "run" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        with pytest.raises(FplusError, match=rf"run directory X is in use by pid {holder.pid} on host .* \(lock file"):
            with exclusive_lock(lock, "run directory X"):
                pass
        assert time.perf_counter() - start < 1.0
    finally:
        holder.kill()
        holder.wait()
    # the OS released the killed holder's lock: the next writer takes it over and says so
    messages = []
    with exclusive_lock(lock, "run directory X", on_stale=messages.append):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert messages == [f"took over the lock of run directory X from pid {holder.pid}, which is no longer running"]


def test_the_same_process_can_lock_again_after_release(tmp_path):
    lock = tmp_path / ".lock"
    for _ in range(2):
        with exclusive_lock(lock, "cache"):
            pass


FORK_AND_HOLD = """
import os, sys, time
from pathlib import Path
from fplus.lock import exclusive_lock
with exclusive_lock(Path(sys.argv[1]), "run directory X"):
    child = os.fork()  # like a DataLoader worker: inherits the open lock file
    if child == 0:
        time.sleep(30)
        os._exit(0)
    print(child, flush=True)
    time.sleep(30)
"""


def test_a_forked_child_of_a_killed_holder_does_not_keep_the_lock(tmp_path):
    """kill -9 of a trainer whose DataLoader workers live on for a moment: the run can be resumed at once."""
    lock = tmp_path / "run" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", FORK_AND_HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the child still runs, with the lock file open
        with exclusive_lock(lock, "run directory X"):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    finally:
        os.kill(child, 9)
