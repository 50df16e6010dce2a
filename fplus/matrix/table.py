"""The live table of a matrix's runs (state, step/total, elapsed, where, log), shared by the launchers and
`fplus matrix --status`. Progress is read from the run directory: the last step of RUN/metrics.jsonl and
`total_steps` of RUN/config.json; nothing here talks to the runs' processes."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from fplus.rundir import CONFIG, METRICS

STYLES = {"waiting": "dim", "running": "cyan", "evaluating": "cyan", "stopping": "yellow", "stopped": "yellow",
          "failed": "bold red", "submitted": "cyan", "pending": "dim"}


def last_step(run_dir: Path) -> int | None:
    """The step of the last complete line of RUN/metrics.jsonl (read from its end), or None before the first."""
    path = Path(run_dir) / METRICS
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 16384))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the read window or by a write in progress
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            return record["step"]
    return None


def total_steps(run_dir: Path) -> int | None:
    """`total_steps` of RUN/config.json (written when training starts), or None."""
    try:
        value = json.loads((Path(run_dir) / CONFIG).read_text()).get("total_steps")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def steps_text(run_dir: Path) -> str:
    step, total = last_step(run_dir), total_steps(run_dir)
    if total is None:
        return "-"
    return f"{step or 0}/{total}"


def elapsed_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class Row:
    """One run of the table: `state` is the launcher's word (waiting, running, evaluating, trained, resumed,
    complete, failed, stopped, submitted...), `where` the device(s) or the Slurm job."""

    name: str
    run_dir: Path
    log: Path
    state: str = "waiting"
    where: str = "-"
    started: float | None = None
    ended: float | None = None
    extra: dict = field(default_factory=dict)

    def elapsed(self) -> float | None:
        if self.started is None:
            return None
        return (self.ended or time.time()) - self.started


def render(rows: list[Row], title: str = "matrix") -> Table:
    """The table of `rows` as it stands now (progress read from each run directory)."""
    table = Table(title=title, title_justify="left")
    for column in ("run", "state", "step", "elapsed", "where", "log"):
        table.add_column(column, no_wrap=column != "log", overflow="fold")
    for row in rows:
        style = STYLES.get(row.state.split(" ")[0], "green")
        table.add_row(escape(row.name), f"[{style}]{escape(row.state)}[/]", steps_text(row.run_dir),
                      elapsed_text(row.elapsed()), escape(row.where), escape(str(row.log)))
    return table


def log_tail(log: Path, lines: int = 15) -> str:
    """The last `lines` lines of a run's log (what a failure report shows)."""
    try:
        text = Path(log).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"(no log at {log})"
    return "\n".join(text.rstrip().splitlines()[-lines:])
