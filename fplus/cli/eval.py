"""`fplus eval RUN`: offline action error under corruption modes (closed loop: --sim)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fplus.cli.options import Chunking, Device, Experiment, InferenceDelay, Profile, settings_from_cli


def eval_command(
    run: Annotated[Path | None, typer.Argument(help="run directory (default: OUTPUT_DIR/<EXPERIMENT or RUN_NAME>) "
                                                    "or an exported folder (fplus export)")] = None,
    profile: Profile = None,
    experiment: Experiment = None,
    corruption: Annotated[str, typer.Option(help="none|zero|random|shuffle|oracle|history|all, or a comma list "
                                                 "(all: every mode)")] = "all",
    checkpoint: Annotated[int | None, typer.Option(help="checkpoint step (default: the newest valid)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="evaluation batch size (default: the run's)")] = None,
    max_batches: Annotated[int | None, typer.Option(help="evaluate at most this many batches per mode")] = None,
    device: Device = None,
    sim: Annotated[str | None, typer.Option(help="closed loop in a simulator: metaworld, libero (extra)")] = None,
    suite: Annotated[str | None, typer.Option(help="closed loop in LIBERO: libero_spatial|object|goal|10 "
                                                   "(default: EVAL_SUITE)")] = None,
    tasks: Annotated[str | None, typer.Option(help="closed loop: comma-separated tasks (default: Meta-World the "
                                                   "dataset's, LIBERO the whole suite; LIBERO: index or name)")]
    = None,
    episodes: Annotated[int | None, typer.Option(help="closed loop: episodes per task and mode (EVAL_EPISODES)")]
    = None,
    corrupted_episodes: Annotated[int | None, typer.Option(help="closed loop: episodes per task under the other "
                                                                "modes (EVAL_EPISODES_CORRUPTED)")] = None,
    n_action_steps: Annotated[int | None, typer.Option(help="closed loop: actions executed per chunk (H/2)")]
    = None,
    max_steps: Annotated[int | None, typer.Option(help="closed loop: policy steps per episode (Meta-World: "
                                                       "DEMO_MAX_STEPS, LIBERO: 280/280/300/520 by suite)")] = None,
    video: Annotated[Path | None, typer.Option(help="closed loop: write an MP4 of each task/mode's first episode")]
    = None,
    inference_delay: InferenceDelay = None,
    chunking: Chunking = None,
) -> None:
    """Evaluate a trained run with its own settings (config.json).

    Without RUN, --profile / --experiment name it. The device is --device, else the run's EVAL_DEVICE.
    Offline (default): the run's validation episodes; one table, a row per corruption mode (normalised and raw
    action MSE, per-dimension MSE, world cosine); writes RUN/eval/offline-step-XXXXXX.json.
    Closed loop (--sim metaworld, or --sim libero --suite libero_spatial with the `libero` extra): success rate per
    task and corruption mode with 95% intervals; writes RUN/eval/sim-<sim>-step-XXXXXX.json. With
    --inference-delay / --chunking (comma lists: every pair) each latency setting is also rolled out under `none`:
    success and smoothness per strategy and delay, in the file's `latency` section and a second table.
    An exported folder (fplus export) is evaluated offline like its run, on the dataset it records unless DATASET
    (DATASET_REVISION, CACHE_DIR for world latents) is set; results go to OUT/eval/. The closed loop needs the run
    directory.
    """
    from rich.console import Console

    from fplus.errors import CheckpointError
    from fplus.model.corruption import MODES

    modes = MODES if corruption == "all" else tuple(m.strip() for m in corruption.split(",") if m.strip())
    console = Console()
    if sim is None and (inference_delay is not None or chunking is not None):
        from fplus.errors import ConfigError

        raise ConfigError("--inference-delay and --chunking schedule the chunks of the closed loop: add --sim "
                          "metaworld (or libero)")
    if run is None:
        from fplus.rundir import run_dir_for, run_state

        run = run_dir_for(settings_from_cli(profile, EXPERIMENT=experiment))
        if run_state(run) == "new":
            raise CheckpointError(f"no run at {run}: pass RUN, or --profile/--experiment of a trained run "
                                  "(fplus train / fplus matrix make them)")
    from fplus.model.pretrained import is_exported

    local = None
    if is_exported(run):
        from fplus.deploy.loader import local_settings

        local = local_settings(profile)
    if sim is not None:
        from fplus.deploy.chunking import parse_delays, parse_strategies
        from fplus.deploy.loader import run_settings
        from fplus.eval.closed_loop import CLOSED_LOOP_MODES, evaluate_closed_loop, latency_table, results_table

        delays = parse_delays(inference_delay) if inference_delay is not None else 0
        strategies = parse_strategies(chunking) if chunking is not None else "sync"

        chosen = CLOSED_LOOP_MODES if corruption == "all" else modes
        if episodes is None or corrupted_episodes is None:  # the run's own EVAL_EPISODES[_CORRUPTED]
            own = run_settings(run, local).eval
            episodes, corrupted_episodes = episodes or own.episodes, corrupted_episodes or own.corrupted_episodes
        result, path = evaluate_closed_loop(
            run, sim, [t.strip() for t in tasks.split(",")] if tasks else None, episodes, chosen, n_action_steps,
            max_steps, checkpoint, video_dir=video, console=console, suite=suite, device=device,
            corrupted_episodes=corrupted_episodes, inference_delay=delays, chunking=strategies, local=local)
        console.print(results_table(result))
        latency = latency_table(result)
        if latency is not None:
            console.print(latency)
        console.print(f"wrote {path}", markup=False)
        return
    from fplus.eval.offline import evaluate_run, results_table

    exported = {} if local is None else {"local": local}  # this machine's DATASET/CACHE_DIR: exported folders only
    result, path = evaluate_run(run, modes, step=checkpoint, batch_size=batch_size, max_batches=max_batches,
                                device=device, **exported)
    console.print(results_table(result))
    console.print(f"wrote {path}", markup=False)
