"""Command groups registered for the whole CLI surface of DESIGN 1 whose implementation lands in later issues.

Each one fails with a clear message instead of pretending to work.
"""

from __future__ import annotations

import typer

from fplus.errors import FplusError

PENDING = {
}


def _make(name: str, doc: str):
    def command(ctx: typer.Context) -> None:
        raise FplusError(f"`fplus {name}` is not implemented in this version yet ({doc})")

    command.__doc__ = f"{doc[0].upper()}{doc[1:]} (not implemented yet)."
    return command


def register(app: typer.Typer) -> None:
    for name, doc in PENDING.items():
        app.command(name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
            _make(name, doc)
        )
