"""The run directory contract (torch-free): its files, the settings a run was started with, and `load_run`, the one
loader every consumer uses (train resume, offline eval, closed loop, report, matrix, a policy server).

    RUN/config.json        resolved settings (flat names), policy config, dataset fingerprint (a mixture: also
                           `dataset_members`, each dataset's name, weight, fingerprint), steps: resume and eval
                           read them from here, never from the current environment
    RUN/split.json         train/validation episodes (a mixture: also each dataset's own split, `members`)
    RUN/latent_stats.json  per-dimension mean and std of the world latents over the training split
    RUN/metrics.jsonl      one JSON line per log step and per validation
    RUN/checkpoints/       atomic, verified checkpoints (fplus.checkpoint), the newest KEEP_LAST kept
    RUN/COMPLETE           written when the last step's checkpoint is committed
    RUN/.lock              the OS lock of the one process training the run (fplus.lock)
    RUN/eval/              offline-step-XXXXXX.json, sim-<simulator>-step-XXXXXX.json

`load_run(run_dir, step)` reads config.json and the settings, checks that they describe the experiment the run's
policy config records, resolves a verified checkpoint and refuses one copied from another run; the returned `Run`
checks a dataset's fingerprint against the run's (`Run.check_dataset`). Every check lives here, once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fplus import checkpoint as ckpt
from fplus.errors import CheckpointError, DataError, FplusError
from fplus.experiments import Experiment
from fplus.io import read_json
from fplus.settings import Settings, load_settings

CONFIG = "config.json"
SPLIT = "split.json"
LATENT_STATS = "latent_stats.json"
METRICS = "metrics.jsonl"
COMPLETE = "COMPLETE"
EVAL_DIR = "eval"
CHECKPOINTS = "checkpoints"
OFFLINE_RE = re.compile(r"^offline-step-(?P<step>\d+)\.json$")
SIM_RE = re.compile(r"^sim-(?P<sim>[A-Za-z0-9_.]+)-step-(?P<step>\d+)\.json$")
CHECKPOINT_RE = re.compile(r"^step-(?P<step>\d+)$")
REMOVED_SETTINGS = frozenset({"CORRUPTION"})
"""Settings that earlier fplus versions recorded in config.json and that no longer exist (never read): ignored."""
_FIX = "restore it (it is written once, when the run starts) or start the run again in a new directory"


def offline_result(run_dir: Path, step: int) -> Path:
    """RUN/eval/offline-step-XXXXXX.json: the offline evaluation of the checkpoint of `step`."""
    return Path(run_dir) / EVAL_DIR / f"offline-step-{step:06d}.json"


def sim_result(run_dir: Path, simulator: str, step: int) -> Path:
    """RUN/eval/sim-<simulator>-step-XXXXXX.json: the closed-loop evaluation of the checkpoint of `step`."""
    return Path(run_dir) / EVAL_DIR / f"sim-{simulator}-step-{step:06d}.json"


def run_dir_for(settings: Settings) -> Path:
    """OUTPUT_DIR / (RUN_NAME or the experiment id or `custom`)."""
    name = settings.run.name or settings.train.experiment or "custom"
    return Path(settings.train.output_dir) / name


def run_state(run_dir: Path) -> str:
    """`complete`, `partial` (started, resumable) or `new`."""
    if (Path(run_dir) / COMPLETE).is_file():
        return "complete"
    if (Path(run_dir) / CONFIG).is_file():
        return "partial"
    return "new"


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A run's config.json; a CheckpointError saying why `run_dir` is not a run directory (missing, a file, a parent
    of runs, a damaged or foreign config.json)."""
    path = Path(run_dir)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a run directory such as OUTPUT_DIR/E2)")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a run directory (it is a file; expected a directory holding {CONFIG})")
    if not (path / CONFIG).is_file():
        inner = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / CONFIG).is_file())
        hint = f"; it contains the runs {', '.join(inner)}: pass those" if inner else ""
        raise CheckpointError(f"{path} is not a run directory ({CONFIG} missing){hint}")
    try:
        config = read_json(path / CONFIG, "the run configuration", _FIX)
    except FplusError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(config, dict) or not isinstance(config.get("settings"), dict):
        raise CheckpointError(f"{path / CONFIG} is not a run configuration (no `settings` object); {_FIX}")
    return config


def settings_from_config(config: dict[str, Any], run_dir: Path) -> Settings:
    """The settings recorded in a run's config.json (`settings`, flat names), resolved with nothing else."""
    flat = {k: v for k, v in config["settings"].items() if k not in REMOVED_SETTINGS}
    try:
        return load_settings(None, {k: v for k, v in flat.items() if v is not None}, environ={}, dotenv=None)
    except FplusError as err:
        raise CheckpointError(f"{Path(run_dir) / CONFIG} `settings`: {err}") from None


def settings_from_run(run_dir: Path) -> Settings:
    """The settings a run was started with (from its config.json)."""
    return settings_from_config(read_run_config(run_dir), run_dir)


