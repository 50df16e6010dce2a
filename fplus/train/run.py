"""Entry points over the recipe: where a run lives, and train-one-run with the resume/complete logic.

`train_run` holds the run directory's lock (RUN/.lock, `fplus.lock`) on the main process from setup to the end,
so a second `fplus train`, `--resume` or `fplus matrix` on the same run fails at once naming the holder, and
installs the SIGINT/SIGTERM handlers of the recipe (save, say how to resume, exit 130 / 143).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

from rich.markup import escape

from fplus.errors import FplusError
from fplus.rundir import COMPLETE, CONFIG, read_run_config
from fplus.settings import Settings
from fplus.train.recipe import TrainRecipe
from fplus.train.state import TrainingInterrupted, TrainProgress


def _main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (the Accelerator does not exist yet when the lock is taken)."""
    return os.environ.get("RANK", "0") == "0"


def run_lock(run_dir: Path, console=None):
    """The run directory's exclusive lock (main process; other processes get a no-op)."""
    if not _main_process():
        return nullcontext()
    from fplus.lock import LOCK_FILE, exclusive_lock

    def stale(message: str) -> None:
        if console is not None:
            console.print(escape(message), style="yellow")

    return exclusive_lock(Path(run_dir) / LOCK_FILE, f"run directory {run_dir}", on_stale=stale)


def _release(run_dir: Path) -> None:
    """Clear the lock file's holder details before releasing: only a holder that died leaves them, so the next
    one reports a takeover only then."""
    from fplus.lock import LOCK_FILE

    try:
        os.truncate(Path(run_dir) / LOCK_FILE, 0)
    except OSError:
        pass


def _complete_progress(run_dir: Path) -> TrainProgress:
    """The progress of a finished run, from COMPLETE and config.json (no setup needed)."""
    from fplus.io import read_json

    done = read_json(run_dir / COMPLETE, "the run's completion marker",
                     "delete it and resume the run (--resume) to finish it again")
    step = done.get("step") if isinstance(done, dict) else None
    if not isinstance(step, int):
        raise FplusError(f"{run_dir / COMPLETE} records no step; delete it and resume the run (--resume)")
    per_epoch = read_run_config(run_dir).get("steps_per_epoch") or 0
    return TrainProgress(step=step, epoch=step // per_epoch if per_epoch else 0)


def train_run(settings: Settings, run_dir: Path, resume: bool = False, console=None,
              stop_after: int | None = None, progress_bar: bool = True,
              resume_hint: str | None = None) -> TrainProgress:
    """Set up the recipe and train, holding the run's lock; a finished run is left alone.

    Args:
        resume_hint: how to resume, for the line printed when a signal stops training ("resume with `fplus train
            -e E2 --resume`"); default "resume it with --resume".
    Raises:
        TrainingInterrupted: SIGINT/SIGTERM (exit status 130 / 143), after that line is printed.
        FplusError: the run is in use by another process, a non-finite loss, a checkpoint that cannot be saved...
    """
    run_dir = Path(run_dir)
    main = _main_process()
    with run_lock(run_dir, console):
        recipe = None
        try:
            if resume and (run_dir / COMPLETE).is_file():
                if console is not None:
                    console.print(escape(f"{run_dir} is already complete"))
                return _complete_progress(run_dir)
            recipe = TrainRecipe(settings, run_dir, resume=resume, stop_after=stop_after, console=console,
                                 progress_bar=progress_bar)
            with recipe.signals():
                recipe.setup()
                return recipe.fit()
        except TrainingInterrupted as err:
            if console is not None and main:
                hint = resume_hint or "resume it with --resume"
                if not (run_dir / CONFIG).is_file():  # stopped before the run was written: nothing to resume
                    hint = "nothing was written: run the same command again to start it"
                console.print(escape(f"{err.message}; {hint}"), style="bold yellow", soft_wrap=True)
            raise
        finally:
            if recipe is not None:
                recipe.close()
            if main:
                _release(run_dir)
