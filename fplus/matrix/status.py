"""`fplus matrix --status`: every run of a profile's matrix as it stands on disk (and in Slurm), without starting
anything: run state (new/partial/complete), steps done of the total, which evaluations of the last step exist, the
Slurm job recorded for it (OUTPUT_DIR/slurm/jobs.json) and that job's state, and the run's log."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from fplus.matrix import worker
from fplus.matrix.pipeline import missing_evals
from fplus.matrix.slurm import job_state, read_jobs, slurm_reachable
from fplus.matrix.table import last_step, total_steps
from fplus.rundir import run_dir_for, run_state
from fplus.settings import matrix_settings


@dataclass(frozen=True)
class RunStatus:
    """One run of the matrix: `state` new|partial|complete, `evals` what of its last step is evaluated
    ("offline, sim-libero", "missing offline", "-" before it is complete), `job`/`job_state` its Slurm job (None
    when none was submitted)."""

    name: str
    run_dir: Path
    state: str
    step: int | None
    total: int | None
    evals: str
    job: str | None
    job_state: str | None
    log: Path


def matrix_status(profile: str | None, experiments: list[str] | None = None, overrides: dict | None = None,
                  seeds: list[int] | None = None) -> list[RunStatus]:
    """The status of every run the matrix of `profile` would run (nothing is created or started)."""
    _, per_run = matrix_settings(profile, overrides or {}, experiments, seeds)
    jobs: dict[str, dict] = {}
    reachable = False
    if per_run:
        first = next(iter(per_run.values()))
        jobs = read_jobs(first)
        reachable = bool(jobs) and slurm_reachable()
    out = []
    for name, settings in per_run.items():
        run_dir = run_dir_for(settings)
        missing = missing_evals(settings)
        if missing is None:
            evals = "-"
        else:
            sim = settings.eval.sim
            wanted = ["offline"] + ([f"sim-{sim}"] if sim != "none" else [])
            present = [e for e in wanted if e not in missing]
            evals = ", ".join(present) + ("; " if present and missing else "") + (
                f"missing {', '.join(missing)}" if missing else "")
        job = jobs.get(name, {}).get("job_id")
        state = (job_state(job) if reachable else "? (Slurm not reachable)") if job else None
        out.append(RunStatus(name, run_dir, run_state(run_dir), last_step(run_dir), total_steps(run_dir), evals,
                             job, state, worker.log_file(settings, name)))
    return out


def status_table(rows: list[RunStatus]) -> Table:
    table = Table(title="matrix status", title_justify="left")
    for column in ("run", "state", "step", "evaluated", "Slurm job", "job state", "log"):
        table.add_column(column, overflow="fold")
    for r in rows:
        step = "-" if r.total is None else f"{r.step or 0}/{r.total}"
        log = str(r.log) if r.log.is_file() else "-"
        table.add_row(escape(r.name), r.state, step, escape(r.evals), r.job or "-", escape(r.job_state or "-"),
                      escape(log))
    return table
