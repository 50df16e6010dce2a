"""Optional metric loggers next to metrics.jsonl (which is always written): TensorBoard or trackio (LOGGER)."""

from __future__ import annotations

from pathlib import Path

from fplus.errors import ConfigError


class MetricLogger:
    """Forwards numeric metrics of each `train`/`val` record to the chosen backend (main process only)."""

    def __init__(self, kind: str, run_dir: Path, run_name: str, config: dict):
        self.kind = kind
        self._tb = None
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
            trackio.init(project="fplus", name=run_name, config=config, resume="allow")
        elif kind != "none":
            raise ConfigError(f"unknown LOGGER {kind!r}; valid: none, tensorboard, trackio")

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

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        elif self.kind == "trackio":
            self._trackio.finish()
