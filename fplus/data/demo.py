"""The Meta-World demo dataset: scripted experts rolled out and written as LeRobot v3.0.

    from fplus.settings import load_settings

    d = load_settings("demo").data  # the defaults live in DataSettings (DEMO_TASKS, DEMO_EPISODES, ...)
    report = make_demo_dataset(Path(d.dataset), tasks=d.demo_tasks, episodes_per_task=d.demo_episodes,
                               image_size=d.demo_image_size, seed=d.demo_seed, max_steps=d.demo_max_steps)
    report.print()

Features: `observation.images.image` (video, corner camera, upright, image_size x image_size),
`observation.state` (4: hand_x, hand_y, hand_z, gripper), `action` (4: dx, dy, dz, grip, clipped to [-1, 1]);
the task string of an episode is our sentence from `TASK_DESCRIPTIONS`.

This module has no defaults of its own: the tasks, episode count, image size, step limit and seed are the
settings DEMO_TASKS, DEMO_EPISODES, DEMO_IMAGE_SIZE, DEMO_MAX_STEPS and DEMO_SEED (`DataSettings` in
`fplus/settings.py`), passed by the callers (`fplus data demo`, `fplus matrix`). The default DEMO_TASKS are four
visually distinct tasks whose experts succeed in 20/20 episodes (seeds 0-19, 150 steps), ending after 57, 71, 100
and 76 steps on average (10 steps after the first success).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fplus.data.writer import LeRobotWriter
from fplus.errors import DataError
from fplus.progress import make_progress
from fplus.sim.metaworld import (
    ACTION_NAMES,
    DEFAULT_STEPS_AFTER_SUCCESS,
    STATE_NAMES,
    MetaWorldEnv,
    check_task,
    run_expert_episode,
    task_description,
)

DEMO_FPS = 10
"""Frame rate written to the dataset. One Meta-World step is 12.5 ms of simulated time (80 Hz control); the
dataset's clock runs at 10 frames per second, so timestamps count steps (t = step / 10), not simulated seconds."""

ROBOT_TYPE = "sawyer"

MAX_ATTEMPTS_FACTOR = 3
"""A task gets at most `MAX_ATTEMPTS_FACTOR * episodes_per_task` expert attempts before it is an error."""


class DemoInterrupted(KeyboardInterrupt):
    """SIGINT (or SIGTERM, raised as a KeyboardInterrupt by the CLI) while recording: the partial dataset was removed.

    Attributes: out, partial (the removed `<out>.partial`), episodes_done, episodes_total, signum.
    """

    def __init__(self, out: Path, partial: Path, episodes_done: int, episodes_total: int, signum: int):
        super().__init__(f"interrupted after {episodes_done} of {episodes_total} episodes ({out})")
        self.out, self.partial, self.signum = out, partial, signum
        self.episodes_done, self.episodes_total = episodes_done, episodes_total


@dataclass
class TaskDemoReport:
    """How the expert of one task did: every attempt, the kept (successful) episodes and their seeds."""

    task: str
    description: str
    attempts: int = 0
    successes: int = 0
    frames: int = 0  # frames of the kept episodes
    seeds: list[int] = field(default_factory=list)  # seeds of the kept episodes, in episode order
    failed_seeds: list[int] = field(default_factory=list)  # seeds whose expert episode failed (not written)

    @property
    def success_rate(self) -> float:
        """Expert success rate over all attempts (failed attempts included)."""
        return self.successes / self.attempts if self.attempts else 0.0


@dataclass
class DemoReport:
    """What `make_demo_dataset` wrote and how the experts did."""

    path: Path
    tasks: list[TaskDemoReport]
    image_size: int
    fps: int
    max_steps: int
    seconds: float

    @property
    def episodes(self) -> int:
        return sum(len(t.seeds) for t in self.tasks)

    @property
    def frames(self) -> int:
        return sum(t.frames for t in self.tasks)

    def table(self) -> Table:
        """A Rich table: one row per task (expert success, kept episodes, frames, failed seeds) and a total row."""
        table = Table(title=f"Meta-World demo dataset: {self.path}", caption=(
            f"{self.image_size}x{self.image_size} px, {self.fps} fps, at most {self.max_steps} steps per episode, "
            f"{self.seconds:.1f} s"))
        table.add_column("task", no_wrap=True)
        table.add_column("expert success", justify="right", no_wrap=True)
        table.add_column("episodes", justify="right")
        table.add_column("frames", justify="right")
        table.add_column("failed seeds")
        for t in self.tasks:
            table.add_row(t.task, f"{t.successes}/{t.attempts} ({t.success_rate:.0%})", str(len(t.seeds)),
                          f"{t.frames:,}", ", ".join(map(str, t.failed_seeds)) or "-")
        successes = sum(t.successes for t in self.tasks)
        attempts = sum(t.attempts for t in self.tasks)
        table.add_section()
        table.add_row("total", f"{successes}/{attempts} ({successes / max(attempts, 1):.0%})", str(self.episodes),
                      f"{self.frames:,}", "")
        return table

    def print(self, console: Console | None = None) -> None:
        """Print `table()` to `console` (a new stdout console when None)."""
        (console or Console()).print(self.table())


