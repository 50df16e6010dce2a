"""The world-latent cache: one fp16 array (N_frames, D) per dataset x image key x encoder, plus `manifest.json`.

Layout: CACHE_DIR/<dataset name>-<hash of its id>/<image key>/<source>-<encoder>[-<pooling>|-m<window>]/
    latents.npy     (N, D) float16, row i = latent of the dataset's frame with global index i
    manifest.json   dataset id + fingerprint, image key, encoder id + revision, window, dim, frame count, ...,
                    and (once complete) content_sha256: the sha256 of latents.npy's bytes
    progress.json   only while unfinished: how many leading frames are done
    .lock           the OS lock of the one process writing the entry (fplus.lock), with its pid and command

Precompute is batched and resumable: batches start at multiples of the batch size, each finished batch is written
and fsync'd before progress.json moves past it (atomic rename), so a killed or interrupted run resumes at the first
unfinished batch and ends with the same bytes as an uninterrupted run. latents.npy is allocated in full when an
entry starts (a disk too small fails at once) and written with pwrite, so a full disk is an error naming the file,
never a SIGBUS. Every batch is checked for NaN/inf before it is written.

A mixture of datasets (fplus.data.mixture) has no entry of its own: each member has its entry, and
`find_dataset_latents` concatenates the members' latents in mixture row order.

Loading (`load_latents`) checks the manifest against the dataset, the file's size and header, that every value is
finite, and the content hash: a cache changed or damaged since it was written is refused, as is one written before
fplus recorded content hashes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from fplus.data import format as fmt
from fplus.data.lerobot import LeRobotDataset
from fplus.data.mixture import members_of
from fplus.data.windows import causal_window, episode_bounds
from fplus.errors import DataError, FplusError
from fplus.io import file_sha256, write_text_atomic
from fplus.lock import exclusive_lock

MANIFEST = "manifest.json"
LATENTS = "latents.npy"
PROGRESS = "progress.json"
LOCK = ".lock"
CONTENT_HASH = "content_sha256"
HASH_CHUNK_BYTES = 8 * 2**20
RECOMPUTE = "recompute with `fplus latents --overwrite`"
# Fields every manifest has (the rest of IDENTITY is compared where asked for).
REQUIRED = ("dataset", "image_key", "source", "encoder_id", "dim", "num_frames", "temporal_window", "complete")


class LatentsCorrupt(DataError):
    """A cache entry whose files are damaged, changed since written, non-finite or unverifiable (recompute it)."""
# Fields that must agree between a cache and what is asked of it.
IDENTITY = ("dataset", "dataset_fingerprint", "image_key", "source", "encoder_id", "revision", "temporal_window",
            "dim", "num_frames", "pooling", "preprocess", "dtype")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", text).strip("-")


def dataset_id(ds: LeRobotDataset) -> str:
    """The hub repo id, or the absolute local path."""
    return ds.repo_id or str(ds.root.resolve())


def cache_entry(cache_dir: Path, ds: LeRobotDataset, image_key: str, source: str, encoder_id: str,
                pooling: str | None, temporal_window: int) -> Path:
    """The directory of one cache entry (see the module docstring)."""
    ident = dataset_id(ds)
    name = f"{_slug(ds.repo_id or ds.root.name)}-{hashlib.sha256(ident.encode()).hexdigest()[:8]}"
    variant = f"-{pooling}" if source == "dino" else f"-m{temporal_window}"
    return Path(cache_dir) / name / _slug(image_key) / f"{source}-{_slug(encoder_id)}{variant}"


def _write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def read_manifest(entry: Path) -> dict:
    """The manifest of a cache entry (or a manifest.json path); a damaged or foreign one is an error naming it."""
    path = entry / MANIFEST if entry.is_dir() else entry
    if not path.is_file():
        raise DataError(f"no latents manifest at {path}; compute the latents with `fplus latents`")
    try:
        manifest = fmt.read_json(path, f"the latents manifest is damaged: {RECOMPUTE}")
    except FplusError as err:
        raise LatentsCorrupt(str(err)) from None
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise LatentsCorrupt(f"{path}: field {missing[0]!r} is missing (not a manifest fplus wrote): {RECOMPUTE}")
    return manifest


def content_hash(path: Path) -> str:
    """sha256 hex digest of a file's bytes, read in chunks (never the whole file in memory)."""
    return file_sha256(path, HASH_CHUNK_BYTES)


def npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file, checked against its size.

    Raises:
        FplusError: the file is missing, its header is not a .npy header, or it is shorter or longer than its
            header says (a truncated copy, a disk that filled up), naming the file and both sizes.
    """
    if not path.is_file():
        raise LatentsCorrupt(f"{path} is missing: {RECOMPUTE}")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except (ValueError, OSError, SyntaxError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LatentsCorrupt(f"{path}: not a readable .npy file ({text}): {RECOMPUTE}") from None
    if fortran:
        raise LatentsCorrupt(f"{path}: Fortran-ordered array, not one fplus wrote: {RECOMPUTE}")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise LatentsCorrupt(f"{path}: {state}: {size} bytes, expected {expected} for {shape} {dtype}: {RECOMPUTE}")
    return tuple(shape), dtype, offset


def _locate(ds: LeRobotDataset | None, row: int) -> str:
    """ "frame 512 (episode 4 frame 17)" from the episodes table (metadata only)."""
    if ds is not None:
        for ep in ds.episodes:
            if ep.start <= row < ep.stop:
                return f"frame {row} (episode {ep.index} frame {row - ep.start})"
    return f"frame {row}"


def nonfinite_rows(latents: np.ndarray, chunk_bytes: int = 64 * 2**20) -> np.ndarray:
    """Indices of the rows of (N, D) latents holding NaN or inf, scanned in chunks (memory-mapped arrays)."""
    step = max(1, chunk_bytes // max(1, latents[:1].nbytes))
    bad = [s + np.nonzero(~np.isfinite(latents[s:s + step]).all(axis=1))[0] for s in range(0, len(latents), step)]
    return np.concatenate(bad) if bad else np.zeros(0, np.int64)


def verify_latents(entry: Path, manifest: dict, ds: LeRobotDataset | None = None) -> None:
    """Check a finished entry's latents.npy: written with a content hash, the manifest's shape and dtype, every
    value finite, and the bytes matching the hash. Raises an FplusError naming the file and saying what to do."""
    path = entry / LATENTS
    if CONTENT_HASH not in manifest:
        raise LatentsCorrupt(f"{entry / MANIFEST} has no content hash (written by an older fplus), so {path} cannot be "
                             f"verified: {RECOMPUTE}")
    shape, dtype, _ = npy_layout(path)
    want = (int(manifest["num_frames"]), int(manifest["dim"]))
    if shape != want or dtype != np.float16:
        raise LatentsCorrupt(f"{path} holds {shape} {dtype}, its manifest says {want} float16: {RECOMPUTE}")
    bad = nonfinite_rows(np.load(path, mmap_mode="r"))
    if len(bad):
        raise LatentsCorrupt(f"{path}: {len(bad)} row{'s' if len(bad) > 1 else ''} of latents hold non-finite values "
                             f"(NaN/inf), first at {_locate(ds, int(bad[0]))}: {RECOMPUTE}")
    if content_hash(path) != manifest[CONTENT_HASH]:
        raise LatentsCorrupt(f"{path} does not match its manifest's content hash (changed or corrupt since it was "
                             f"written): {RECOMPUTE}")


@dataclass(frozen=True)
class LatentsResult:
    """Outcome of `compute_latents`: where, what, and whether work was done (`computed|resumed|complete`)."""

    entry: Path
    manifest: dict
    status: str
    frames_computed: int
    seconds: float


class LatentsInterrupted(KeyboardInterrupt):
    """SIGINT (or SIGTERM, raised as a KeyboardInterrupt by the CLI) while computing: the batches done are kept.

    Attributes: entry, frames_done (resumable progress on disk), num_frames, signum.
    """

    def __init__(self, entry: Path, frames_done: int, num_frames: int, signum: int):
        super().__init__(f"interrupted after {frames_done} of {num_frames} frames ({entry})")
        self.entry, self.frames_done, self.num_frames, self.signum = entry, frames_done, num_frames, signum


def _mismatches(found: dict, expected: dict) -> list[str]:
    return [f"{k}: cache has {found.get(k)!r}, expected {expected[k]!r}" for k in IDENTITY
            if k in expected and found.get(k) != expected[k]]


def compute_latents(ds: LeRobotDataset, image_key: str, encoder, cache_dir: Path, batch_size: int,
                    overwrite: bool = False, progress: bool = True, console=None) -> LatentsResult:
    """Encode every frame of `image_key` into the cache, resuming an interrupted run.

    Args:
        encoder: a `fplus.world.encoders.WorldEncoder`.
        overwrite: recompute from scratch, dropping an existing entry (finished, unfinished or mismatched).
    Returns:
        LatentsResult; status `complete` means the cache was already finished (and verified) and nothing was done.
    Raises:
        FplusError: another process is writing the entry (its lock names it); the entry does not match; the
            encoder returned NaN/inf (nothing of that batch is written); the disk is full (the batches done are
            kept); a finished entry fails `verify_latents` (LatentsCorrupt).
        LatentsInterrupted: a KeyboardInterrupt (SIGINT, or SIGTERM through the CLI): the batches done are kept.
    """
    from fplus.data.lerobot import DataKeys

    ds.validate_keys(DataKeys(image=image_key))
    described = encoder.describe()
    entry = cache_entry(cache_dir, ds, image_key, encoder.source, encoder.model_id, described.get("pooling"),
                        encoder.temporal_window)
    expected = {"dataset": dataset_id(ds), "dataset_fingerprint": ds.fingerprint, "image_key": image_key,
                "num_frames": ds.num_frames, "dtype": "float16", "pooling": None, **described}
    expected = json.loads(json.dumps(expected))  # compare in JSON terms (tuples become lists)

    def on_stale(message: str) -> None:
        (console.print if console is not None else lambda m: print(m, file=sys.stderr))(message)

    with exclusive_lock(entry / LOCK, f"latents cache {entry}", on_stale=on_stale):
        return _compute_locked(ds, image_key, encoder, entry, expected, batch_size, overwrite, progress, console)


def _compute_locked(ds: LeRobotDataset, image_key: str, encoder, entry: Path, expected: dict, batch_size: int,
                    overwrite: bool, progress: bool, console) -> LatentsResult:
    import torch

    from fplus.progress import make_progress

    n, dim = ds.num_frames, encoder.dim
    start_frame = 0
    status = "computed"
    if (entry / MANIFEST).is_file() and not overwrite:
        found = read_manifest(entry)
        problems = _mismatches(found, expected)
        if problems:
            raise DataError(f"{entry} holds latents that do not match: {'; '.join(problems)}. "
                             "Pass --overwrite to recompute them")
        if found.get("complete"):
            verify_latents(entry, found, ds)
            return LatentsResult(entry, found, "complete", 0, 0.0)
        if (entry / PROGRESS).is_file() and (entry / LATENTS).is_file():
            if found.get("batch_size") != batch_size:
                raise DataError(f"{entry} holds an unfinished run with batch size {found.get('batch_size')}; "
                                 f"resume it with --batch-size {found.get('batch_size')} (batches must line up to "
                                 "give the same bytes) or pass --overwrite")
            start_frame = _read_progress(entry, n)
            status = "resumed"
    if status == "computed":
        _start_entry(entry, {**expected, "batch_size": batch_size, "complete": False, "fplus_version": _version(),
                             "started_at": _now()}, n, dim)
    manifest = read_manifest(entry)
    shape, dtype, offset = npy_layout(entry / LATENTS)
    if shape != (n, dim) or dtype != np.float16:
        raise DataError(f"{entry / LATENTS} holds {shape} {dtype}, expected {(n, dim)} float16; pass --overwrite")

    ep_start, _ = episode_bounds(ds.episode_of_frames())
    row_bytes = dim * np.dtype(np.float16).itemsize
    done = start_frame
    writing = entry / LATENTS
    t0 = time.perf_counter()
    bar = make_progress("frames", console=console, disable=not progress)
    fd = os.open(entry / LATENTS, os.O_RDWR)
    try:
        with bar:
            task = bar.add_task(f"{encoder.source} latents", total=n, completed=start_frame,
                                info=f"[dim]{status if status == 'resumed' else ''}")
            for s in range(start_frame, n, batch_size):
                e = min(s + batch_size, n)
                t = np.arange(s, e)
                rows = causal_window(t, ep_start[t], encoder.temporal_window)  # (B, m), frames <= t only
                frames = ds.frames(image_key, rows.reshape(-1))
                frames = frames.reshape(*rows.shape, *frames.shape[1:])  # (B, m, H, W, 3)
                z = _checked_batch(encoder.encode_frames(torch.from_numpy(frames)).numpy(), s, ds, encoder, entry)
                writing = entry / LATENTS
                _write_rows(fd, offset + s * row_bytes, z.tobytes())
                os.fsync(fd)
                writing = entry / PROGRESS
                _write_json_atomic(entry / PROGRESS, {"frames_done": e})
                done = e
                bar.update(task, completed=e)
        os.close(fd)
        fd = -1
        seconds = time.perf_counter() - t0
        writing = entry / MANIFEST
        manifest.update(complete=True, created_at=_now(), seconds_last_run=round(seconds, 3),
                        frames_per_second_last_run=round((n - start_frame) / max(seconds, 1e-9), 2),
                        **{CONTENT_HASH: content_hash(entry / LATENTS)})
        _write_json_atomic(entry / MANIFEST, manifest)
    except KeyboardInterrupt as err:
        raise LatentsInterrupted(entry, done, n, getattr(err, "signum", signal.SIGINT)) from err
    except OSError as err:
        if not fmt.is_disk_full(err):
            raise
        raise DataError(f"disk full while writing {writing} ({fmt.free_space(entry)}); the {done} of {n} frames "
                         f"done so far are kept in {entry} (the unfinished write was discarded): free space and run "
                         "`fplus latents` again to resume") from None
    finally:
        if fd >= 0:
            os.close(fd)
    (entry / PROGRESS).unlink(missing_ok=True)
    return LatentsResult(entry, manifest, status, n - start_frame, seconds)


def _read_progress(entry: Path, n: int) -> int:
    path = entry / PROGRESS
    progress = fmt.read_json(path, "the progress of the unfinished run is lost: pass --overwrite to start again")
    done = progress.get("frames_done")
    if not isinstance(done, int) or not 0 <= done <= n:
        raise DataError(f"{path}: frames_done is {done!r}, expected a frame count in [0, {n}]; pass --overwrite "
                         "to start again")
    return done


def _start_entry(entry: Path, manifest: dict, n: int, dim: int) -> None:
    """A fresh entry: latents.npy allocated in full (zeros), progress 0, the unfinished manifest. A disk too small
    for the file fails here, with nothing left behind."""
    entry.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST, PROGRESS, LATENTS):  # the manifest first: never a stale `complete` over a new file
        (entry / name).unlink(missing_ok=True)
    path = entry / LATENTS
    size = 0
    try:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim)).flush()
        size = path.stat().st_size
        _allocate(path, size)
        _write_json_atomic(entry / PROGRESS, {"frames_done": 0})
        _write_json_atomic(entry / MANIFEST, manifest)
    except OSError as err:
        for name in (MANIFEST, PROGRESS, LATENTS):
            (entry / name).unlink(missing_ok=True)
        if not fmt.is_disk_full(err):
            raise
        need = f"{fmt.human_bytes(size)} needed, " if size else ""
        raise DataError(f"disk full while creating {path} ({need}{fmt.free_space(entry)}); nothing was kept: free "
                         "space or set CACHE_DIR (--cache-dir) to a larger disk, then run `fplus latents` again") \
            from None


def _allocate(path: Path, size: int) -> None:
    """Reserve the file's blocks now, so that writing into it later cannot run out of space."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    finally:
        os.close(fd)


