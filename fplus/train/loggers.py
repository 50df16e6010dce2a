"""Optional metric loggers next to metrics.jsonl (which is always written): TensorBoard, trackio or W&B (LOGGER).

W&B (LOGGER=wandb, the `wandb` extra): one W&B run per run directory. Its id is drawn at the first init and kept in
RUN/wandb.json, so a resumed training continues the same W&B run, and `fplus eval --sim` of the run logs its
closed-loop success rates and videos into it too (`closed_loop_logger`). Project, entity, display name and tags come
from WANDB_PROJECT, WANDB_ENTITY, WANDB_RUN_NAME (default: the run directory's name) and WANDB_TAGS (the experiment
id is always one); the settings are the run's own (config.json), as everything else on resume and eval. W&B's own
variables (WANDB_MODE=offline, WANDB_DIR, WANDB_API_KEY) work as usual.
"""

from __future__ import annotations

import json
import secrets
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fplus.errors import ConfigError
from fplus.io import read_json, write_text_atomic

if TYPE_CHECKING:
    from fplus.settings import Settings

WANDB_FILE = "wandb.json"
"""RUN/wandb.json: {"id", "project", "entity"} of the run's W&B run."""
CLOSED_LOOP = "closed_loop"
"""Prefix of the closed-loop keys in W&B; `closed_loop/step` (the evaluated checkpoint's step) is their x axis."""


class MetricLogger:
    """Forwards numeric metrics of each `train`/`val` record to the run's LOGGER backend (main process only).

    Keys are `train/<metric>` and `val/<metric>` as in metrics.jsonl (`val/val_mse_none`, `val/gate`,
    `val/val_cos_world_copy`, ...), at the record's step."""

    def __init__(self, settings: Settings, run_dir: Path):
        from fplus.settings import settings_to_flat

        kind, run_dir = settings.train.logger, Path(run_dir)
        self.kind = kind
        self._tb = None
        self._wandb = None
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ConfigError("LOGGER=tensorboard needs the tensorboard package (pip install tensorboard)") from err
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        elif kind == "trackio":
            try:
                import trackio
            except ImportError as err:
                raise ConfigError("LOGGER=trackio needs the trackio package (pip install trackio)") from err
            self._trackio = trackio
            trackio.init(project="fplus", name=run_dir.name, config=settings_to_flat(settings), resume="allow")
        elif kind == "wandb":
            self._wandb = open_wandb_run(settings, run_dir, config=settings_to_flat(settings))
        elif kind != "none":
            raise ConfigError(f"unknown LOGGER {kind!r}; valid: none, tensorboard, trackio, wandb")

    def log(self, record: dict) -> None:
        prefix = "val/" if record.get("kind") == "val" else "train/"
        values = {prefix + k: v for k, v in record.items()
                  if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("step", "epoch")}
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, record["step"])
            self._tb.flush()
        elif self.kind == "trackio":
            self._trackio.log(values, step=record["step"])
        elif self._wandb is not None:
            self._wandb.log(values, step=record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        elif self.kind == "trackio":
            self._trackio.finish()
        elif self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def import_wandb():
    """The `wandb` module, or a one-line ConfigError saying what to install."""
    try:
        import wandb
    except ImportError as err:
        raise ConfigError("LOGGER=wandb needs the wandb package (pip install wandb, or pip install -e \".[wandb]\")") \
            from err
    return wandb


def wandb_run_id(settings: Settings, run_dir: Path) -> str:
    """The id of the run directory's W&B run from RUN/wandb.json; drawn and written (atomically) when it has none."""
    path = Path(run_dir) / WANDB_FILE
    if path.is_file():
        fix = "delete it to log into a new W&B run, or restore it (it holds the id of the run's W&B run)"
        data = read_json(path, "the W&B run file", fix)
        if not isinstance(data, dict) or not isinstance(data.get("id"), str) or not data["id"]:
            raise ConfigError(f"{path} records no W&B run id (`id`); {fix}")
        return data["id"]
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    t = settings.train
    write_text_atomic(path, json.dumps({"id": run_id, "project": t.wandb_project, "entity": t.wandb_entity}))
    return run_id


def open_wandb_run(settings: Settings, run_dir: Path, config: dict[str, Any] | None = None):
    """`wandb.init` of the run directory's W&B run (resumed by its stored id: resume="allow", so a run first logged
    offline and never synced still starts online), named and tagged by the run's settings."""
    from fplus.experiments import Experiment

    wandb = import_wandb()
    t, run_dir = settings.train, Path(run_dir)
    tags = list(dict.fromkeys([*t.wandb_tags, Experiment.of(settings).id]))
    run_id = wandb_run_id(settings, run_dir)
    try:
        return wandb.init(project=t.wandb_project, entity=t.wandb_entity, name=t.wandb_run_name or run_dir.name,
                          id=run_id, resume="allow", tags=tags, config=config)
    except wandb.errors.Error as err:  # not logged in, no network, a project one cannot write to
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"LOGGER=wandb: cannot start the W&B run {run_id} of {run_dir} ({reason}); log in with "
                          "`wandb login`, or set WANDB_MODE=offline and upload later with `wandb sync`") from err


