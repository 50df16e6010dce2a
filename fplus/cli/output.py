"""What the commands print besides their results: the one-line error, the one-line interrupt, this command again.

Under torchrun / accelerate launch every process runs the command; only rank 0 (RANK unset or "0") prints the
error line, the others exit with the same status silently.
"""

from __future__ import annotations

import os
import shlex
import sys

import typer


def rank_zero() -> bool:
    """True unless RANK names another process of a distributed launch."""
    return os.environ.get("RANK", "") in ("", "0")


def debug() -> bool:
    """FPLUS_DEBUG=1 (or any value but 0/false/no): errors show their traceback instead of one line."""
    return os.environ.get("FPLUS_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _stderr():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True, emoji=False, highlight=False)


def print_error(err: BaseException) -> None:
    """`error: MESSAGE  (FPLUS_DEBUG=1 for the traceback)` on stderr (rank 0 only); other exceptions than
    FplusError name their type."""
    if not rank_zero():
        return
    from rich.markup import escape

    from fplus.errors import FplusError

    kind = "error" if isinstance(err, FplusError) else f"error ({type(err).__name__})"
    _stderr().print(f"[bold red]{kind}:[/] {escape(str(err))}  [dim](FPLUS_DEBUG=1 for the traceback)[/]")


def say_interrupted(message: str, code: int) -> typer.Exit:
    """Print `interrupted: MESSAGE` on stderr; the typer.Exit to raise with the signal's exit status."""
    from rich.markup import escape

    _stderr().print(f"[bold yellow]interrupted:[/] {escape(message)}")
    return typer.Exit(code)


def same_command() -> str:
    """The command line of this process, as `fplus ...`, to repeat it."""
    return shlex.join(["fplus", *sys.argv[1:]])
