"""Injected latents-cache faults: non-finite or changed latents, damaged files, a full disk, two writers, signals.
Every fault is an FplusError naming the file and what to do, and the work already done is never lost."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fplus.data.lerobot import LeRobotDataset
from fplus.doctor import check_latents
from fplus.errors import FplusError
from fplus.world import cache
from fplus.world.cache import (
    CONTENT_HASH,
    LATENTS,
    MANIFEST,
    PROGRESS,
    LatentsCorrupt,
    LatentsInterrupted,
    compute_latents,
    content_hash,
    load_latents,
    read_manifest,
)
from fplus.world.encoders import build_encoder
from tests.helpers import CAM, toy_settings, write_toy_dataset

RECOMPUTE = "recompute with `fplus latents --overwrite`"
FPLUS = str(Path(sys.executable).with_name("fplus"))
N = 57  # frames of the toy dataset (episodes of 12, 9, 15, 11, 10)


def encoder():
    return build_encoder("dino", dino_model="tiny", vjepa_model="tiny", pooling="cls", temporal_window=1)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy dataset and a clean, finished cache of it (batch size 8)."""
    root = tmp_path_factory.mktemp("cache-faults")
    ds = write_toy_dataset(root / "ds")
    result = compute_latents(ds, CAM, encoder(), root / "clean", batch_size=8, progress=False)
    return ds, result.entry


@pytest.fixture
def entry(toy, tmp_path):
    """A copy of the finished cache (its entry directory) to damage."""
    ds, clean = toy
    copy = tmp_path / "cache" / clean.relative_to(clean.parents[2])
    shutil.copytree(clean, copy)
    return copy


def manifest_of(entry: Path) -> dict:
    return json.loads((entry / MANIFEST).read_text())


def leftovers(entry: Path) -> list[str]:
    """Temporary or partial files in an entry (write_text_atomic's `.name.tmp-PID`)."""
    return sorted(p.name for p in entry.iterdir() if ".tmp" in p.name)


def test_a_finished_cache_records_its_content_hash(toy):
    ds, clean = toy
    manifest = read_manifest(clean)
    assert manifest[CONTENT_HASH] == content_hash(clean / LATENTS)
    import hashlib

    assert manifest[CONTENT_HASH] == hashlib.sha256((clean / LATENTS).read_bytes()).hexdigest()
    z = load_latents(clean, ds, CAM)
    assert z.shape == (N, 32) and z.dtype == np.float16
    np.testing.assert_array_equal(z, np.load(clean / LATENTS))  # what was hashed is what is served


def test_content_hash_reads_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "HASH_CHUNK_BYTES", 7)
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 3)
    import hashlib

    assert content_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# ----- damaged or changed latents --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_rows_are_refused_on_load(toy, entry, value):
    ds, _ = toy
    z = np.load(entry / LATENTS)
    z[25, 3] = value  # episode 2 (rows 21..35) frame 4
    z[40] = value
    np.save(entry / LATENTS, z)
    with pytest.raises(LatentsCorrupt) as err:
        load_latents(entry, ds, CAM)
    assert str(err.value) == (f"{entry / LATENTS}: 2 rows of latents hold non-finite values (NaN/inf), first at "
                              f"frame 25 (episode 2 frame 4): {RECOMPUTE}")
    # doctor: a damaged cache is a failed check (a missing one only warns: the matrix computes it)
    [check] = check_latents(toy_settings(entry.parents[3], ds.root, CACHE_DIR=entry.parents[2]), ds, True)
    assert check.status == "fail" and "non-finite" in check.detail


def test_changed_bytes_fail_the_content_hash(toy, entry):
    ds, clean = toy
    z = np.load(entry / LATENTS)
    z[10:12] = np.float16(0.5)  # finite: only the hash can tell
    np.save(entry / LATENTS, z)
    expected = (f"{entry / LATENTS} does not match its manifest's content hash (changed or corrupt since it was "
                f"written): {RECOMPUTE}")
    with pytest.raises(LatentsCorrupt, match=re.escape(expected)):
        load_latents(entry, ds, CAM)
    # a second `fplus latents` does not call it complete either
    with pytest.raises(LatentsCorrupt, match=re.escape(expected)):
        compute_latents(ds, CAM, encoder(), entry.parents[2], batch_size=8, progress=False)
    result = compute_latents(ds, CAM, encoder(), entry.parents[2], batch_size=8, overwrite=True, progress=False)
    assert result.status == "computed" and load_latents(entry, ds, CAM).shape == (N, 32)
    assert (entry / LATENTS).read_bytes() == (clean / LATENTS).read_bytes()  # the original latents, recomputed


