"""A human summary of a LeRobot dataset: what `fplus data info` prints."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fplus.data.lerobot import DataKeys, LeRobotDataset


@dataclass(frozen=True)
class DatasetSummary:
    """Facts about a dataset plus the problems of the configured keys."""

    root: str
    repo_id: str | None
    fps: int
    robot_type: str | None
    num_episodes: int
    num_frames: int
    tasks: list[str]
    features: dict[str, dict]
    episode_lengths: np.ndarray  # (E,)
    key_problems: list[str]
    configured_keys: dict[str, str]
    value_problems: list[str]  # NaN/inf in float columns or their statistics (LeRobotDataset.value_problems)

    @property
    def user_keys(self) -> list[str]:
        """The keys a profile can name (features without the index columns, plus `task`)."""
        index = {"timestamp", "frame_index", "episode_index", "index", "task_index"}
        return [k for k in self.features if k not in index] + ["task"]


def summarize(ds: LeRobotDataset, keys: DataKeys | None = None) -> DatasetSummary:
    """Collect the summary; key and value problems are listed, not raised, so the rest can still be shown.
    Reads the data files (vectorised NaN/inf check of the float columns)."""
    keys = keys or DataKeys()
    return DatasetSummary(
        root=str(ds.root), repo_id=ds.repo_id, fps=ds.fps, robot_type=ds.info.get("robot_type"),
        num_episodes=ds.num_episodes, num_frames=ds.num_frames, tasks=ds.tasks, features=ds.features,
        episode_lengths=np.array([e.length for e in ds.episodes]), key_problems=ds.key_problems(keys),
        configured_keys=keys.named(), value_problems=ds.value_problems(),
    )


def render(summary: DatasetSummary, stats: dict[str, dict[str, np.ndarray]]):
    """Rich renderables for a summary (a header panel, the features table, the tasks table)."""
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    lengths = summary.episode_lengths
    header = (
        f"[bold]{summary.root}[/]" + (f"  (hub: {summary.repo_id})" if summary.repo_id else "") + "\n"
        f"episodes [bold]{summary.num_episodes}[/]   frames [bold]{summary.num_frames}[/]   "
        f"tasks [bold]{len(summary.tasks)}[/]   fps [bold]{summary.fps}[/]   robot {summary.robot_type}\n"
        f"episode length min {lengths.min()} / mean {lengths.mean():.1f} / max {lengths.max()} frames "
        f"({lengths.sum() / summary.fps:.1f} s in all)\n"
        f"keys: {', '.join(summary.user_keys)}"
    )
    features = Table(title="features", title_justify="left")
    features.add_column("key", overflow="fold")
    for col in ("dtype", "shape", "details"):
        features.add_column(col)
    for key, ft in summary.features.items():
        if ft["dtype"] == "video":
            info = ft.get("info", {})
            details = f"{info.get('video.codec', '?')} {info.get('video.pix_fmt', '')} {info.get('video.fps', '')} fps"
        elif key in stats and "mean" in stats[key] and ft["dtype"].startswith("float"):
            mean, std = np.asarray(stats[key]["mean"]), np.asarray(stats[key]["std"])
            details = f"mean {np.round(mean.ravel()[:4], 3).tolist()} std {np.round(std.ravel()[:4], 3).tolist()}"
            details += " ..." if mean.size > 4 else ""
        else:
            details = ", ".join(map(str, ft.get("names") or []))[:60]
        features.add_row(key, ft["dtype"], str(tuple(ft["shape"])), details)
    tasks = Table(title=f"tasks ({len(summary.tasks)})", title_justify="left")
    tasks.add_column("index", justify="right")
    tasks.add_column("task")
    for i, task in enumerate(summary.tasks[:20]):
        tasks.add_row(str(i), task)
    if len(summary.tasks) > 20:
        tasks.add_row("...", f"{len(summary.tasks) - 20} more")
    out = [Panel(header, title="LeRobot v3.0 dataset", expand=False), features, tasks]
    floats = [k for k, f in summary.features.items() if f["dtype"].startswith("float")]
    values = "\n".join(f"[red]x[/] {escape(p)}" for p in summary.value_problems) or \
        f"[green]no NaN/inf in {', '.join(floats) or 'the float features'}[/]"
    out.append(Panel(values, title="values", expand=False))
    if summary.configured_keys:
        status = "\n".join(
            f"{name}={key}" for name, key in summary.configured_keys.items()
        )
        problems = "\n".join(f"[red]x[/] {p}" for p in summary.key_problems) or "[green]all configured keys exist[/]"
        out.append(Panel(f"{status}\n{problems}", title="configured keys", expand=False))
    return out
