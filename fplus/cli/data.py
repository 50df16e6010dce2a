"""`fplus data ...`: make the demo dataset, describe a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fplus.cli.options import (
    ActionKey,
    DatasetArg,
    ImageKey,
    InstructionKey,
    OutDir,
    Overwrite,
    Profile,
    StateKey,
    settings_from_cli,
)

app = typer.Typer(help="Datasets: the Meta-World demo and LeRobot v3.0 inspection.", no_args_is_help=True)


@app.command()
def info(
    dataset: DatasetArg = None,
    profile: Profile = None,
    image_key: ImageKey = None,
    instruction_key: InstructionKey = None,
    state_key: StateKey = None,
    action_key: ActionKey = None,
) -> None:
    """Describe a LeRobot v3.0 dataset: features, episodes, tasks, fps, and problems of the configured keys.

    Keys configured through options, the profile, .env or the environment (IMAGE_KEY, INSTRUCTION_KEY, ...)
    are checked; a missing one makes the command fail after the summary, listing the keys that exist. So does a
    NaN/inf in a float feature (naming the key, episode and frame).
    """
    from rich.console import Console

    from fplus.data.info import render, summarize
    from fplus.data.lerobot import DataKeys, LeRobotDataset
    from fplus.errors import ConfigError, DataError

    settings = settings_from_cli(profile, DATASET=dataset, IMAGE_KEY=image_key, INSTRUCTION_KEY=instruction_key,
                                 STATE_KEY=state_key, ACTION_KEY=action_key)
    d = settings.data
    if d.dataset is None:
        raise ConfigError("no dataset given: pass a PATH or set DATASET")
    keys = DataKeys(image=d.image_key, wrist_image=d.wrist_image_key, state=d.state_key, action=d.action_key,
                    instruction=d.instruction_key)
    ds = LeRobotDataset.open(d.dataset, revision=d.revision)
    summary = summarize(ds, keys)
    try:
        stats = ds.stats
    except DataError:  # non-finite statistics: listed among the value problems
        stats = {}
    console = Console()
    for renderable in render(summary, stats):
        console.print(renderable)
    problems = summary.value_problems
    if summary.key_problems:
        problems = ["; ".join(summary.key_problems) + f". Keys in the dataset: {', '.join(summary.user_keys)}",
                    *problems]
    if problems:
        raise DataError("; ".join(problems))


@app.command()
def demo(
    out: OutDir = None,
    profile: Profile = None,
    tasks: Annotated[str | None, typer.Option(help="comma-separated Meta-World v3 tasks (DEMO_TASKS)")] = None,
    episodes: Annotated[int | None, typer.Option(help="episodes per task (DEMO_EPISODES)")] = None,
    image_size: Annotated[int | None, typer.Option(help="camera resolution in px (DEMO_IMAGE_SIZE)")] = None,
    max_steps: Annotated[int | None, typer.Option(help="max steps per episode (DEMO_MAX_STEPS)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the first episode (DEMO_SEED)")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Record the demo dataset: Meta-World scripted experts -> LeRobot v3.0 (needs the `sim` extra).

    The output is --out, else DATASET. An existing finished dataset is kept unless --overwrite. An interrupt
    (SIGINT: exit 130, SIGTERM: 143) removes the partial recording and leaves an existing dataset as it was.
    """
    from rich.console import Console

    from fplus.cli.output import same_command, say_interrupted
    from fplus.errors import ConfigError, SimulatorError
    from fplus.signals import signal_exit, sigterm_as_interrupt

    settings = settings_from_cli(profile, DATASET=str(out) if out else None, DEMO_TASKS=tasks,
                                 DEMO_EPISODES=episodes, DEMO_IMAGE_SIZE=image_size, DEMO_MAX_STEPS=max_steps,
                                 DEMO_SEED=seed)
    d = settings.data
    if d.dataset is None:
        raise ConfigError("no output directory: pass --out or set DATASET (the demo profile sets it)")
    target = Path(d.dataset)
    console = Console()
    if (target / "meta" / "info.json").is_file() and not overwrite:
        console.print(f"{target} already holds a dataset; keeping it (--overwrite to record it again)",
                      markup=False)
        return
    with sigterm_as_interrupt():
        try:
            try:
                from fplus.data.demo import make_demo_dataset
            except ImportError as err:
                raise SimulatorError(f"the demo needs the `sim` extra (pip install -e '.[sim]'): {err}") from err
            report = make_demo_dataset(target, tasks=d.demo_tasks, episodes_per_task=d.demo_episodes,
                                       image_size=d.demo_image_size, seed=d.demo_seed, max_steps=d.demo_max_steps,
                                       overwrite=overwrite)
        except KeyboardInterrupt as err:  # DemoInterrupted says how far it got
            name, code = signal_exit(err)
            done = f" after {err.episodes_done} of {err.episodes_total} episodes" \
                if hasattr(err, "episodes_done") else ""
            kept = f"{target} still holds the dataset it held before" if (target / "meta" / "info.json").is_file() \
                else f"nothing was written to {target}"
            raise say_interrupted(f"{name}{done}: the partial recording was removed and {kept}; record it with "
                                  f"`{same_command()}`", code) from None
    report.print(console)
