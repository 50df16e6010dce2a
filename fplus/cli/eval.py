"""`fplus eval RUN`: offline action error under corruption modes (closed loop: --sim)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def eval_command(
    run: Annotated[Path, typer.Argument(help="run directory (OUTPUT_DIR/<experiment>)")],
    corruption: Annotated[str, typer.Option(help="none|zero|random|shuffle|oracle|all, or a comma list")] = "all",
    checkpoint: Annotated[int | None, typer.Option(help="checkpoint step (default: the newest valid)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="evaluation batch size (default: the run's)")] = None,
    max_batches: Annotated[int | None, typer.Option(help="evaluate at most this many batches per mode")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
) -> None:
    """Evaluate a trained run on its own validation episodes, with its own settings (config.json).

    Prints one table (a row per corruption mode: normalised and raw action MSE, per-dimension MSE, world
    cosine) and writes RUN/eval/offline-step-XXXXXX.json.
    """
    from rich.console import Console

    from fplus.eval.offline import evaluate_run, results_table
    from fplus.model.corruption import MODES

    modes = MODES if corruption == "all" else tuple(m.strip() for m in corruption.split(",") if m.strip())
    result, path = evaluate_run(run, modes, step=checkpoint, batch_size=batch_size, max_batches=max_batches,
                                device=device)
    console = Console()
    console.print(results_table(result))
    console.print(f"wrote {path}")
