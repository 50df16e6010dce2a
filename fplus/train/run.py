"""Entry points over the recipe: where a run lives, and train-one-run with the resume/complete logic."""

from __future__ import annotations

from pathlib import Path

from fplus.settings import Settings
from fplus.train.recipe import COMPLETE, CONFIG, TrainProgress, TrainRecipe


def run_dir_for(settings: Settings) -> Path:
    """OUTPUT_DIR / (RUN_NAME or the experiment id or `custom`)."""
    name = settings.run.name or settings.train.experiment or "custom"
    return Path(settings.train.output_dir) / name


def run_state(run_dir: Path) -> str:
    """`complete`, `partial` (started, resumable) or `new`."""
    if (run_dir / COMPLETE).is_file():
        return "complete"
    if (run_dir / CONFIG).is_file():
        return "partial"
    return "new"


def train_run(settings: Settings, run_dir: Path, resume: bool = False, console=None,
              stop_after: int | None = None, progress_bar: bool = True) -> TrainProgress:
    """Set up the recipe and train; a finished run is left alone."""
    recipe = TrainRecipe(settings, run_dir, resume=resume, stop_after=stop_after, console=console,
                         progress_bar=progress_bar)
    recipe.setup()
    if resume and (run_dir / COMPLETE).is_file():
        if console is not None:
            console.print(f"{run_dir} is already complete")
        return recipe.progress
    return recipe.fit()
