"""`fplus export RUN OUT`: a trained run's checkpoint as a self-contained model folder (the format is
fplus.model.pretrained's), with a model card; optionally pushed to the hub.

    folder, marker = export_run(run_dir, out, step=None)   # default: the newest verified checkpoint
    url = push_to_hub(folder, "user/fplus-e2")              # huggingface_hub create_repo + upload_folder

Besides the checkpoint's policy/ it reads the run's config.json, split.json, latent_stats.json and the result files
of the step (RUN/eval/offline-step-N.json, sim-<sim>-step-N.json), the training dataset's metadata (fingerprint
checked; its frame size, tasks and action names are what a server needs without the dataset) and, for a world
policy, the manifest of the latents it was trained on (the world encoder's id and revision; the encoder's weights
are not bundled). So export where the run's dataset and latents are. The folder is written into a sibling
`.tmp-export-OUT-<pid>` and renamed into place: a failed export leaves no partial OUT. A non-empty OUT is refused,
and with `overwrite` only an earlier export is replaced (never another directory, never the run).
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fplus.errors import CheckpointError, ConfigError, FplusError
from fplus.io import read_json

RESULT_FIX = "restore it or delete it (fplus eval writes it again)"


def export_run(run_dir: Path, out: Path, step: int | None = None, overwrite: bool = False) -> tuple[Path, dict]:
    """Export the checkpoint of `step` (None: the newest verified one) of a run into the folder `out`.
    Returns (out, the fplus_export.json written). CheckpointError/ConfigError/DataError: not a run, no such
    checkpoint, OUT not replaceable, the dataset missing or changed, the world latents' manifest missing."""
    from fplus.data.lerobot import keys_from_settings
    from fplus.data.mixture import member_records, open_dataset
    from fplus.data.split import Split
    from fplus.model.pretrained import TRAINING_CONFIG, write_marker
    from fplus.rundir import CONFIG, LATENT_STATS, SPLIT, load_run

    run = load_run(Path(run_dir), step)
    out = Path(out)
    _check_target(out, run.dir, overwrite)
    settings = run.settings
    keys = keys_from_settings(settings.data)
    ds = open_dataset(settings.data, keys)  # one dataset or a mixture (each member's fingerprint checked)
    run.check_dataset(ds.fingerprint, str(settings.data.dataset), member_records(ds))
    policy = _policy_config(run.policy_dir)
    split = Split.load(run.split_path)
    meta = {
        "fplus_version": _version(), "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": run.dir.name, "experiment": run.experiment.id, "experiment_description": run.experiment.description,
        "step": run.step, "total_steps": run.config.get("total_steps"),  # absent in configs of older fplus
        "backbone": _backbone(policy), "world_encoder": _world_encoder(run, ds, keys, policy),
        "dataset": {"id": str(settings.data.dataset), "repo_id": ds.repo_id, "revision": settings.data.revision,
                    "fingerprint": run.config["dataset_fingerprint"], "episodes": ds.num_episodes,
                    "frames": ds.num_frames, "train_episodes": len(split.train), "val_episodes": len(split.val)},
        "observation": {"image_key": keys.image, "wrist_image_key": keys.wrist_image, "state_key": keys.state,
                        "action_key": keys.action, "instruction_key": keys.instruction,
                        "image_shape": [int(n) for n in ds.frame_at(keys.image, 0).shape],
                        "tasks": list(ds.tasks), "action_names": ds.features[keys.action].get("names")},
    }
    if member_records(ds) is not None:  # a mixture: each dataset's name, weight and fingerprint
        meta["dataset"]["members"] = member_records(ds)
    tmp = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(run.policy_dir, tmp)  # config.json, the safetensors, processor/: FPlusPolicy.load reads it
        shutil.copyfile(run.dir / CONFIG, tmp / TRAINING_CONFIG)
        shutil.copyfile(run.split_path, tmp / SPLIT)
        if policy.world_dim:
            shutil.copyfile(run.dir / LATENT_STATS, tmp / LATENT_STATS)
        _write_normalization(tmp, policy, keys)
        results = _copy_results(run.dir, run.step, tmp)
        marker = write_marker(tmp, meta)
        from fplus.deploy.model_card import model_card

        (tmp / "README.md").write_text(model_card(marker, run.config, results))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, marker


def _version() -> str:
    from fplus import __version__

    return __version__


def _policy_config(policy_dir: Path):
    from fplus.model.config import PolicyConfig
    from fplus.model.policy import CONFIG_FILE

    path = policy_dir / CONFIG_FILE
    try:
        return PolicyConfig.from_json(read_json(path, "the checkpoint's policy configuration"), path)
    except FplusError as err:
        raise CheckpointError(str(err)) from None


