"""The pipeline of `fplus matrix`, one stage per function: `prepare_matrix` (once), `run_one` (per run, in this process
or in a worker process: `fplus.matrix.worker`), `finish_matrix` (the report). Every stage checks what already exists.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from fplus.errors import CheckpointError, ConfigError, DataError
from fplus.experiments import Experiment
from fplus.rundir import COMPLETE, offline_result, run_dir_for, run_state, sim_result
from fplus.settings import Settings, matrix_settings

REPORT_PENDING = "slurm/REPORT_PENDING"
"""Under OUTPUT_DIR: Slurm jobs were submitted without waiting (`--no-wait`); the next matrix writes the report."""


@dataclass
class MatrixOutcome:
    """What a matrix invocation did: per run (name as in `matrix_settings`) `trained|resumed|complete|skipped`, and
    the report dir."""

    runs: dict[str, str] = field(default_factory=dict)
    did_work: bool = False
    report: Path | None = None


def _ensure_dataset(settings: Settings, console: Console) -> bool:
    d = settings.data
    if d.dataset is None:
        raise ConfigError("the profile sets no DATASET")
    if Path(d.dataset).exists():
        return False
    if not settings.run.make_demo_data:
        return False  # a hub id, or a path that opening the dataset will report as missing
    members = d.members()
    if len(members) > 1 or members[0].source != d.dataset:
        return False  # a mixture (list or file): its members are opened (and reported when missing) one by one
    from fplus.data.demo import make_demo_dataset

    console.rule("demo data")
    report = make_demo_dataset(Path(d.dataset), tasks=d.demo_tasks, episodes_per_task=d.demo_episodes,
                               image_size=d.demo_image_size, seed=d.demo_seed, max_steps=d.demo_max_steps)
    report.print(console)
    return True


def _ensure_latents(settings: Settings, console: Console) -> bool:
    from fplus.data.lerobot import keys_from_settings
    from fplus.data.mixture import members_of, open_dataset
    from fplus.world.cache import compute_latents, find_dataset_latents
    from fplus.world.encoders import build_encoder

    w = settings.world
    keys = keys_from_settings(settings.data)
    ds = open_dataset(settings.data, keys)  # a mixture: the latents of each of its datasets
    encoder_id = w.dino_model if w.source == "dino" else w.vjepa_model
    try:  # a finished, matching cache: no need to load the encoder at all
        find_dataset_latents(w.cache_dir, ds, keys.image, w.source, encoder_id, w.pooling, w.temporal_window)
        return False
    except DataError:  # no cache, or one that compute_latents resumes or reports
        pass
    encoder = build_encoder(w.source, dino_model=w.dino_model, vjepa_model=w.vjepa_model, pooling=w.pooling,
                            temporal_window=w.temporal_window)
    did_work = False
    for member in members_of(ds):
        result = compute_latents(member, keys.image, encoder, w.cache_dir, w.batch_size, console=console)
        if result.status != "complete":
            console.print(f"latents {result.status}: {result.frames_computed} frames in {result.seconds:.1f} s")
            did_work = True
    return did_work


def _ensure_coc(settings: Settings, experiment: str, console: Console) -> str | None:
    """None when the CoC labels are ready (or not needed), else a reason to skip the experiment."""
    if not Experiment.of(settings).needs_coc:
        return None
    path = settings.coc.jsonl
    if path is not None and Path(path).is_file():
        return None
    mode = settings.run.missing_coc
    state = "unset" if path is None else f"{path} (missing)"
    if mode == "error":
        raise ConfigError(f"{experiment} needs CoC labels: COC_JSONL is {state}. Write them with "
                         "`fplus coc generate`, or set MATRIX_MISSING_COC=skip|generate")
    if mode == "skip":
        return f"no CoC labels (COC_JSONL {state})"
    if path is None:
        raise ConfigError("MATRIX_MISSING_COC=generate needs COC_JSONL to name the file to write")
    from fplus.coc.generate import generate_labels

    console.rule("CoC labels")
    generate_labels(settings, Path(path), console)
    return None


def prepare_matrix(profile: str | None, experiments: list[str] | None = None, overrides: dict | None = None,
                   console: Console | None = None, seeds: list[int] | None = None
                   ) -> tuple[Settings, dict[str, Settings], MatrixOutcome]:
    """Everything the runs share, done once: the simulator check (fail now, not after hours of training), the demo
    data, the world latents and the CoC labels. Returns the base settings, the settings of each run that can go
    (run name -> settings; see `fplus.settings.matrix_settings`) and the outcome so far (skipped runs)."""
    console = console or Console()
    base, per_run = matrix_settings(profile, overrides or {}, experiments, seeds)
    if base.eval.sim != "none":
        from fplus.sim.registry import get_simulator

        get_simulator(base.eval.sim).check_available()
    outcome = MatrixOutcome()
    outcome.did_work |= _ensure_dataset(base, console)
    if any(Experiment.of(s).needs_world for s in per_run.values()):
        outcome.did_work |= _ensure_latents(base, console)
    ready = {}
    for name, settings in per_run.items():
        skip = _ensure_coc(settings, name, console)
        if skip:
            console.print(f"[bold yellow]warning: skipping {name}: {skip}")
            outcome.runs[name] = "skipped"
        else:
            ready[name] = settings
    return base, ready, outcome


def run_one(name: str, settings: Settings, console: Console | None = None,
            resume_hint: str | None = None) -> tuple[str, bool]:
    """One matrix run: train (new), resume (partial) or skip (complete), then the offline eval of its final
    checkpoint and the closed loop (EVAL_SIM), each only when its result is missing. Returns (`trained`, `resumed` or
    `complete`; whether anything was done). `resume_hint`: how to resume, printed when a signal stops training
    (default: the `fplus matrix` command of this process)."""
    console = console or Console()
    status, trained = train_stage(name, settings, console, resume_hint)
    return status, eval_stage(name, settings, console) or trained


def train_stage(name: str, settings: Settings, console: Console, resume_hint: str | None = None) -> tuple[str, bool]:
    """Train (new), resume (partial) or skip (complete) one run; every process of a multi-GPU run calls it.
    Returns (`trained`, `resumed` or `complete`; whether it trained)."""
    from fplus.train.run import train_run

    run_dir = run_dir_for(settings)
    state = run_state(run_dir)
    if state == "complete":
        return "complete", False
    console.rule(f"{name}: {'resume' if state == 'partial' else 'train'} -> {run_dir}")
    train_run(settings, run_dir, resume=state == "partial", console=console,
              resume_hint=resume_hint or default_resume_hint())
    return ("resumed" if state == "partial" else "trained"), True


def eval_stage(name: str, settings: Settings, console: Console) -> bool:
    """The offline eval of a finished run's last checkpoint and its closed loop (EVAL_SIM), each only when its result
    file is missing (one process). Returns whether anything was evaluated."""
    from fplus.checkpoint import latest_valid, manifest_step
    from fplus.eval.offline import evaluate_run, results_table
    from fplus.model.corruption import MODES

    run_dir = run_dir_for(settings)
    did_work = False
    last = latest_valid(run_dir)
    if last is None:
        raise CheckpointError(f"{run_dir} is complete but has no usable checkpoint to evaluate; delete "
                              f"{run_dir / 'COMPLETE'} and run the matrix again to train it again")
    step = manifest_step(last)
    if not offline_result(run_dir, step).is_file():
        result, _ = evaluate_run(run_dir, MODES, device=settings.eval.device)
        console.print(results_table(result))
        did_work = True
    sim = settings.eval.sim
    if sim != "none" and not sim_result(run_dir, sim, step).is_file():
        from fplus.eval.closed_loop import CLOSED_LOOP_MODES, evaluate_closed_loop
        from fplus.eval.closed_loop import results_table as sim_table

        console.rule(f"{name}: closed loop in {sim}")
        result, _ = evaluate_closed_loop(run_dir, sim, None, settings.eval.episodes, CLOSED_LOOP_MODES,
                                         console=console, suite=settings.eval.suite, device=settings.eval.device,
                                         corrupted_episodes=settings.eval.corrupted_episodes,
                                         processes=settings.eval.processes)
        console.print(sim_table(result))
        did_work = True
    return did_work


def finish_matrix(base: Settings, ready: dict[str, Settings], outcome: MatrixOutcome,
                  console: Console) -> MatrixOutcome:
    """The report over every run that was not skipped (written when anything changed, when it is missing, or when
    Slurm jobs were submitted without waiting for them: OUTPUT_DIR/slurm/REPORT_PENDING)."""
    runs = [run_dir_for(s) for s in ready.values()]
    report_dir = Path(base.train.output_dir) / "report"
    pending = Path(base.train.output_dir) / REPORT_PENDING
    if outcome.did_work or not (report_dir / "report.json").is_file() or pending.is_file():
        outcome.report = _write_report(runs, report_dir, console)
        outcome.did_work = True
        pending.unlink(missing_ok=True)
    return outcome


def missing_evals(settings: Settings) -> list[str] | None:
    """What a complete run still lacks among its evaluations of the last step (`offline`, `sim-<simulator>`);
    None when the run is not complete (cheap: COMPLETE's step and file names only, no checkpoint is read)."""
    run_dir = run_dir_for(settings)
    if run_state(run_dir) != "complete":
        return None
    try:
        step = json.loads((run_dir / COMPLETE).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return ["offline"]  # unreadable: run_one's eval stage reports it
    missing = [] if offline_result(run_dir, step).is_file() else ["offline"]
    sim = settings.eval.sim
    if sim != "none" and not sim_result(run_dir, sim, step).is_file():
        missing.append(f"sim-{sim}")
    return missing


def needs_work(settings: Settings) -> bool:
    """Whether `run_one` would do anything for this run: train or resume it, or evaluate its last step."""
    return missing_evals(settings) != []


def default_resume_hint() -> str:
    """How to resume after a signal stopped a run: the same `fplus matrix` command again."""
    if os.path.basename(sys.argv[0]) in ("fplus", "main.py") and sys.argv[1:2] == ["matrix"]:
        return f"run `fplus {shlex.join(sys.argv[1:])}` again to resume it"
    return "run the same `fplus matrix` again to resume it (it resumes partial runs)"


def _write_report(runs: list[Path], out: Path, console: Console) -> Path:
    from fplus.report.report import write_report

    write_report(runs, out)
    console.print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return out
