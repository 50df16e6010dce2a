"""`fplus matrix`: the whole pipeline of a profile, idempotent and resumable.

    demo data (demo profile, when missing) -> world latents (when an experiment needs them) -> CoC labels
    (per MATRIX_MISSING_COC) -> for each experiment and seed (MATRIX_SEEDS): train (new), resume (partial) or skip
    (complete) -> offline eval of the final checkpoint -> closed-loop eval (EVAL_SIM) -> report

Every stage checks what already exists, so a second invocation only reports that everything is complete.

Where the runs go (`run_matrix`):
    one device (cpu, or cuda:0: MATRIX_DEVICES=auto on a one-GPU machine)  in this process, one after another
    several MATRIX_DEVICES slots      one worker process per slot at a time (`fplus.matrix.local`)
    MATRIX_LAUNCHER=slurm              one Slurm job per run through submitit (`fplus.matrix.slurm`)

Modules: `pipeline` (the stages: prepare_matrix, run_one, finish_matrix), `worker` (one run in its own process),
`devices` (MATRIX_DEVICES), `local`, `slurm`, `table` (the live table), `status` (`fplus matrix --status`).
"""

from __future__ import annotations

from rich.console import Console

from fplus.errors import ConfigError
from fplus.matrix.pipeline import MatrixOutcome, finish_matrix, prepare_matrix, run_one
from fplus.settings import load_settings

__all__ = ["MatrixOutcome", "finish_matrix", "prepare_matrix", "run_matrix", "run_one"]


def run_matrix(profile: str | None, experiments: list[str] | None = None, overrides: dict | None = None,
               console: Console | None = None, seeds: list[int] | None = None, wait: bool = True) -> MatrixOutcome:
    """Run the matrix of a profile (see the module docstring); `seeds` overrides MATRIX_SEEDS. MATRIX_DEVICES and
    MATRIX_LAUNCHER (settings or `overrides`) choose where the runs go. `wait=False` (Slurm only) returns once the
    jobs are submitted (`report` unset; a later `fplus matrix` or `fplus report` writes it).

    Raises:
        FplusError: a run failed (the others finished and the report covers them), or a setting is wrong.
        MatrixInterrupted: SIGINT/SIGTERM stopped runs in worker processes (each saved a checkpoint); exit 130/143.
    """
    console = console or Console()
    if not wait and load_settings(profile, overrides).run.launcher != "slurm":  # before any stage runs
        raise ConfigError("--no-wait needs MATRIX_LAUNCHER=slurm (--launcher slurm): runs on this machine end with "
                          "the matrix")
    base, ready, outcome = prepare_matrix(profile, experiments, overrides, console, seeds)
    if base.run.launcher == "slurm":
        from fplus.matrix.slurm import run_slurm

        return run_slurm(base, ready, outcome, console, wait=wait)
    from fplus.matrix.slurm import active_jobs

    busy = active_jobs(base, list(ready))
    if busy:
        raise ConfigError(f"{', '.join(f'{n} (Slurm job {j})' for n, j in busy.items())} still in Slurm: wait for "
                          "the jobs (`fplus matrix --launcher slurm` follows them and writes the report; "
                          "`fplus matrix --status` shows them) or cancel them (scancel) before running here")
    from fplus.matrix.devices import resolve_slots

    slots, in_process = resolve_slots(base.run.devices)
    if in_process or len(ready) == 0:
        for name, settings in ready.items():
            outcome.runs[name], did_work = run_one(name, settings, console)
            outcome.did_work |= did_work
        return finish_matrix(base, ready, outcome, console)
    from fplus.matrix.local import raise_failures, run_parallel

    outcome, failures = run_parallel(base, ready, outcome, slots, console)
    finished = {name: s for name, s in ready.items() if name not in failures}
    outcome = finish_matrix(base, finished, outcome, console)
    raise_failures(failures, len(ready))
    return outcome
