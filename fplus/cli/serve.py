"""`fplus serve RUN`: serve a trained run over websockets with openpi's protocol (docs/deploy.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fplus.cli.options import Device, Host, Port, Profile, settings_from_cli


def serve(
    run: Annotated[Path, typer.Argument(help="run directory (OUTPUT_DIR/<EXPERIMENT or RUN_NAME>) or an exported "
                                             "folder (fplus export)")],
    host: Host = None,
    port: Port = None,
    checkpoint: Annotated[int | None, typer.Option(help="checkpoint step (default: the newest valid)")] = None,
    device: Device = None,
    profile: Profile = None,
) -> None:
    """Serve the run's policy to openpi's websocket client (`openpi_client.websocket_client_policy`).

    Every connection receives the run's metadata, then answers each observation (msgpack-numpy map: the
    SERVE_IMAGE_KEY / SERVE_WRIST_IMAGE_KEY / SERVE_STATE_KEY / SERVE_PROMPT_KEY keys, default openpi's LIBERO
    layout) with {"actions": (H, A) raw, "server_timing": ...}; a bad observation gets a one-line text error and
    the connection stays open. A connection is one episode (world-latent history); `reset: True` starts another.
    Binds to 127.0.0.1 unless --host / SERVE_HOST say otherwise. Ctrl-C or SIGTERM closes the connections and
    stops (exit 0). The serving settings come from --profile, .env and the environment, not from the run.
    An exported folder (fplus export) is served without its dataset (its fplus_export.json records the frame size).
    """
    from datetime import datetime

    from rich.console import Console

    from fplus.deploy.runner import load_runner
    from fplus.deploy.server import PolicyServer

    settings = settings_from_cli(profile, SERVE_HOST=host, SERVE_PORT=port).serve
    console = Console(soft_wrap=True, highlight=False)
    console.print(f"loading {run} ...", markup=False)
    runner = load_runner(run, checkpoint, device, settings)

    def log(line: str) -> None:
        console.print(f"{datetime.now():%H:%M:%S} {line}", markup=False)

    server = PolicyServer(runner, settings.host, settings.port, settings.max_message_mb, log=log)
    meta, spec = server.metadata, runner.spec

    def ready(bound_host: str, bound_port: int) -> None:
        keys = [f"{k} uint8 {spec.image_shape}" for k in spec.image_keys]
        if spec.state_key is not None:
            keys.append(f"{spec.state_key} ({spec.state_dim},)")
        keys.append(f"{spec.prompt_key} str")
        console.print(f"serving {run} ({meta['experiment']}, step {meta['step']}, {runner.opened.device}) on "
                      f"ws://{bound_host}:{bound_port}: observations {', '.join(keys)} -> actions "
                      f"({meta['action_horizon']}, {meta['action_dim']}); Ctrl-C stops", markup=False)

    stopped_by = server.serve_until_signal(ready)
    console.print(f"stopped ({stopped_by}) after {server.connections} connection(s)", markup=False)
