"""Option types shared by the commands: one definition (name, help, meaning of the default) each, reused through
`Annotated`. A default of None means "not given": the setting named in the help applies (profile, .env,
environment, then the setting's own default), see `settings_from_cli`.

    Device   --device: cpu, cuda, cuda:1, ... or auto. Not given: the command's device setting where it has one
             (`fplus eval`: EVAL_DEVICE), else auto: cuda when available, else cpu.
    InferenceDelay, Chunking   --inference-delay, --chunking: the chunk scheduler (fplus.deploy.chunking); comma
             lists where a command sweeps them (`fplus eval --sim`). Not given: 0 and sync.
"""

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
Dataset = Annotated[str | None, typer.Option("--dataset", "-d", help="dataset path or hub id (DATASET)")]
ImageKey = Annotated[str | None, typer.Option("--image-key", help="camera feature (IMAGE_KEY)")]
InstructionKey = Annotated[str | None, typer.Option("--instruction-key", help="instruction key (INSTRUCTION_KEY)")]
StateKey = Annotated[str | None, typer.Option("--state-key", help="proprio state feature (STATE_KEY)")]
ActionKey = Annotated[str | None, typer.Option("--action-key", help="action feature (ACTION_KEY)")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace an existing output")]
OutDir = Annotated[Path | None, typer.Option("--out", "-o", help="output directory")]
Experiment = Annotated[str | None, typer.Option("--experiment", "-e", help="E0-E4 (EXPERIMENT)")]
MaxSteps = Annotated[int | None, typer.Option("--max-steps", help="stop training after this many optimiser steps "
                                                                  "(MAX_STEPS)")]
MaxTokens = Annotated[int | None, typer.Option("--max-tokens", help="longest CoC text in tokens (COC_MAX_TOKENS)")]
Backbone = Annotated[str | None, typer.Option("--backbone", help="whose tokenizer counts tokens (BACKBONE)")]
Device = Annotated[
    str | None,
    typer.Option("--device", help="torch device: auto, cpu, cuda, cuda:1, ... (default: the command's device "
                 "setting, e.g. EVAL_DEVICE, else auto: cuda when available)"),
]

Host = Annotated[
    str | None,
    typer.Option("--host", help="interface to bind: 127.0.0.1 (this machine only), 0.0.0.0 (every interface), an "
                 "address (default: SERVE_HOST, 127.0.0.1)"),
]
Port = Annotated[
    int | None,
    typer.Option("--port", min=0, max=65535, help="TCP port, 0: any free one (default: SERVE_PORT, 8000)"),
]

InferenceDelay = Annotated[
    str | None,
    typer.Option("--inference-delay", help="inference delay d in control steps: the chunk requested at step t "
                 "arrives at t + d (a comma list sweeps, e.g. 0,1,2; default 0)"),
]
Chunking = Annotated[
    str | None,
    typer.Option("--chunking", help="chunk scheduling while the next chunk is inferred: sync (wait), naive (switch "
                 "to it late), rtc (inpaint the actions that run meanwhile); a comma list sweeps (default sync)"),
]


def settings_from_cli(profile: str | None, **overrides):
    """Resolve settings with the command's options as the highest layer (None = option not given)."""
    from fplus.settings import load_settings

    return load_settings(profile, {k: v for k, v in overrides.items() if v is not None})
