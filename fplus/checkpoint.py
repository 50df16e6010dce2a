"""Atomic, verified checkpoints in a run directory.

    RUN/checkpoints/step-000120/
        policy/            FPlusPolicy.save (config, weights, normalisation, processor); the full weights under
                           FSDP2 too (gathered by every process, fplus.train.distributed)
        trainer.pt         optimiser (under FSDP2: the full state keyed by parameter name, `optimizer_format`),
                           scheduler, progress (epoch, step, position in epoch)
        rng-<rank>.pt      each process's random states (a resume needs as many processes as there are files)
        checkpoint.json    step + sha256 of every file above, written last

A checkpoint is written into `.tmp-step-N` and renamed into place, so a kill leaves either nothing or a whole
checkpoint; a save that fails (disk full, a second Ctrl-C) removes its temporary directory, and the temporary
directories a crash left behind are removed when the run starts or resumes (`remove_stale`, under the run's lock).
On resume the newest checkpoint whose files match their recorded hashes is used; a corrupt or partial one is
reported and skipped. Only the newest `keep_last` checkpoints are kept (an old one is renamed to `.tmp-old-*`
before it is deleted, so a half-deleted checkpoint never looks like a checkpoint).

This module imports no torch: the report and the CLI read run files through it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from fplus.errors import CheckpointError, FplusError
from fplus.io import file_sha256, read_json

MANIFEST = "checkpoint.json"
PREFIX = "step-"
TMP = ".tmp-"
POLICY_CONFIG = "policy/config.json"  # fplus.model.policy CONFIG_FILE inside a checkpoint's policy/
UNUSABLE = "unusable-"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"



def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def begin(run_dir: Path, step: int) -> Path:
    """A fresh temporary directory to write checkpoint `step` into."""
    tmp = checkpoint_dir(run_dir) / f"{TMP}{PREFIX}{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def remove_stale(run_dir: Path) -> list[str]:
    """Remove the temporary directories (`.tmp-*`) an interrupted save or prune left; returns their names.
    Only call it while holding the run's lock (another writer's save in progress would look the same)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    stale = sorted(p for p in root.iterdir() if p.name.startswith(TMP))
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return [p.name for p in stale]


