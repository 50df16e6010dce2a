"""Atomic, verified checkpoints in a run directory.

    RUN/checkpoints/step-000120/
        policy/            FPlusPolicy.save (config, weights, normalisation, processor)
        trainer.pt         optimiser, scheduler, progress (epoch, step, position in epoch), RNG states
        checkpoint.json    step + sha256 of every file above, written last

A checkpoint is written into `.tmp-step-N` and renamed into place, so a kill leaves either nothing or a whole
checkpoint. On resume the newest checkpoint whose files match their recorded hashes is used; a corrupt or partial
one is reported and skipped. Only the newest `keep_last` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from fplus.errors import FplusError

MANIFEST = "checkpoint.json"
PREFIX = "step-"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def begin(run_dir: Path, step: int) -> Path:
    """A fresh temporary directory to write checkpoint `step` into."""
    tmp = checkpoint_dir(run_dir) / f".tmp-{PREFIX}{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(run_dir: Path, tmp: Path, step: int, keep_last: int) -> Path:
    """Hash the files, write checkpoint.json, rename into place, prune old checkpoints. Returns the final dir."""
    manifest = {"step": step, "files": {str(p.relative_to(tmp)): _sha256(p) for p in _files(tmp)}}
    with (tmp / MANIFEST).open("w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    final = checkpoint_dir(run_dir) / f"{PREFIX}{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoint directories, oldest first (unverified)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify(path: Path) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no checkpoint.json (partial write)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "checkpoint.json is not valid JSON"
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if _sha256(file) != digest:
            return f"{name} does not match its recorded hash"
    return None


def latest_valid(run_dir: Path, warn=print) -> Path | None:
    """The newest whole checkpoint; corrupt newer ones are reported through `warn` and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        warn(f"checkpoint {path.name} is unusable ({problem}); trying the previous one")
    return None


def checkpoint_for(run_dir: Path, step: int | None) -> Path:
    """The checkpoint of `step` (None: the newest valid one), verified."""
    if step is None:
        path = latest_valid(run_dir)
        if path is None:
            raise FplusError(f"{run_dir} has no usable checkpoint")
        return path
    path = checkpoint_dir(run_dir) / f"{PREFIX}{step:06d}"
    if not path.is_dir():
        steps = [int(p.name[len(PREFIX):]) for p in list_checkpoints(run_dir)]
        raise FplusError(f"no checkpoint at step {step} in {run_dir}; available steps: {steps}")
    problem = verify(path)
    if problem:
        raise FplusError(f"checkpoint {path} is unusable: {problem}")
    return path
