"""`fplus train`: train one experiment into a run directory (resumable)."""

from __future__ import annotations

import shlex
import sys
from typing import Annotated

import typer

from fplus.cli.options import Experiment, MaxSteps, Profile, settings_from_cli


def train(
    experiment: Experiment = None,
    profile: Profile = None,
    run_name: Annotated[str | None, typer.Option(help="run directory name under OUTPUT_DIR (RUN_NAME)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run from its newest valid checkpoint")]
    = False,
    max_steps: MaxSteps = None,
    max_epochs: Annotated[int | None, typer.Option(help="epochs (MAX_EPOCHS)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="samples per step per device (BATCH_SIZE)")] = None,
) -> None:
    """Train one experiment (E0-E4). Multi-GPU: accelerate launch --config_file profiles/accelerate/ddp.yaml
    -m fplus.cli.main train ... (fsdp.yaml, deepspeed.yaml, multinode.yaml likewise).

    The run directory is OUTPUT_DIR/RUN_NAME (default: the experiment id). It holds config.json, split.json,
    metrics.jsonl and checkpoints/; --resume continues exactly where a killed run stopped. Ctrl-C or SIGTERM
    finishes the step in progress, saves a checkpoint and exits (130 / 143); a second Ctrl-C aborts at once.
    """
    from rich.console import Console

    from fplus.cli.output import rank_zero
    from fplus.rundir import run_dir_for
    from fplus.train.run import train_run

    settings = settings_from_cli(profile, EXPERIMENT=experiment, RUN_NAME=run_name, MAX_STEPS=max_steps,
                                 MAX_EPOCHS=max_epochs, BATCH_SIZE=batch_size)
    console = Console()
    run_dir = run_dir_for(settings)
    progress = train_run(settings, run_dir, resume=resume, console=console, resume_hint=_resume_hint())
    if rank_zero():  # one line, not one per process under torchrun/accelerate
        console.print(f"finished {run_dir}: {progress.step} steps, {progress.epoch} epochs", markup=False)


def _resume_hint() -> str:
    """ "resume with `fplus train -e E2 --resume`": this invocation's arguments, with --resume."""
    args = sys.argv[1:] if sys.argv[1:2] == ["train"] else ["train"]
    if "--resume" not in args:
        args = [*args, "--resume"]
    return f"resume with `fplus {shlex.join(args)}`"
