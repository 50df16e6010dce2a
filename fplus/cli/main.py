"""The `fplus` executable: a thin Typer layer over the library. Heavy imports live inside the commands."""

from __future__ import annotations

import os
import sys

import typer

from fplus.cli import coc, data, doctor, eval, latents, matrix, report, train

app = typer.Typer(
    name="fplus",
    help="Train and evaluate the F+ vision-language-action policy (Qwen3-VL + world memory + CoC).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data.app, name="data")
app.add_typer(latents.app, name="latents")
app.add_typer(coc.app, name="coc")
app.command("train")(train.train)
app.command("eval")(eval.eval_command)
app.command("matrix")(matrix.matrix)
app.command("doctor")(doctor.doctor)
app.command("report")(report.report)


def _debug() -> bool:
    return os.environ.get("FPLUS_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def main() -> None:
    """Run the CLI: user errors are one red line (exit 1); FPLUS_DEBUG=1 shows the traceback instead."""
    try:
        app()  # standalone mode: usage errors and Ctrl-C are handled by click and exit themselves
    except Exception as err:  # noqa: BLE001 -- the one place errors become a message
        if _debug():
            raise
        from rich.console import Console
        from rich.markup import escape

        from fplus.errors import FplusError

        kind = "error" if isinstance(err, FplusError) else f"error ({type(err).__name__})"
        Console(stderr=True, soft_wrap=True, emoji=False, highlight=False).print(
            f"[bold red]{kind}:[/] {escape(str(err))}  [dim](FPLUS_DEBUG=1 for the traceback)[/]"
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
