"""`fplus report RUNS... --out DIR`: tables and plots comparing runs (Markdown, HTML, JSON, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fplus.cli.options import OutDir

DEFAULT_OUT = Path("report")


def report(
    runs: Annotated[list[Path], typer.Argument(metavar="RUN", help="run directories (OUTPUT_DIR/<experiment>), "
                                                    "e.g. outputs/demo/runs/E0 outputs/demo/runs/E2")],
    out: OutDir = None,
) -> None:
    """Compare runs: losses, gate, action error under each corruption mode, closed-loop success rates.

    Writes DIR/report.md, DIR/report.html (self-contained, figures embedded),
    DIR/report.json (the numbers) and DIR/plots/*.png (DIR defaults to ./report).
    Missing evaluations or unfinished runs are shown as n/a with a note.
    """
    from rich.console import Console
    from rich.markup import escape

    from fplus.report.report import write_report

    files = write_report(runs, out or DEFAULT_OUT)
    console = Console()
    for note in files.notes:
        console.print(f"[yellow]n/a[/] {escape(note)}")
    console.print(f"wrote {files.markdown}, {files.html}, {files.json} and {len(files.plots)} plot(s) in "
                  f"{files.out / 'plots'}", markup=False)
