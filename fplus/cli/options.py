"""Option types shared by the commands (one definition each, reused through `Annotated`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Profile = Annotated[
    str | None,
    typer.Option("--profile", "-p", help="settings profile: demo, l40s, h100, or a path to a .env file "
                 "(default: $FPLUS_PROFILE, else none)"),
]
DatasetArg = Annotated[
    str | None, typer.Argument(help="LeRobot v3.0 dataset: local directory or hub repo id (default: DATASET)")
]
ImageKey = Annotated[str | None, typer.Option("--image-key", help="camera feature (IMAGE_KEY)")]
InstructionKey = Annotated[str | None, typer.Option("--instruction-key", help="instruction key (INSTRUCTION_KEY)")]
StateKey = Annotated[str | None, typer.Option("--state-key", help="proprio state feature (STATE_KEY)")]
ActionKey = Annotated[str | None, typer.Option("--action-key", help="action feature (ACTION_KEY)")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace an existing output")]
OutDir = Annotated[Path | None, typer.Option("--out", "-o", help="output directory")]


def settings_from_cli(profile: str | None, **overrides):
    """Resolve settings with the command's options as the highest layer (None = option not given)."""
    from fplus.settings import load_settings

    return load_settings(profile, {k: v for k, v in overrides.items() if v is not None})
