"""Open a trained run for inference: its dataset (fingerprint-checked), its policy on a device, its world latents.

Every consumer of a trained checkpoint goes through here after `fplus.rundir.load_run` (offline eval, the closed
loop, a policy server), so the checks are the same everywhere:

    run = load_run(run_dir, step)          # torch-free: settings, experiment, verified checkpoint of this run
    opened = open_run(run, device)         # dataset (fingerprint == the run's), policy from the checkpoint

An exported model folder (`fplus export`, fplus.model.pretrained) stands in for a run directory: `load_any(path)`
reads either; for a folder it returns an `ExportedRun` (the run's recorded settings, with this machine's DATASET,
DATASET_REVISION and CACHE_DIR when given: `local_settings`), whose policy is the folder itself (files checked
against fplus_export.json) and whose results go to OUT/eval/. Serving opens it without a dataset (`dataset=False`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fplus.data.lerobot import DataKeys, LeRobotDataset, keys_from_settings
from fplus.data.mixture import MixtureDataset, member_records, open_dataset
from fplus.device import resolve_device
from fplus.model.policy import FPlusPolicy
from fplus.rundir import Run, load_run, settings_from_config, settings_from_run
from fplus.settings import Settings

LOCAL_SETTINGS = ("DATASET", "DATASET_REVISION", "CACHE_DIR")
"""Settings that name where things are on this machine: an exported folder takes them from the user's settings
(profile, .env, environment) when set there, else from the run's."""


@dataclass
class OpenedRun:
    """A run ready for inference: `run` (fplus.rundir.Run or ExportedRun), `dataset` (None: an exported folder
    opened for serving) and its `keys`, `policy` (eval mode) on `device`."""

    run: Run
    dataset: LeRobotDataset | MixtureDataset | None
    keys: DataKeys
    policy: FPlusPolicy
    device: str

    def latents(self) -> np.ndarray | None:
        """The cached raw world latents (N, D) of the dataset (a mixture: of each member, concatenated) for the
        run's encoder, or None without world latents."""
        if not self.policy.config.world_dim:
            return None
        from fplus.world.cache import find_dataset_latents

        w = self.run.settings.world
        encoder = w.dino_model if w.source == "dino" else w.vjepa_model
        _, latents = find_dataset_latents(w.cache_dir, self.dataset, self.keys.image, w.source, encoder, w.pooling,
                                          w.temporal_window)
        return np.asarray(latents)


@dataclass(frozen=True)
class ExportedRun(Run):
    """An exported model folder read as a run (`open_export`): `dir` and `checkpoint` are the folder, `step` the
    exported one, `config` its training_config.json, `export` its fplus_export.json; the policy is the folder."""

    export: dict[str, Any] = field(default_factory=dict)

    @property
    def policy_dir(self) -> Path:
        return self.dir


def open_export(folder: Path, step: int | None = None, local: Mapping[str, Any] | None = None) -> ExportedRun:
    """Read an exported folder as a run: its files checked (fplus.model.pretrained.verify_folder), the run's
    settings from training_config.json with `local` (LOCAL_SETTINGS by flat name) replacing the recorded ones.
    CheckpointError: a damaged folder, a `step` that is not the exported one."""
    from fplus.errors import CheckpointError
    from fplus.experiments import Experiment
    from fplus.model.pretrained import verify_folder

    folder = Path(folder)
    marker = verify_folder(folder)
    if step is not None and step != marker["step"]:
        raise CheckpointError(f"{folder} holds the checkpoint of step {marker['step']} only (exported from "
                              f"{marker['run']}); drop --checkpoint or export step {step}")
    config, settings = _export_config(folder, local)
    return ExportedRun(folder, config, settings, Experiment.of(settings), folder, marker["step"], marker)


def _export_config(folder: Path, local: Mapping[str, Any] | None) -> tuple[dict[str, Any], Settings]:
    """(training_config.json, the run's settings with `local` replacing the recorded LOCAL_SETTINGS) of an
    exported folder, files not checked."""
    from fplus.errors import CheckpointError, FplusError
    from fplus.io import read_json
    from fplus.model.pretrained import TRAINING_CONFIG

    try:
        config = read_json(folder / TRAINING_CONFIG, "the exported training configuration")
    except FplusError as err:
        raise CheckpointError(str(err)) from None
    unknown = sorted(set(local or {}) - set(LOCAL_SETTINGS))
    if unknown:
        raise ValueError(f"not local settings: {unknown}")  # a caller's bug
    flat = {**config["settings"], **{k: v for k, v in (local or {}).items() if v is not None}}
    return config, settings_from_config({**config, "settings": flat}, folder)


def run_settings(path: Path, local: Mapping[str, Any] | None = None) -> Settings:
    """The settings a run directory or an exported folder evaluates with, read from its config alone (nothing
    verified or loaded: `load_any` does that once, when the run is opened)."""
    from fplus.model.pretrained import is_exported

    return _export_config(Path(path), local)[1] if is_exported(path) else settings_from_run(path)


def load_any(path: Path, step: int | None = None, local: Mapping[str, Any] | None = None) -> Run:
    """`open_export` for an exported folder (it holds fplus_export.json), else `fplus.rundir.load_run` (a run
    directory always uses its own settings: `local` is ignored)."""
    from fplus.model.pretrained import is_exported

    return open_export(path, step, local) if is_exported(path) else load_run(path, step)


def local_settings(profile: str | None = None) -> dict[str, Any]:
    """The LOCAL_SETTINGS the user set (profile, .env, environment), by flat name: what an exported folder uses
    instead of the paths recorded on the machine that trained it."""
    from fplus.settings import load_settings_with_origins, settings_to_flat

    loaded = load_settings_with_origins(profile)
    flat = settings_to_flat(loaded.settings)
    return {k: flat[k] for k in LOCAL_SETTINGS if k in loaded.origins}


def open_run(run: Run, device: str | None = None, dataset: bool = True) -> OpenedRun:
    """Open the run's dataset (refused when its fingerprint is not the run's) and load the checkpoint's policy.

    `device` None: the run's EVAL_DEVICE (auto: cuda when available). `dataset` False: no dataset (serving an
    exported folder, which records what the server reads of it)."""
    settings = run.settings
    keys = keys_from_settings(settings.data)
    ds = None
    if dataset:
        if settings.data.dataset is None:
            from fplus.errors import ConfigError

            raise ConfigError(f"{run.dir} records no dataset: set DATASET")
        ds = open_dataset(settings.data, keys)  # one dataset or a mixture: each member's fingerprint is checked
        run.check_dataset(ds.fingerprint, str(settings.data.dataset), member_records(ds))
    device = resolve_device(device or settings.eval.device)
    policy = FPlusPolicy.load(run.policy_dir, device=device).eval()
    return OpenedRun(run, ds, keys, policy, device)
