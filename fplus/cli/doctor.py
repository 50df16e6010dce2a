"""`fplus doctor`: versions, device, dataset keys, latents, CoC coverage, disk and memory of a profile."""

from __future__ import annotations

import typer

from fplus.cli.options import Profile


def doctor(profile: Profile = None) -> None:
    """Check the environment and a profile before spending GPU hours; exits 1 when a check fails."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from fplus.doctor import run_checks
    from fplus.settings import matrix_settings

    settings, per_experiment = matrix_settings(profile)
    checks = run_checks(settings, per_experiment)
    # Check names and details hold user text and hints such as `pip install -e ".[libero]"`: escaped, so Rich
    # markup never eats a `[...]`; only the status marks below are markup.
    title = f"fplus doctor ({profile or 'no profile'}; experiments {', '.join(settings.run.experiments)})"
    table = Table(title=escape(title), title_justify="left")
    table.add_column("check")
    table.add_column("", justify="center")
    table.add_column("detail", overflow="fold")
    marks = {"ok": "[green]ok", "warn": "[yellow]warn", "fail": "[bold red]FAIL"}
    for c in checks:
        table.add_row(escape(c.name), marks[c.status], escape(c.detail))
    console = Console(emoji=False)
    console.print(table)
    failed = [c.name for c in checks if c.status == "fail"]
    if failed:
        console.print(f"[bold red]{len(failed)} check(s) failed: {escape(', '.join(failed))}")
        raise typer.Exit(1)
