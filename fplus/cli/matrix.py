"""`fplus matrix`: data -> latents -> train/eval each experiment -> report, for one profile."""

from __future__ import annotations

from typing import Annotated

import typer

from fplus.cli.options import MaxSteps, Profile


def matrix(
    profile: Profile = None,
    experiments: Annotated[str | None, typer.Option(help="comma-separated, e.g. E0,E2,E4 (MATRIX_EXPERIMENTS)")]
    = None,
    seeds: Annotated[str | None, typer.Option(help="comma-separated training seeds, e.g. 0,1,2: each experiment "
                                                   "once per seed (MATRIX_SEEDS)")] = None,
    max_steps: MaxSteps = None,
    devices: Annotated[str | None, typer.Option(help="where the runs go on this machine: auto, or e.g. "
                                                     "cuda:0,cuda:1 (one run per GPU, in parallel), "
                                                     "cuda:0+cuda:1,cuda:2+cuda:3 (2 GPUs per run), cpu,cpu "
                                                     "(MATRIX_DEVICES)")] = None,
    launcher: Annotated[str | None, typer.Option(help="local (this machine, MATRIX_DEVICES) or slurm (a job per "
                                                      "run through submitit, SLURM_* settings) (MATRIX_LAUNCHER)")]
    = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="--no-wait (slurm): return once the jobs are "
                                                                "submitted; a later `fplus matrix` writes the report")]
    = True,
    status: Annotated[bool, typer.Option("--status", help="show every run's state, steps, evaluations and Slurm "
                                                          "job, and start nothing")] = False,
) -> None:
    """Run the experiment matrix of a profile: skips finished runs, resumes interrupted ones, then reports.

    A second invocation after everything finished does nothing and says so.
    """
    from rich.console import Console

    console = Console()
    chosen = [e.strip() for e in experiments.split(",") if e.strip()] if experiments else None
    overrides = {"MAX_STEPS": max_steps} if max_steps else {}
    if seeds is not None:
        overrides["MATRIX_SEEDS"] = seeds  # validated (distinct integers) with the other settings
    if devices is not None:
        overrides["MATRIX_DEVICES"] = devices
    if launcher is not None:
        overrides["MATRIX_LAUNCHER"] = launcher
    if status:
        from fplus.matrix.status import matrix_status, status_table

        console.print(status_table(matrix_status(profile, chosen, overrides)))
        return
    from fplus.matrix import run_matrix

    outcome = run_matrix(profile, chosen, overrides, console, wait=wait)
    summary = ", ".join(f"{e}: {s}" for e, s in outcome.runs.items())
    if "submitted" in outcome.runs.values():
        console.print(f"matrix submitted: {summary}")
    elif not outcome.did_work:
        console.print(f"all runs are complete ({summary}); nothing to do")
    else:
        console.print(f"matrix finished: {summary}")