def test_truncated_latents_name_both_sizes(toy, entry):
    ds, _ = toy
    raw = (entry / LATENTS).read_bytes()
    (entry / LATENTS).write_bytes(raw[:-1000])
    with pytest.raises(LatentsCorrupt, match=rf"^{re.escape(str(entry / LATENTS))}: truncated: {len(raw) - 1000} "
                                             rf"bytes, expected {len(raw)} for \({N}, 32\) float16: "
                                             rf"{re.escape(RECOMPUTE)}$"):
        load_latents(entry, ds, CAM)
    (entry / LATENTS).write_bytes(b"garbage" * 20)
    with pytest.raises(LatentsCorrupt, match=rf"{re.escape(str(entry / LATENTS))}: not a readable \.npy file "
                                             r"\(the magic string is not correct"):
        load_latents(entry, ds, CAM)
    (entry / LATENTS).unlink()
    with pytest.raises(LatentsCorrupt, match=rf"{re.escape(str(entry / LATENTS))} is missing: "):
        load_latents(entry, ds, CAM)


def test_a_cache_without_content_hash_is_refused(toy, entry):
    ds, clean = toy
    manifest = manifest_of(entry)
    del manifest[CONTENT_HASH]  # as an older fplus wrote it
    (entry / MANIFEST).write_text(json.dumps(manifest))
    expected = (f"{entry / MANIFEST} has no content hash (written by an older fplus), so {entry / LATENTS} cannot "
                f"be verified: {RECOMPUTE}")
    with pytest.raises(LatentsCorrupt, match=re.escape(expected)):
        load_latents(entry, ds, CAM)
    with pytest.raises(LatentsCorrupt, match=re.escape(expected)):
        compute_latents(ds, CAM, encoder(), entry.parents[2], batch_size=8, progress=False)
    compute_latents(ds, CAM, encoder(), entry.parents[2], batch_size=8, overwrite=True, progress=False)
    assert manifest_of(entry)[CONTENT_HASH] == content_hash(clean / LATENTS)  # the same bytes, now with a hash
    assert load_latents(entry, ds, CAM).shape == (N, 32)