@dataclass(frozen=True)
class Run:
    """A run directory as `load_run` read it.

    Attributes: dir; config (config.json); settings (the run's own); experiment (the spec its settings describe);
    checkpoint (the verified checkpoint directory, or None when `load_run` was asked for none or the run has none
    yet); step (the checkpoint's step, or None).
    """

    dir: Path
    config: dict[str, Any]
    settings: Settings
    experiment: Experiment
    checkpoint: Path | None = None
    step: int | None = None

    @property
    def policy_dir(self) -> Path:
        """The saved policy of the checkpoint (CHECKPOINT/policy)."""
        if self.checkpoint is None:
            raise CheckpointError(f"{self.dir} has no usable checkpoint")
        return self.checkpoint / "policy"

    @property
    def complete(self) -> bool:
        return (self.dir / COMPLETE).is_file()

    @property
    def split_path(self) -> Path:
        return self.dir / SPLIT

    def check_dataset(self, fingerprint: str, dataset: str, members: list[dict] | None = None,
                      content: bool = True) -> None:
        """Refuse a dataset whose fingerprint is not the one the run was trained on.

        A mixture (`members`: fplus.data.mixture.MixtureDataset.member_records, None for one dataset) is compared
        member by member, in order, with the run's `dataset_members`: the same number of datasets, each with its
        weight and fingerprint; the error names the dataset that differs. `content` False: the number of datasets
        and the weights only (what resuming needs to draw the same samples)."""
        recorded_members = self.config.get("dataset_members")  # absent: a run on one dataset
        if members is not None or recorded_members is not None:
            problems = _member_differences(recorded_members, members, content)
            if problems:
                raise DataError(f"the datasets changed since {self.dir} was trained: {'; '.join(problems)}; use the "
                                "datasets (and the mixture's weights) the run was trained on")
        if not content:
            return
        recorded = self.config.get("dataset_fingerprint")
        if recorded is None:
            raise CheckpointError(f"{self.dir / CONFIG} records no `dataset_fingerprint`; restore it from a copy")
        if fingerprint != recorded:
            raise DataError(f"the dataset {dataset} changed since {self.dir} was trained (fingerprint "
                            f"{fingerprint} != {recorded}); evaluate on the dataset the run was trained on")


def _member_differences(recorded: list[dict] | None, members: list[dict] | None, content: bool) -> list[str]:
    """How the datasets of a mixture differ from the ones a run recorded (`dataset_members`), in order."""
    if recorded is None:
        return [f"the run was trained on one dataset, DATASET now names a mixture of {len(members or [])}"]
    if members is None:
        return [f"the run was trained on a mixture of {len(recorded)} datasets "
                f"({', '.join(str(r['dataset']) for r in recorded)}), DATASET now names one"]
    if len(members) != len(recorded):
        return [f"the run was trained on a mixture of {len(recorded)} datasets "
                f"({', '.join(str(r['dataset']) for r in recorded)}), DATASET now names {len(members)} "
                f"({', '.join(str(m['dataset']) for m in members)})"]
    problems = []
    for i, (was, now) in enumerate(zip(recorded, members, strict=True), 1):
        name = now["dataset"] if now["dataset"] == was["dataset"] else f"{now['dataset']} (was {was['dataset']})"
        if content and now["fingerprint"] != was["fingerprint"]:
            problems.append(f"dataset {i} of the mixture, {name}, changed (fingerprint {now['fingerprint']} != "
                            f"{was['fingerprint']})")
        if abs(float(now["weight"]) - float(was["weight"])) > 1e-9:
            problems.append(f"dataset {i} of the mixture, {name}, has weight {now['weight']:.6g}, the run was "
                            f"trained with {float(was['weight']):.6g}")
    return problems


def _check_experiment(config: dict[str, Any], experiment: Experiment, run_dir: Path) -> None:
    """The settings' experiment must be the one the recorded policy config was built for."""
    policy = config.get("policy")
    if not isinstance(policy, dict):
        return  # written before policy configs were recorded
    recorded = policy.get("model", policy)  # the policy config nests its model settings
    wanted = {"prophet": experiment.prophet, "injection": experiment.injection, "coc": experiment.coc,
              "flare_align": experiment.flare_align}
    diffs = [f"{k}: policy {recorded[k]}, settings {v}" for k, v in wanted.items()
             if isinstance(recorded.get(k), bool) and recorded[k] != v]
    if diffs:
        raise CheckpointError(f"{run_dir / CONFIG}: the settings describe {experiment.id} but the policy config "
                              f"differs ({'; '.join(diffs)}); the file was edited: restore it")


def load_run(run_dir: Path, step: int | None = None, *, checkpoint: bool = True) -> Run:
    """Read a run directory.

    Args:
        step: the checkpoint to use (None: the newest valid one).
        checkpoint: resolve a checkpoint (False: settings and config only, e.g. for a run that has none yet).
    Raises:
        CheckpointError: not a run directory, a damaged config.json, no usable checkpoint (or none at `step`), a
            checkpoint copied from another run.
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    settings = settings_from_config(config, run_dir)
    experiment = Experiment.of(settings)
    _check_experiment(config, experiment, run_dir)
    if not checkpoint:
        return Run(run_dir, config, settings, experiment)
    try:
        path = ckpt.checkpoint_for(run_dir, step)
        ckpt.check_policy_config(path, config, run_dir)  # an E0 checkpoint copied into an E2 run is not E2
        done = ckpt.manifest_step(path)
    except CheckpointError:
        raise
    except FplusError as err:
        raise CheckpointError(str(err)) from None
    return Run(run_dir, config, settings, experiment, path, done)
