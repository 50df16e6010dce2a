"""`fplus export RUN OUT`: a trained run's checkpoint as a self-contained model folder with a model card
(fplus.deploy.export); --push-to-hub uploads it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fplus.cli.options import Overwrite


def export(
    run: Annotated[Path, typer.Argument(help="run directory (OUTPUT_DIR/<EXPERIMENT or RUN_NAME>)")],
    out: Annotated[Path, typer.Argument(help="the model folder to write (must not exist, or be empty)")],
    step: Annotated[int | None, typer.Option(help="checkpoint step (default: the newest verified one)")] = None,
    overwrite: Overwrite = False,
    push_to_hub: Annotated[str | None, typer.Option("--push-to-hub", metavar="REPO_ID",
                                                    help="then upload OUT to this hub model repo (owner/name)")]
    = None,
    private: Annotated[bool, typer.Option("--private", help="create the hub repo private (with --push-to-hub)")]
    = False,
) -> None:
    """Write OUT: the policy (config, safetensors weights, processor, normalisation and latent statistics), the
    backbone and world encoder it needs (id + revision; the encoder is not bundled), the run's settings, split and
    results, and a model card (README.md). `FPlusPolicy.from_pretrained(OUT)` loads it; `fplus serve OUT` and
    `fplus eval OUT` accept it. The run's dataset (and its world latents, for E1/E2/E4) must be where the run
    recorded them. Atomic: OUT appears whole or not at all; --overwrite replaces an earlier export.
    """
    from rich.console import Console

    from fplus.deploy.export import export_run
    from fplus.deploy.export import push_to_hub as push

    if private and push_to_hub is None:
        from fplus.errors import ConfigError

        raise ConfigError("--private applies to the hub repo of --push-to-hub: add --push-to-hub REPO_ID")
    console = Console(soft_wrap=True, highlight=False)
    folder, marker = export_run(run, out, step, overwrite)
    console.print(f"wrote {folder} ({marker['experiment']}, step {marker['step']}, {len(marker['files'])} files "
                  "+ README.md)", markup=False)
    if push_to_hub is not None:
        url = push(folder, push_to_hub, private)
        console.print(f"pushed {folder} to {push_to_hub}: {url}", markup=False)