@pytest.mark.parametrize(("damage", "pattern"), [
    (lambda t: t[: len(t) // 2], r"truncated JSON \(the file ends early\) at line \d+ column \d+"),
    (lambda t: t.replace('"dim": 32', '"dim": 3 2'), r"invalid JSON \(Expecting ',' delimiter\) at line \d+ "
                                                     r"column \d+"),
    (lambda t: "\udcff" + t, r"not UTF-8 text \(byte 0xff at line 1 column 1\)"),
    (lambda t: "[]", r"expected a JSON object, got a list"),
])
def test_damaged_manifest_names_file_and_line(toy, entry, tmp_path, damage, pattern):
    ds, _ = toy
    (entry / MANIFEST).write_bytes(damage((entry / MANIFEST).read_text()).encode("utf-8", "surrogateescape"))
    expected = rf"^{re.escape(str(entry / MANIFEST))}: {pattern}; the latents manifest is damaged: " \
               rf"{re.escape(RECOMPUTE)}$"
    with pytest.raises(LatentsCorrupt, match=expected):
        load_latents(entry, ds, CAM)
    out = subprocess.run([FPLUS, "latents", "info", str(entry)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "400"})
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert re.search(expected[1:-1], out.stderr), out.stderr


def test_manifest_missing_a_field(toy, entry):
    ds, _ = toy
    manifest = manifest_of(entry)
    del manifest["dim"]
    (entry / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LatentsCorrupt, match=rf"{re.escape(str(entry / MANIFEST))}: field 'dim' is missing"):
        load_latents(entry, ds, CAM)


def test_damaged_progress_of_an_unfinished_run(toy, tmp_path, monkeypatch):
    ds, _ = toy
    enc = encoder()
    _interrupt_at_batch(monkeypatch, enc, 3)
    with pytest.raises(KeyboardInterrupt):
        compute_latents(ds, CAM, enc, tmp_path, batch_size=8, progress=False)
    progress = next(tmp_path.rglob(PROGRESS))
    progress.write_text('{"frames_done": ')
    with pytest.raises(FplusError, match=rf"{re.escape(str(progress))}: truncated JSON .*; the progress of the "
                                         "unfinished run is lost: pass --overwrite to start again"):
        compute_latents(ds, CAM, encoder(), tmp_path, batch_size=8, progress=False)


# ----- non-finite values from the encoder ------------------------------------------------------------------------


def _interrupt_at_batch(monkeypatch, enc, batch: int, make=None):
    """Make the encoder's `batch`-th call (1-based) raise KeyboardInterrupt, or return `make(z)`."""
    original = enc.encode_frames
    calls = {"n": 0}

    def encode(clips):
        calls["n"] += 1
        z = original(clips)
        if calls["n"] == batch:
            if make is None:
                raise KeyboardInterrupt
            return make(z)
        return z

    monkeypatch.setattr(enc, "encode_frames", encode)


def _with_nan(z):
    z = z.clone()
    z[2, 5] = float("nan")
    return z


@pytest.mark.parametrize(("make", "pattern"), [
    (_with_nan, r"the dino encoder 'tiny' returned 1 non-finite value \(NaN/inf\) for frames 16\.\.23, first at "
                r"frame 18 \(episode 1 frame 6\); nothing of this batch was written; the 16 frames before it are "
                r"kept in .*: check those frames and the encoder \(weights, --device\), then run `fplus latents` "
                r"again"),
    (lambda z: z * 1e6, r"the dino encoder 'tiny' returned values beyond the float16 range of the cache for frames "
                        r"16\.\.23 \(max \|z\| = \S+ > 65504\); nothing of this batch was written"),
])
def test_nonfinite_encoder_output_is_an_error_and_keeps_the_batches_before(toy, tmp_path, monkeypatch, make,
                                                                            pattern):
    ds, clean = toy
    enc = encoder()
    _interrupt_at_batch(monkeypatch, enc, 3, make)
    with pytest.raises(FplusError, match=pattern):
        compute_latents(ds, CAM, enc, tmp_path, batch_size=8, progress=False)
    entry = next(tmp_path.rglob(MANIFEST)).parent
    assert json.loads((entry / PROGRESS).read_text()) == {"frames_done": 16}
    assert not manifest_of(entry)["complete"] and not leftovers(entry)
    assert not np.load(entry / LATENTS)[16:].any()  # nothing of the bad batch reached the file
    result = compute_latents(ds, CAM, encoder(), tmp_path, batch_size=8, progress=False)
    assert (result.status, result.frames_computed) == ("resumed", N - 16)
    assert (entry / LATENTS).read_bytes() == (clean / LATENTS).read_bytes()


# ----- a full disk -----------------------------------------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_writing_a_batch_keeps_the_batches_done(toy, tmp_path, monkeypatch):
    ds, clean = toy
    real = cache._write_rows
    calls = {"n": 0}

    def write_rows(fd, offset, data):
        calls["n"] += 1
        if calls["n"] == 4:
            _enospc()
        real(fd, offset, data)

    monkeypatch.setattr(cache, "_write_rows", write_rows)
    with pytest.raises(FplusError) as err:
        compute_latents(ds, CAM, encoder(), tmp_path, batch_size=8, progress=False)
    entry = next(tmp_path.rglob(MANIFEST)).parent
    assert re.fullmatch(rf"disk full while writing {re.escape(str(entry / LATENTS))} \(\S+ \S+ left on that disk\); "
                        rf"the 24 of {N} frames done so far are kept in {re.escape(str(entry))} \(the unfinished "
                        r"write was discarded\): free space and run `fplus latents` again to resume", str(err.value))
    assert json.loads((entry / PROGRESS).read_text()) == {"frames_done": 24} and not leftovers(entry)
    monkeypatch.setattr(cache, "_write_rows", real)
    result = compute_latents(ds, CAM, encoder(), tmp_path, batch_size=8, progress=False)
    assert (result.status, result.frames_computed) == ("resumed", N - 24)
    assert (entry / LATENTS).read_bytes() == (clean / LATENTS).read_bytes()


def test_disk_full_writing_progress_removes_the_partial_file(toy, tmp_path, monkeypatch):
    ds, clean = toy
    real = os.fsync
    calls = {"n": 0}

    def fsync(fd):
        if ".progress.json.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            calls["n"] += 1
            if calls["n"] == 3:  # progress 0 (new entry), 8, then 16 fails
                _enospc()
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(FplusError, match=r"disk full while writing .*/progress\.json \(.*\); the 8 of 57 frames"):
        compute_latents(ds, CAM, encoder(), tmp_path, batch_size=8, progress=False)
    entry = next(tmp_path.rglob(MANIFEST)).parent
    assert json.loads((entry / PROGRESS).read_text()) == {"frames_done": 8} and not leftovers(entry)
    monkeypatch.setattr(os, "fsync", real)
    compute_latents(ds, CAM, encoder(), tmp_path, batch_size=8, progress=False)
    assert (entry / LATENTS).read_bytes() == (clean / LATENTS).read_bytes()


def test_disk_too_small_for_a_new_cache_leaves_nothing(toy, tmp_path, monkeypatch):
    ds, clean = toy
    monkeypatch.setattr(os, "posix_fallocate", _enospc)
    with pytest.raises(FplusError) as err:
        compute_latents(ds, CAM, encoder(), tmp_path, batch_size=8, progress=False)
    entry = tmp_path / clean.relative_to(clean.parents[2])
    size = (clean / LATENTS).stat().st_size
    assert re.fullmatch(rf"disk full while creating {re.escape(str(entry / LATENTS))} \({size / 1024:.1f} KiB "
                        r"needed, \S+ \S+ left on that disk\); nothing was kept: free space or set CACHE_DIR "
                        r"\(--cache-dir\) to a larger disk, then run `fplus latents` again", str(err.value))
    assert sorted(p.name for p in entry.iterdir()) == [".lock"]


# ----- one writer per entry --------------------------------------------------------------------------------------

SLOW = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
from fplus.world import encoders
build = encoders.build_encoder


def slow_build(*args, **kwargs):
    enc = build(*args, **kwargs)
    original = enc.encode_frames

    def slow(clips):
        time.sleep(float(os.environ.get("SLOW_SECONDS", "0")))
        return original(clips)

    enc.encode_frames = slow
    return enc


encoders.build_encoder = slow_build
from fplus.cli.main import main
sys.argv = ["fplus", *sys.argv[1:]]
main()
"""


def _cli(tmp_path: Path, ds: LeRobotDataset, cache_dir: Path) -> list[str]:
    """`fplus latents ...` through a script whose encoder sleeps SLOW_SECONDS per batch."""
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW)
    return [sys.executable, str(script), "latents", "--dataset", str(ds.root), "--image-key", CAM, "--source",
            "dino", "--encoder", "tiny", "--pooling", "cls", "--cache-dir", str(cache_dir), "--batch-size", "8"]


def _start_slow(args: list[str], tmp_path: Path, seconds: float = 0.3) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "SLOW_SECONDS": str(seconds), "COLUMNS": "400"})


def _wait_for_progress(cache_dir: Path, at_least: int, proc: subprocess.Popen) -> Path:
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        for path in cache_dir.rglob(PROGRESS):
            try:
                if json.loads(path.read_text())["frames_done"] >= at_least:
                    return path.parent
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.02)
    raise AssertionError(f"no progress: {proc.communicate()}")


def test_a_second_writer_fails_at_once_naming_the_holder(toy, tmp_path):
    ds, clean = toy
    args = _cli(tmp_path, ds, tmp_path / "c")
    # busy (8 s per batch of 8, 57 frames) for longer than the second command takes to start, even on a loaded machine
    holder = _start_slow(args, tmp_path, seconds=8)
    try:
        entry = _wait_for_progress(tmp_path / "c", 8, holder)
        with pytest.raises(FplusError, match=rf"^latents cache {re.escape(str(entry))} is in use by pid "
                                             rf"{holder.pid} on host \S+ since .* \(fplus latents --dataset .*\) "
                                             rf"\(lock file {re.escape(str(entry / '.lock'))}\); wait for it"):
            compute_latents(ds, CAM, encoder(), tmp_path / "c", batch_size=8, overwrite=True, progress=False)
        # it failed at once, not after waiting for the lock: the holder (8 s per batch of 8) is still at work
        assert holder.poll() is None
        assert json.loads((entry / PROGRESS).read_text())["frames_done"] < N
        second = subprocess.run([FPLUS, *args[2:]], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "COLUMNS": "400"})
        assert second.returncode == 1 and f"is in use by pid {holder.pid}" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()
    # the killed holder's progress survives; the next run takes the lock over, says so and resumes
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=400)
    result = compute_latents(ds, CAM, encoder(), tmp_path / "c", batch_size=8, progress=False, console=console)
    assert result.status == "resumed" and result.frames_computed < N
    assert console.file.getvalue() == (f"took over the lock of latents cache {entry} from pid {holder.pid}, which "
                                       "is no longer running\n")
    assert (entry / LATENTS).read_bytes() == (clean / LATENTS).read_bytes()


def test_a_finished_cache_stays_usable_after_a_failed_second_run(toy, entry, monkeypatch):
    ds, _ = toy
    before = (entry / LATENTS).read_bytes()
    enc = encoder()
    monkeypatch.setattr(enc, "revision", "another")
    with pytest.raises(FplusError, match="revision: cache has .* expected 'another'.*--overwrite"):
        compute_latents(ds, CAM, enc, entry.parents[2], batch_size=8, progress=False)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(entry / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FplusError, match=f"is in use by pid {holder.pid}"):  # even --overwrite waits its turn
            compute_latents(ds, CAM, encoder(), entry.parents[2], batch_size=8, overwrite=True, progress=False)
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.setattr(cache, "_write_rows", _enospc)  # a full disk does not matter to a finished cache
    assert compute_latents(ds, CAM, encoder(), entry.parents[2], batch_size=8, progress=False).status == "complete"
    assert (entry / LATENTS).read_bytes() == before
    assert load_latents(entry, ds, CAM).shape == (N, 32)


HOLD = """
import sys, time
from pathlib import Path
from fplus.lock import exclusive_lock
with exclusive_lock(Path(sys.argv[1]), "latents cache"):
    print("locked", flush=True)
    time.sleep(60)
"""


# ----- SIGINT / SIGTERM ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_keeps_the_progress_and_says_how_to_resume(toy, tmp_path, signum, code):
    ds, clean = toy
    args = _cli(tmp_path, ds, tmp_path / "c")
    proc = _start_slow(args, tmp_path)
    entry = _wait_for_progress(tmp_path / "c", 16, proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    done = json.loads((entry / PROGRESS).read_text())["frames_done"]
    assert 16 <= done < N and not leftovers(entry)
    name = signal.Signals(signum).name
    assert re.fullmatch(rf"interrupted: {name} after {done} of {N} frames; the {done} frames done are kept in "
                        rf"{re.escape(str(entry))}: resume with `fplus latents --dataset {re.escape(str(ds.root))} "
                        r"--image-key .* --batch-size 8`\n", stderr), stderr
    again = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                           env={**os.environ, "COLUMNS": "400"})
    assert again.returncode == 0, again.stderr
    assert f"resumed: {N - done} frames" in again.stdout
    assert (entry / LATENTS).read_bytes() == (clean / LATENTS).read_bytes()


def test_keyboard_interrupt_in_the_library_carries_the_progress(toy, tmp_path, monkeypatch):
    ds, _ = toy
    enc = encoder()
    _interrupt_at_batch(monkeypatch, enc, 4)
    with pytest.raises(LatentsInterrupted) as err:
        compute_latents(ds, CAM, enc, tmp_path, batch_size=8, progress=False)
    assert (err.value.frames_done, err.value.num_frames, err.value.signum) == (24, N, signal.SIGINT)
    assert json.loads((err.value.entry / PROGRESS).read_text()) == {"frames_done": 24}