def _write_rows(fd: int, offset: int, data: bytes) -> None:
    """Write all of `data` at `offset` of an open file (os.pwrite may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _checked_batch(z: np.ndarray, start: int, ds: LeRobotDataset, encoder, entry: Path) -> np.ndarray:
    """The encoder's batch (B, D) as float16; NaN/inf, or values beyond the float16 range, are an error."""
    bad = ~np.isfinite(z)
    where = f"frames {start}..{start + len(z) - 1}"
    kept = f"nothing of this batch was written; the {start} frames before it are kept in {entry}"
    if bad.any():
        first = _locate(ds, start + int(np.argmax(bad.any(axis=1))))
        count = f"{int(bad.sum())} non-finite value{'s' if bad.sum() > 1 else ''}"
        raise DataError(f"the {encoder.source} encoder {encoder.model_id!r} returned {count} (NaN/inf) for {where}, "
                         f"first at {first}; {kept}: check those frames and the encoder (weights, --device), then "
                         "run `fplus latents` again")
    with np.errstate(over="ignore"):
        z16 = z.astype(np.float16)
    if not np.isfinite(z16).all():
        raise DataError(f"the {encoder.source} encoder {encoder.model_id!r} returned values beyond the float16 "
                         f"range of the cache for {where} (max |z| = {np.abs(z).max():.4g} > 65504); {kept}: check "
                         "the encoder's weights")
    return z16


