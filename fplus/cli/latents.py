"""`fplus latents`: precompute world latents for every frame of a dataset (every dataset of a mixture, each into
its own cache entry); `fplus latents info PATH`.

SIGINT and SIGTERM stop a computation between writes: the batches done stay in the (resumable) cache, one line
says how far it got and how to resume, and the exit status is 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fplus.cli.options import Dataset, Device, ImageKey, Overwrite, Profile, settings_from_cli

app = typer.Typer(help="World latents (DINOv2/DINOv3, V-JEPA 2): precompute with a manifest, inspect.")

Source = Annotated[str | None, typer.Option("--source", help="dino | vjepa (WORLD_SOURCE)")]


@app.callback(invoke_without_command=True)
def compute(
    ctx: typer.Context,
    dataset: Dataset = None,
    image_key: ImageKey = None,
    source: Source = None,
    encoder: Annotated[str | None, typer.Option(help="encoder hub id, local dir or `tiny` (DINO_MODEL/VJEPA_MODEL)")]
    = None,
    pooling: Annotated[str | None, typer.Option(help="dino pooling: cls | mean (WORLD_POOLING)")] = None,
    temporal_window: Annotated[int | None, typer.Option(help="vjepa clip length m (WORLD_TEMPORAL_WINDOW)")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="cache root (CACHE_DIR)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="frames per encoder batch (LATENTS_BATCH_SIZE)")] = None,
    device: Device = None,
    profile: Profile = None,
    overwrite: Overwrite = False,
) -> None:
    """Encode every frame of IMAGE_KEY (of every dataset of a mixture); resumes an interrupted run, does nothing for
    a finished cache."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console

    from fplus.cli.output import same_command, say_interrupted
    from fplus.data.lerobot import keys_from_settings
    from fplus.data.mixture import members_of, open_dataset
    from fplus.device import resolve_device
    from fplus.errors import ConfigError
    from fplus.signals import signal_exit, sigterm_as_interrupt
    from fplus.world.cache import LatentsInterrupted, compute_latents
    from fplus.world.encoders import build_encoder

    world_source = source or None
    overrides = {"DATASET": dataset, "IMAGE_KEY": image_key, "WORLD_SOURCE": world_source, "WORLD_POOLING": pooling,
                 "WORLD_TEMPORAL_WINDOW": temporal_window, "CACHE_DIR": str(cache_dir) if cache_dir else None,
                 "LATENTS_BATCH_SIZE": batch_size}
    settings = settings_from_cli(profile, **overrides)
    if encoder is not None:
        settings = settings_from_cli(profile, **overrides,
                                     **{"DINO_MODEL" if settings.world.source == "dino" else "VJEPA_MODEL": encoder})
    d, w = settings.data, settings.world
    if d.dataset is None:
        raise ConfigError("no dataset: pass --dataset or set DATASET")
    keys = keys_from_settings(d, require=("image",))
    console = Console()
    results = []
    with sigterm_as_interrupt():
        try:
            ds = open_dataset(d, keys)  # a mixture: each of its datasets has its own cache entry
            enc = build_encoder(w.source, dino_model=w.dino_model, vjepa_model=w.vjepa_model, pooling=w.pooling,
                                temporal_window=w.temporal_window, device=resolve_device(device))
            for member in members_of(ds):
                results.append(compute_latents(member, keys.image, enc, w.cache_dir, w.batch_size,
                                               overwrite=overwrite, console=console))
        except LatentsInterrupted as err:
            name, code = signal_exit(err)
            raise say_interrupted(
                f"{name} after {err.frames_done} of {err.num_frames} frames; the {err.frames_done} frames done are "
                f"kept in {err.entry}: resume with `{same_command()}`", code) from None
        except KeyboardInterrupt as err:
            name, code = signal_exit(err)
            done = "" if not results else f" (the latents of {len(results)} dataset(s) of the mixture are complete)"
            raise say_interrupted(f"{name} before any latents were computed{done}: run `{same_command()}` again",
                                  code) from None
    for result in results:
        if result.status == "complete":
            console.print(f"latents already complete at {result.entry} (nothing to do; --overwrite to recompute)",
                          markup=False)
        else:
            rate = result.frames_computed / max(result.seconds, 1e-9)
            console.print(f"{result.status}: {result.frames_computed} frames in {result.seconds:.1f} s "
                          f"({rate:.1f} frames/s) -> {result.entry}", markup=False)


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="a cache entry, its manifest.json, or a CACHE_DIR to list")],
) -> None:
    """Print the manifest of a latents cache (or list every entry under a cache directory)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from fplus.errors import DataError
    from fplus.world.cache import MANIFEST, read_manifest

    console = Console()
    if path.is_dir() and not (path / MANIFEST).is_file():
        manifests = sorted(path.rglob(MANIFEST))
        if not manifests:
            raise DataError(f"no latents caches under {path}")
        table = Table(title=escape(f"latents caches under {path}"), title_justify="left")
        table.add_column("entry", overflow="fold")
        for col in ("frames", "dim", "encoder", "complete"):
            table.add_column(col)
        for m in manifests:
            man = read_manifest(m)
            table.add_row(escape(str(m.parent.relative_to(path))), str(man["num_frames"]), str(man["dim"]),
                          escape(str(man["encoder_id"])), "yes" if man.get("complete") else "[yellow]no (resumable)")
        console.print(table)
        return
    manifest = read_manifest(path)
    table = Table(title=escape(str(path)), title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in manifest.items():
        table.add_row(escape(key), escape(str(value)))
    console.print(table)
