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
