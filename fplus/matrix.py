"""`fplus matrix`: the whole pipeline of a profile, idempotent and resumable.

    demo data (demo profile, when missing) -> world latents (when an experiment needs them) -> CoC labels
    (per MATRIX_MISSING_COC) -> for each experiment: train (new), resume (partial) or skip (complete) ->
    offline eval of the final checkpoint -> closed-loop eval (EVAL_SIM) -> report

Every stage checks what already exists, so a second invocation only reports that everything is complete.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from fplus.errors import CheckpointError, ConfigError, DataError
from fplus.experiments import Experiment
from fplus.rundir import offline_result, run_dir_for, run_state, sim_result
from fplus.settings import Settings, matrix_settings


@dataclass
class MatrixOutcome:
    """What a matrix invocation did: per experiment `trained|resumed|complete|skipped`, and the report dir."""

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
    from fplus.data.demo import make_demo_dataset

    console.rule("demo data")
    report = make_demo_dataset(Path(d.dataset), tasks=d.demo_tasks, episodes_per_task=d.demo_episodes,
                               image_size=d.demo_image_size, seed=d.demo_seed, max_steps=d.demo_max_steps)
    report.print(console)
    return True


def _ensure_latents(settings: Settings, console: Console) -> bool:
    from fplus.data.lerobot import LeRobotDataset, keys_from_settings
    from fplus.world.cache import compute_latents, find_latents
    from fplus.world.encoders import build_encoder

    w = settings.world
    keys = keys_from_settings(settings.data)
    ds = LeRobotDataset.open(settings.data.dataset, keys, revision=settings.data.revision)
    encoder_id = w.dino_model if w.source == "dino" else w.vjepa_model
    try:  # a finished, matching cache: no need to load the encoder at all
        find_latents(w.cache_dir, ds, keys.image, w.source, encoder_id, w.pooling, w.temporal_window)
        return False
    except DataError:  # no cache, or one that compute_latents resumes or reports
        pass
    encoder = build_encoder(w.source, dino_model=w.dino_model, vjepa_model=w.vjepa_model, pooling=w.pooling,
                            temporal_window=w.temporal_window)
    result = compute_latents(ds, keys.image, encoder, w.cache_dir, w.batch_size, console=console)
    if result.status == "complete":
        return False
    console.print(f"latents {result.status}: {result.frames_computed} frames in {result.seconds:.1f} s")
    return True


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


def run_matrix(profile: str | None, experiments: list[str] | None = None, overrides: dict | None = None,
               console: Console | None = None) -> MatrixOutcome:
    """Run the matrix of a profile (see the module docstring)."""
    from fplus.checkpoint import latest_valid, manifest_step
    from fplus.eval.offline import evaluate_run, results_table
    from fplus.model.corruption import MODES
    from fplus.train.run import train_run

    console = console or Console()
    overrides = overrides or {}
    base, per_exp = matrix_settings(profile, overrides, experiments)
    if base.eval.sim != "none":  # fail now, not after hours of training
        from fplus.sim.registry import get_simulator

        get_simulator(base.eval.sim).check_available()
    outcome = MatrixOutcome()
    outcome.did_work |= _ensure_dataset(base, console)
    if any(Experiment.of(s).needs_world for s in per_exp.values()):
        outcome.did_work |= _ensure_latents(base, console)
    for experiment, settings in per_exp.items():
        skip = _ensure_coc(settings, experiment, console)
        if skip:
            console.print(f"[bold yellow]warning: skipping {experiment}: {skip}")
            outcome.runs[experiment] = "skipped"
            continue
        run_dir = run_dir_for(settings)
        state = run_state(run_dir)
        if state == "complete":
            outcome.runs[experiment] = "complete"
        else:
            console.rule(f"{experiment}: {'resume' if state == 'partial' else 'train'} -> {run_dir}")
            train_run(settings, run_dir, resume=state == "partial", console=console, resume_hint=_resume_hint())
            outcome.runs[experiment] = "resumed" if state == "partial" else "trained"
            outcome.did_work = True
        last = latest_valid(run_dir)
        if last is None:
            raise CheckpointError(f"{run_dir} is complete but has no usable checkpoint to evaluate; delete "
                             f"{run_dir / 'COMPLETE'} and run the matrix again to train it again")
        step = manifest_step(last)
        if not offline_result(run_dir, step).is_file():
            result, _ = evaluate_run(run_dir, MODES, device=settings.eval.device)
            console.print(results_table(result))
            outcome.did_work = True
        sim = settings.eval.sim
        if sim != "none" and not sim_result(run_dir, sim, step).is_file():
            from fplus.eval.closed_loop import CLOSED_LOOP_MODES, evaluate_closed_loop
            from fplus.eval.closed_loop import results_table as sim_table

            console.rule(f"{experiment}: closed loop in {sim}")
            result, _ = evaluate_closed_loop(run_dir, sim, None, settings.eval.episodes, CLOSED_LOOP_MODES,
                                             console=console, suite=settings.eval.suite,
                                             device=settings.eval.device,
                                             corrupted_episodes=settings.eval.corrupted_episodes)
            console.print(sim_table(result))
            outcome.did_work = True
    runs = [run_dir_for(s) for e, s in per_exp.items() if outcome.runs[e] != "skipped"]
    report_dir = Path(base.train.output_dir) / "report"
    if outcome.did_work or not (report_dir / "report.json").is_file():
        outcome.report = _write_report(runs, report_dir, console)
        outcome.did_work = True
    return outcome


def _resume_hint() -> str:
    """How to resume after a signal stopped a run: the same `fplus matrix` command again."""
    if os.path.basename(sys.argv[0]) in ("fplus", "main.py") and sys.argv[1:2] == ["matrix"]:
        return f"run `fplus {shlex.join(sys.argv[1:])}` again to resume it"
    return "run the same `fplus matrix` again to resume it (it resumes partial runs)"


def _write_report(runs: list[Path], out: Path, console: Console) -> Path:
    from fplus.report.report import write_report

    write_report(runs, out)
    console.print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return out