def closed_loop_values(result: dict) -> dict[str, float]:
    """The success rates of a closed-loop result (`fplus.eval.closed_loop`) as W&B keys:
    `closed_loop/<sim>/task/<task>/<mode>`, `closed_loop/<sim>/overall/<mode>` and, with a latency section,
    `closed_loop/<sim>/latency/<strategy>-d<d>` (pooled over tasks), plus `closed_loop/step`; modes without a rate
    (oracle) are left out."""
    base = f"{CLOSED_LOOP}/{result['simulator']}"
    values: dict[str, float] = {f"{CLOSED_LOOP}/step": result["step"]}
    for task, per_mode in result["tasks"].items():
        for mode, cell in per_mode.items():
            if cell["rate"] is not None:
                values[f"{base}/task/{task}/{mode}"] = cell["rate"]
    for mode, cell in result["overall"].items():
        values[f"{base}/overall/{mode}"] = cell["rate"]
    for strategy, by_delay in result.get("latency", {}).items():  # the section is optional (no sweep: none)
        for delay, entry in by_delay.items():
            if entry["overall"]["rate"] is not None:
                values[f"{base}/latency/{strategy}-d{delay}"] = entry["overall"]["rate"]
    return values


def log_closed_loop(settings: Settings, run_dir: Path, result: dict, videos: list[Path]) -> None:
    """Log a closed-loop result (`closed_loop_values`) and its rollout videos (`closed_loop/<sim>/video/<file
    stem>`, e.g. `.../video/reach-v3-none-ep0`) as one row of the training run's W&B run, resumed by its stored
    id; plotted against `closed_loop/step`."""
    wandb = import_wandb()
    run = open_wandb_run(settings, run_dir)
    try:
        run.define_metric(f"{CLOSED_LOOP}/step")
        run.define_metric(f"{CLOSED_LOOP}/*", step_metric=f"{CLOSED_LOOP}/step")
        values: dict[str, Any] = closed_loop_values(result)
        for path in videos:
            values[f"{CLOSED_LOOP}/{result['simulator']}/video/{Path(path).stem}"] = wandb.Video(str(path))
        run.log(values)
    finally:
        run.finish()


def closed_loop_logger(settings: Settings, run_dir: Path,
                       video_dir: Path | None) -> Callable[[dict], None] | None:
    """For the closed loop: None unless the run's LOGGER is wandb; else a function logging a result and the MP4s
    written into `video_dir` from now on (`log_closed_loop`). The package is checked now, before any rollout."""
    if settings.train.logger != "wandb":
        return None
    import_wandb()
    since = time.time()

    def log(result: dict) -> None:
        videos = [] if video_dir is None else \
            [p for p in sorted(Path(video_dir).glob("*.mp4")) if p.stat().st_mtime >= since]
        log_closed_loop(settings, run_dir, result, videos)

    return log