def load_latents(entry: Path, ds: LeRobotDataset, image_key: str, source: str | None = None,
                 encoder_id: str | None = None) -> np.ndarray:
    """The finished latents (N, D) float16 (memory-mapped) of `entry`, checked against the dataset.

    Fails with a clear message when the cache is unfinished, or made for another dataset, dataset version,
    image key, encoder, or frame count; and when latents.npy is truncated, holds NaN/inf, does not match the
    manifest's content hash, or was written without one (see `verify_latents`).
    """
    manifest = read_manifest(entry)
    problems = []
    if not manifest.get("complete"):
        problems.append("the cache is unfinished (run `fplus latents` again to resume it)")
    checks = {"num_frames": ds.num_frames, "dataset_fingerprint": ds.fingerprint, "image_key": image_key}
    if source is not None:
        checks["source"] = source
    if encoder_id is not None:
        checks["encoder_id"] = encoder_id
    problems += _mismatches(manifest, checks)
    if problems:
        raise DataError(f"latents at {entry} do not fit dataset {dataset_id(ds)}: {'; '.join(problems)}. "
                         "Recompute with `fplus latents --overwrite`")
    verify_latents(entry, manifest, ds)
    return np.load(entry / LATENTS, mmap_mode="r")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _version() -> str:
    from fplus import __version__

    return __version__


