"""The `fplus` executable: a thin Typer layer over the library. Heavy imports live inside the commands.

Errors: any exception of a command becomes one red line on stderr and exit status 1 (`error: MESSAGE` for an
FplusError, `error (TypeName): MESSAGE` otherwise); FPLUS_DEBUG=1 lets it through with its traceback instead.
Under torchrun / accelerate launch only rank 0 prints the line; every rank exits 1. Usage errors, `typer.Exit`
and Ctrl-C are Typer's (usage message, the given status, 130).
"""

from __future__ import annotations

import errno

import typer
from typer.core import TyperGroup

from fplus.cli import coc, data, doctor, eval, export, latents, matrix, report, serve, train
from fplus.cli.output import debug, print_error


class FplusGroup(TyperGroup):
    """The top-level group: turns the exception of any (sub)command into the one-line error (see the module)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort):  # usage errors, exit statuses: Typer prints them
            raise
        except Exception as err:  # noqa: BLE001 -- the one place errors become a message
            if debug() or (isinstance(err, OSError) and err.errno == errno.EPIPE):  # EPIPE (`| head`): Typer's
                raise
            print_error(err)
            raise typer.Exit(1) from None


app = typer.Typer(
    name="fplus",
    cls=FplusGroup,
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
app.command("serve")(serve.serve)
app.command("export")(export.export)


def main() -> None:
    """Run the CLI (the `fplus` console script and `python -m fplus.cli.main`)."""
    app()


if __name__ == "__main__":
    main()