def _check_target(out: Path, run_dir: Path, overwrite: bool) -> None:
    """Refuse an OUT that is a file, the run or a directory above it, a non-empty directory (without `overwrite`),
    or, with `overwrite`, a non-empty directory that is not an earlier export."""
    from fplus.model.pretrained import is_exported

    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out} is a file: pass a directory to export into")
    target, run = out.resolve(), run_dir.resolve()
    if target == run or target in run.parents:
        raise ConfigError(f"{out} holds the run {run_dir}: export into another directory")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"{out} is not empty: pass --overwrite to replace an earlier export, or choose another "
                          "directory")
    if not is_exported(out):
        raise ConfigError(f"{out} is not empty and not an earlier export (no fplus_export.json): refusing to replace "
                          "it even with --overwrite; choose another directory")


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an existing OUT (empty, or an earlier export) is renamed away first
    and deleted after, so OUT is always either the old folder or the new one."""
    if out.exists() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".tmp-export-old-{out.name}-{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _backbone(policy) -> dict[str, Any]:
    """The backbone setting, what it resolves to (hub id, directory, tiny) and the commit a hub id was trained at."""
    from fplus.model.backbone import resolve_name

    return {"id": policy.model.backbone, "source": resolve_name(policy.model.backbone),
            "revision": policy.backbone_revision}


def _world_encoder(run, ds, keys, policy) -> dict[str, Any] | None:
    """The encoder of the latents the run was trained on, from their cache manifest (None without world latents)."""
    if not policy.world_dim:
        return None
    from fplus.world.cache import find_dataset_latents, read_manifest

    w = run.settings.world
    encoder = w.dino_model if w.source == "dino" else w.vjepa_model
    entries, _ = find_dataset_latents(w.cache_dir, ds, keys.image, w.source, encoder, w.pooling, w.temporal_window)
    manifest = read_manifest(entries[0])  # a mixture's members: the same source and encoder (find_dataset_latents)
    return {"source": manifest["source"], "encoder_id": manifest["encoder_id"], "revision": manifest["revision"],
            "dim": manifest["dim"], "pooling": manifest.get("pooling"),  # dino only
            "temporal_window": manifest["temporal_window"], "image_key": keys.image}


def _write_normalization(folder: Path, policy, keys) -> None:
    """normalization.json: the action (and state) normalisers' shift and scale, x_n = (x - shift) / scale, read
    from the weights (the buffers the policy applies)."""
    from safetensors import safe_open

    from fplus.model.policy import HEADS_FILE

    with safe_open(str(folder / HEADS_FILE), framework="numpy") as f:
        def norm(prefix: str, key: str | None) -> dict | None:
            if key is None:
                return None
            return {"key": key, "shift": f.get_tensor(f"{prefix}.shift").tolist(),
                    "scale": f.get_tensor(f"{prefix}.scale").tolist()}

        data = {"mode": policy.model.normalization, "formula": "x_n = (x - shift) / scale",
                "action": norm("action_norm", keys.action),
                "state": norm("state_norm", keys.state if policy.state_dim else None)}
    (folder / "normalization.json").write_text(json.dumps(data, indent=2))


def _copy_results(run_dir: Path, step: int, folder: Path) -> dict[str, dict]:
    """Copy the run's result files of `step` into OUT/results/; returns {file name: content}, offline first."""
    from fplus.model.pretrained import RESULTS_DIR
    from fplus.rundir import EVAL_DIR, SIM_RE, offline_result

    paths = [offline_result(run_dir, step)]
    paths += sorted(p for p in (run_dir / EVAL_DIR).glob(f"sim-*-step-{step:06d}.json") if SIM_RE.match(p.name))
    results = {}
    for path in paths:
        if path.is_file():
            results[path.name] = read_json(path, "the run's evaluation result", RESULT_FIX)
            (folder / RESULTS_DIR).mkdir(exist_ok=True)
            shutil.copyfile(path, folder / RESULTS_DIR / path.name)
    return results


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create the hub model repo `repo_id` (kept when it exists) and upload the exported folder (its eval/ left out)
    in one commit; returns the commit's URL. FplusError: offline, no access, the hub refusing."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from fplus.model.pretrained import EVAL_DIR, read_marker

    marker = read_marker(folder)
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                                   commit_message=f"fplus export of {marker['run']} ({marker['experiment']}, step "
                                                  f"{marker['step']})", ignore_patterns=[f"{EVAL_DIR}/**"])
    except (HfHubHTTPError, OfflineModeIsEnabled) as err:
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FplusError(f"cannot push {folder} to the hub model repo {repo_id!r} ({why}); the folder is complete: "
                         f"log in (`hf auth login` or HF_TOKEN) and upload it with `hf upload {repo_id} {folder}`") \
            from err
    return str(commit.commit_url)
