"""The world-latent cache: one fp16 array (N_frames, D) per dataset x image key x encoder, plus `manifest.json`.

Layout: CACHE_DIR/<dataset name>-<hash of its id>/<image key>/<source>-<encoder>[-<pooling>|-m<window>]/
    latents.npy     (N, D) float16, row i = latent of the dataset's frame with global index i
    manifest.json   dataset id + fingerprint, image key, encoder id + revision, window, dim, frame count, ...
    progress.json   only while unfinished: how many leading frames are done

Precompute is batched and resumable: batches start at multiples of the batch size, each finished batch is flushed
before progress.json moves past it (atomic rename), so a killed run resumes at the first unfinished batch and ends
with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from fplus.data.lerobot import LeRobotDataset
from fplus.data.windows import causal_window, episode_bounds
from fplus.errors import FplusError
from fplus.io import write_text_atomic

MANIFEST = "manifest.json"
LATENTS = "latents.npy"
PROGRESS = "progress.json"
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
    path = entry / MANIFEST if entry.is_dir() else entry
    if not path.is_file():
        raise FplusError(f"no latents manifest at {path}; compute the latents with `fplus latents`")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class LatentsResult:
    """Outcome of `compute_latents`: where, what, and whether work was done (`computed|resumed|complete`)."""

    entry: Path
    manifest: dict
    status: str
    frames_computed: int
    seconds: float


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
        LatentsResult; status `complete` means the cache was already finished and nothing was done.
    """
    import torch

    from fplus.data.lerobot import DataKeys
    from fplus.progress import make_progress

    ds.validate_keys(DataKeys(image=image_key))
    described = encoder.describe()
    entry = cache_entry(cache_dir, ds, image_key, encoder.source, encoder.model_id, described.get("pooling"),
                        encoder.temporal_window)
    expected = {"dataset": dataset_id(ds), "dataset_fingerprint": ds.fingerprint, "image_key": image_key,
                "num_frames": ds.num_frames, "dtype": "float16", "pooling": None, **described}
    expected = json.loads(json.dumps(expected))  # compare in JSON terms (tuples become lists)
    n, dim = ds.num_frames, encoder.dim

    start_frame = 0
    status = "computed"
    if (entry / MANIFEST).is_file() and not overwrite:
        found = read_manifest(entry)
        problems = _mismatches(found, expected)
        if problems:
            raise FplusError(f"{entry} holds latents that do not match: {'; '.join(problems)}. "
                             "Pass --overwrite to recompute them")
        if found.get("complete"):
            return LatentsResult(entry, found, "complete", 0, 0.0)
        if (entry / PROGRESS).is_file() and (entry / LATENTS).is_file():
            if found.get("batch_size") != batch_size:
                raise FplusError(f"{entry} holds an unfinished run with batch size {found.get('batch_size')}; "
                                 f"resume it with --batch-size {found.get('batch_size')} (batches must line up to "
                                 "give the same bytes) or pass --overwrite")
            start_frame = json.loads((entry / PROGRESS).read_text())["frames_done"]
            status = "resumed"
    if status == "computed":
        entry.mkdir(parents=True, exist_ok=True)
        for name in (PROGRESS, LATENTS):
            (entry / name).unlink(missing_ok=True)
        manifest = {**expected, "batch_size": batch_size, "complete": False, "fplus_version": _version(),
                    "started_at": _now()}
        _write_json_atomic(entry / MANIFEST, manifest)
        np.lib.format.open_memmap(entry / LATENTS, mode="w+", dtype=np.float16, shape=(n, dim)).flush()
        _write_json_atomic(entry / PROGRESS, {"frames_done": 0})
    manifest = read_manifest(entry)
    latents = np.lib.format.open_memmap(entry / LATENTS, mode="r+")
    if latents.shape != (n, dim):
        raise FplusError(f"{entry / LATENTS} has shape {latents.shape}, expected {(n, dim)}; pass --overwrite")

    ep_start, _ = episode_bounds(ds.episode_of_frames())
    t0 = time.perf_counter()
    bar = make_progress("frames", console=console, disable=not progress)
    with bar:
        task = bar.add_task(f"{encoder.source} latents", total=n, completed=start_frame,
                            info=f"[dim]{status if status == 'resumed' else ''}")
        for s in range(start_frame, n, batch_size):
            e = min(s + batch_size, n)
            t = np.arange(s, e)
            rows = causal_window(t, ep_start[t], encoder.temporal_window)  # (B, m), frames <= t only
            frames = ds.frames(image_key, rows.reshape(-1))
            frames = frames.reshape(*rows.shape, *frames.shape[1:])  # (B, m, H, W, 3)
            z = encoder.encode_frames(torch.from_numpy(frames))
            latents[s:e] = z.numpy().astype(np.float16)
            latents.flush()
            _write_json_atomic(entry / PROGRESS, {"frames_done": e})
            bar.update(task, completed=e)
    seconds = time.perf_counter() - t0
    del latents
    manifest.update(complete=True, created_at=_now(), seconds_last_run=round(seconds, 3),
                    frames_per_second_last_run=round((n - start_frame) / max(seconds, 1e-9), 2))
    _write_json_atomic(entry / MANIFEST, manifest)
    (entry / PROGRESS).unlink(missing_ok=True)
    return LatentsResult(entry, manifest, status, n - start_frame, seconds)


def load_latents(entry: Path, ds: LeRobotDataset, image_key: str, source: str | None = None,
                 encoder_id: str | None = None) -> np.ndarray:
    """The finished latents (N, D) float16 (memory-mapped) of `entry`, checked against the dataset.

    Fails with a clear message when the cache is unfinished, or made for another dataset, dataset version,
    image key, encoder, or frame count.
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
        raise FplusError(f"latents at {entry} do not fit dataset {dataset_id(ds)}: {'; '.join(problems)}. "
                         "Recompute with `fplus latents --overwrite`")
    latents = np.load(entry / LATENTS, mmap_mode="r")
    if latents.shape != (ds.num_frames, manifest["dim"]):
        raise FplusError(f"{entry / LATENTS} has shape {latents.shape}, manifest says ({ds.num_frames}, "
                         f"{manifest['dim']})")
    return latents


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
    raise FplusError(f"no {source} latents of {encoder_id!r} for {image_key!r} of {dataset_id(ds)} under "
                     f"{cache_dir}; compute them first: fplus latents --dataset {ds.root} --image-key {image_key} "
                     f"--source {source} (or `fplus latents --profile <profile>`)")
