"""`fplus matrix`: data -> latents -> train/eval each experiment -> report, for one profile."""

from __future__ import annotations

from typing import Annotated

import typer

from fplus.cli.options import MaxSteps, Profile


def matrix(
    profile: Profile = None,
    experiments: Annotated[str | None, typer.Option(help="comma-separated, e.g. E0,E2,E4 (MATRIX_EXPERIMENTS)")]
    = None,
    max_steps: MaxSteps = None,
) -> None:
    """Run the experiment matrix of a profile: skips finished runs, resumes interrupted ones, then reports.

    A second invocation after everything finished does nothing and says so.
    """
    from rich.console import Console

    from fplus.matrix import run_matrix

    console = Console()
    chosen = [e.strip() for e in experiments.split(",") if e.strip()] if experiments else None
    outcome = run_matrix(profile, chosen, {"MAX_STEPS": max_steps} if max_steps else {}, console)
    if not outcome.did_work:
        console.print(f"all runs are complete ({', '.join(f'{e}: {s}' for e, s in outcome.runs.items())}); "
                      "nothing to do")
    else:
        console.print("matrix finished: " + ", ".join(f"{e}: {s}" for e, s in outcome.runs.items()))