def commit(run_dir: Path, tmp: Path, step: int, keep_last: int) -> Path:
    """Hash the files, write checkpoint.json, rename into place, prune old checkpoints. Returns the final dir."""
    manifest = {"step": step, "files": {str(p.relative_to(tmp)): file_sha256(p) for p in _files(tmp)}}
    with (tmp / MANIFEST).open("w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    final = checkpoint_dir(run_dir) / f"{PREFIX}{step:06d}"
    if final.exists():
        _delete(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        _delete(old)
    return final


def _delete(path: Path) -> None:
    """Rename a checkpoint out of the `step-*` names first, then delete it: never a half-deleted `step-*`."""
    doomed = path.with_name(f"{TMP}old-{path.name}")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def set_aside(path: Path) -> Path:
    """Rename an unusable checkpoint to `unusable-step-N` (no longer listed, nor pruned in place of good ones)."""
    target = path.with_name(f"{UNUSABLE}{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{UNUSABLE}{path.name}.{n}")
    os.replace(path, target)
    return target


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoint directories, oldest first (unverified)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def _manifest(path: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) or (None, what is wrong with the checkpoint's checkpoint.json)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return None, "no checkpoint.json (partial write)"
    try:
        manifest = read_json(manifest_path, "checkpoint manifest")
    except FplusError as err:
        return None, str(err)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) \
            or not isinstance(manifest.get("step"), int):
        return None, f"{manifest_path} is not a checkpoint manifest (no `step` and `files`)"
    return manifest, None


def verify(path: Path) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it."""
    manifest, problem = _manifest(path)
    if problem:
        return problem
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file_sha256(file) != digest:
            return f"{name} does not match its recorded hash"
    return None


def manifest_step(path: Path) -> int:
    """The step recorded in a checkpoint's checkpoint.json."""
    manifest, problem = _manifest(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is unusable: {problem}")
    return manifest["step"]


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
            raise CheckpointError(f"{run_dir} has no usable checkpoint")
        return path
    path = checkpoint_dir(run_dir) / f"{PREFIX}{step:06d}"
    if not path.is_dir():
        steps = [int(p.name[len(PREFIX):]) for p in list_checkpoints(run_dir)]
        raise CheckpointError(f"no checkpoint at step {step} in {run_dir}; available steps: {steps}")
    problem = verify(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is unusable: {problem}")
    return path


# ----- the checkpoint belongs to its run ------------------------------------------------------------------------

def _leaves(config: dict, prefix: str = "") -> dict[str, object]:
    """{"model.injection": true, "action_dim": 4, ...}: nested objects flattened to dotted keys."""
    out: dict[str, object] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def policy_differences(checkpoint_policy: dict, run_policy: dict) -> list[str]:
    """["model.injection: checkpoint false, run true", ...] over the settings both policy configs hold (run order,
    nested objects compared leaf by leaf)."""
    theirs, ours = _leaves(checkpoint_policy), _leaves(run_policy)
    return [f"{k}: checkpoint {json.dumps(theirs[k])}, run {json.dumps(v)}"
            for k, v in ours.items() if k in theirs and theirs[k] != v]


def check_policy_config(path: Path, run_config: dict, run_dir: Path, config_name: str = "config.json") -> None:
    """Refuse a checkpoint whose policy config (CHECKPOINT/policy/config.json) is not the run's own (config.json
    `policy`): a checkpoint copied in from another run (an E0 checkpoint in an E2 run) is not that experiment."""
    run_policy = run_config.get("policy") if isinstance(run_config, dict) else None
    if not isinstance(run_policy, dict):
        return  # a config written before policies were recorded: nothing to compare with
    file = path / POLICY_CONFIG
    ckpt_policy = read_json(file, "the checkpoint's policy configuration",
                            "the checkpoint is damaged: use another one (--checkpoint STEP)")
    if not isinstance(ckpt_policy, dict):
        raise CheckpointError(f"{file} is not a policy configuration (not a JSON object)")
    diffs = policy_differences(ckpt_policy, run_policy)
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise CheckpointError(f"checkpoint {path.name} is not this run's policy: {file} differs from "
                         f"{Path(run_dir) / config_name} `policy` ({shown}); it was copied from another run: "
                         "evaluate or resume it in its own run directory")


# ----- a save that fails --------------------------------------------------------------------------------------

def is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT, or a library's error that wraps it (torch's PytorchStreamWriter, safetensors' IoError)."""
    seen = 0
    e: BaseException | None = err
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if any(s in text for s in ("No space left on device", "StorageFull", "Disk quota exceeded",
                                   "file write failed", "enforce fail at inline_container")):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def newest_file(root: Path) -> Path | None:
    """The most recently written file under `root` (the one a failed save was writing)."""
    try:
        files = [p for p in root.rglob("*") if p.is_file()]
        return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None
    except OSError:
        return None


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def save_error(err: BaseException, run_dir: Path, step: int, file: Path | None) -> FplusError | None:
    """The FplusError for a checkpoint save that failed with `err` while writing `file` (its temporary directory
    already removed), or None when `err` is not a write failure (a bug: let it through)."""
    full = is_disk_full(err)
    if not (full or isinstance(err, OSError)):
        return None
    if isinstance(err, OSError) and err.filename:
        file = Path(err.filename)
    where = str(file) if file is not None else f"{checkpoint_dir(run_dir)}/{TMP}{PREFIX}{step:06d}"
    try:
        free = _gib(shutil.disk_usage(checkpoint_dir(run_dir) if checkpoint_dir(run_dir).is_dir()
                                      else run_dir).free)
    except OSError:
        free = "unknown"
    kept = list_checkpoints(run_dir)
    previous = f"the earlier checkpoints ({', '.join(p.name for p in kept)}) are intact" if kept \
        else "there is no earlier checkpoint"
    if full:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            reason = "no space left on device"
        else:  # torch: "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file ..."
            text = (str(err).splitlines() or [type(err).__name__])[0]
            text = text.split("] . ", 1)[1] if text.startswith("[enforce fail") and "] . " in text else text
            reason = f"{text[:160]}: the disk is probably full"
        size = f" (a checkpoint takes about {_gib(_size(kept[-1]))})" if kept else ""
        todo = f"free space on that disk{size}, then resume the run"
    else:
        reason = err.strerror or str(err)
        todo = "fix the directory's permissions or space, then resume the run"
    return FplusError(f"cannot save checkpoint step {step}: writing {where} failed ({reason}); {free} free now; "
                      f"the partial checkpoint was removed and {previous}; {todo} (--resume)")