def demo_features(image_size: int) -> dict[str, dict]:
    """The LeRobot features of the demo dataset (the writer adds the index columns)."""
    return {
        "observation.images.image": {"dtype": "video", "shape": [image_size, image_size, 3],
                                     "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": [len(STATE_NAMES)], "names": list(STATE_NAMES)},
        "action": {"dtype": "float32", "shape": [len(ACTION_NAMES)], "names": list(ACTION_NAMES)},
    }


def make_demo_dataset(out: Path, *, tasks: list[str], episodes_per_task: int, image_size: int, seed: int,
                      max_steps: int, overwrite: bool = False, progress: bool = True) -> DemoReport:
    """Roll out the scripted experts of `tasks` and write `episodes_per_task` successful episodes of each to `out`.

    Seeds: task by task, attempts use the seeds `seed, seed + 1, ...` (each seed draws the object/goal layout), so
    the dataset is a deterministic function of the arguments. An expert episode ends 10 steps after its first
    success (`DEFAULT_STEPS_AFTER_SUCCESS`) or after `max_steps` steps.

    Failed expert episodes are not written: the next seed is tried instead (a behaviour-cloning dataset should not
    teach failures). The report records every attempt, the expert success rate and the failed seeds. A task whose
    expert needs more than `MAX_ATTEMPTS_FACTOR * episodes_per_task` attempts is an error (its max_steps is likely
    too short). The seeds of the kept episodes are in the report: evaluate on other seeds.

    Args:
        out: dataset directory to create (written as `<out>.partial`, renamed when complete).
        tasks: Meta-World v3 task names (DEMO_TASKS).
        episodes_per_task: successful episodes to write per task.
        image_size: frame height = width in pixels (even, for H.264 yuv420p).
        seed: the first seed of every task.
        max_steps: step limit of an episode.
        overwrite: replace an existing `out`.
        progress: show a Rich progress bar over episodes.
    Raises:
        DemoInterrupted: a KeyboardInterrupt while recording; the partial dataset was removed.
    """
    if not tasks:
        raise DataError("no demo tasks given")
    duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
    if duplicates:
        raise DataError(f"demo tasks listed twice: {', '.join(duplicates)}")
    for task in tasks:
        check_task(task)
    if episodes_per_task < 1:
        raise DataError(f"episodes_per_task must be >= 1, got {episodes_per_task}")
    if image_size % 2:
        raise DataError(f"image_size must be even (H.264 yuv420p video), got {image_size}")

    start = time.perf_counter()
    writer = LeRobotWriter(Path(out), fps=DEMO_FPS, features=demo_features(image_size), robot_type=ROBOT_TYPE,
                           overwrite=overwrite)
    reports = [TaskDemoReport(task=task, description=task_description(task)) for task in tasks]
    try:
        with make_progress("episodes", disable=not progress) as bar:
            job = bar.add_task("demo", total=len(tasks) * episodes_per_task, info="")
            for report in reports:
                _record_task(writer, report, episodes_per_task=episodes_per_task, image_size=image_size,
                             first_seed=seed, max_steps=max_steps, bar=bar, job=job)
        path = writer.finalize()
    except BaseException as err:
        writer.abort()  # an interrupted or failed recording leaves nothing behind (`out` is untouched)
        if isinstance(err, KeyboardInterrupt):
            raise DemoInterrupted(Path(out), writer.tmp, len(writer.episodes), len(tasks) * episodes_per_task,
                                  getattr(err, "signum", signal.SIGINT)) from err
        raise
    return DemoReport(path=path, tasks=reports, image_size=image_size, fps=DEMO_FPS, max_steps=max_steps,
                      seconds=time.perf_counter() - start)


def _record_task(writer: LeRobotWriter, report: TaskDemoReport, *, episodes_per_task: int, image_size: int,
                 first_seed: int, max_steps: int, bar, job) -> None:
    """Roll out the expert of `report.task` until `episodes_per_task` successes are written; updates `report`."""
    max_attempts = MAX_ATTEMPTS_FACTOR * episodes_per_task
    with MetaWorldEnv(report.task, image_size=image_size, max_steps=max_steps) as env:
        while len(report.seeds) < episodes_per_task:
            if report.attempts >= max_attempts:
                raise DataError(
                    f"{report.task}: the expert succeeded in only {report.successes} of {report.attempts} episodes "
                    f"(max_steps={max_steps}); raise max_steps or choose another task")
            episode_seed = first_seed + report.attempts
            bar.update(job, description=report.task,
                       info=f"episode {len(report.seeds) + 1}/{episodes_per_task}, seed {episode_seed}, "
                            f"expert success {report.successes}/{report.attempts}")
            episode = run_expert_episode(env, episode_seed, steps_after_success=DEFAULT_STEPS_AFTER_SUCCESS)
            report.attempts += 1
            if not episode.success:
                report.failed_seeds.append(episode_seed)
                continue
            report.successes += 1
            writer.add_episode(report.description, {
                "observation.images.image": episode.images,
                "observation.state": episode.state,
                "action": episode.action,
            })
            report.seeds.append(episode_seed)
            report.frames += episode.num_steps
            bar.advance(job)
    bar.update(job, info=f"{report.task}: expert success {report.successes}/{report.attempts}")