def find_latents(cache_dir: Path, ds: LeRobotDataset, image_key: str, source: str, encoder_id: str, pooling: str,
                 temporal_window: int) -> tuple[Path, np.ndarray]:
    """The cache entry of the world settings for this dataset and key, loaded and checked (see `load_latents`).

    A V-JEPA window may have been rounded up to the tubelet size when computed, so both m and the rounded value
    are accepted.
    """
    windows = {temporal_window, -(-temporal_window // 2) * 2}
    want_pooling = pooling if source == "dino" else None
    entry = cache_entry(cache_dir, ds, image_key, source, encoder_id, want_pooling, temporal_window)
    candidates = [e for e in entry.parent.glob(f"{source}-{_slug(encoder_id)}-*") if (e / MANIFEST).is_file()]
    for candidate in sorted(candidates):
        manifest = read_manifest(candidate)
        if manifest.get("pooling") == want_pooling and (source == "dino" or manifest["temporal_window"] in windows):
            return candidate, load_latents(candidate, ds, image_key, source=source, encoder_id=encoder_id)
    raise DataError(f"no {source} latents of {encoder_id!r} for {image_key!r} of {dataset_id(ds)} under "
                     f"{cache_dir}; compute them first: fplus latents --dataset {ds.root} --image-key {image_key} "
                     f"--source {source} (or `fplus latents --profile <profile>`)")


def find_dataset_latents(cache_dir: Path, ds, image_key: str, source: str, encoder_id: str, pooling: str,
                         temporal_window: int) -> tuple[list[Path], np.ndarray]:
    """`find_latents` of a LeRobotDataset (([entry], its memory-mapped latents), unchanged) or of each member of a
    fplus.data.mixture.MixtureDataset, every member having its own cache entry: (entries, the members' latents
    concatenated in mixture row order, (N, D) float16 in memory). The first member whose latents are missing or do
    not fit is the error."""
    found = [find_latents(cache_dir, m, image_key, source, encoder_id, pooling, temporal_window)
             for m in members_of(ds)]
    if len(found) == 1:
        return [found[0][0]], found[0][1]
    dims = sorted({z.shape[1] for _, z in found})
    if len(dims) > 1:
        raise DataError(f"the latents of the mixture's datasets have different sizes ({', '.join(map(str, dims))}): "
                        f"{RECOMPUTE} for every dataset with one encoder")
    return [e for e, _ in found], np.concatenate([np.asarray(z) for _, z in found])
