"""`fplus coc validate FILE`, `fplus coc generate`: check and write chain-of-causation labels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fplus.cli.options import (
    ActionKey,
    Backbone,
    Dataset,
    Device,
    ImageKey,
    InstructionKey,
    MaxTokens,
    Overwrite,
    Profile,
    StateKey,
    settings_from_cli,
)

app = typer.Typer(help="Chain-of-causation labels: validate a JSONL file, generate labels for a dataset.",
                  no_args_is_help=True)


@app.command()
def validate(
    file: Annotated[Path | None, typer.Argument(help="CoC JSONL file (default: COC_JSONL)")] = None,
    dataset: Dataset = None,
    no_dataset: Annotated[bool, typer.Option("--no-dataset", help="skip the dataset checks even if DATASET is set")]
    = False,
    profile: Profile = None,
    max_tokens: MaxTokens = None,
    backbone: Backbone = None,
    require_full_coverage: Annotated[bool, typer.Option(
        "--require-full-coverage", help="unlabelled dataset episodes are an error, not a warning")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Check a CoC JSONL file; exits 1 when it has errors.

    Line-numbered errors: a line over the size cap (from COC_MAX_TOKENS; skipped unread), not UTF-8 or invalid
    JSON, schema (fields, types, both or neither id key), duplicate episodes, empty text, text longer than
    COC_MAX_TOKENS tokens of BACKBONE's tokenizer; with a dataset (--dataset or DATASET): episodes the dataset
    lacks, and coverage (a warning unless --require-full-coverage).
    """
    import json

    from rich.console import Console

    from fplus.coc.tokens import load_token_counter
    from fplus.coc.validate import render_report, validate_coc
    from fplus.data.lerobot import LeRobotDataset
    from fplus.errors import ConfigError

    settings = settings_from_cli(profile, COC_JSONL=str(file) if file else None, DATASET=dataset,
                                 COC_MAX_TOKENS=max_tokens, BACKBONE=backbone)
    if settings.coc.jsonl is None:
        raise ConfigError("no CoC file given: pass FILE or set COC_JSONL")
    d = settings.data
    ds = None if no_dataset or d.dataset is None else LeRobotDataset.open(d.dataset, revision=d.revision)
    report = validate_coc(settings.coc.jsonl, max_tokens=settings.coc.max_tokens,
                          counter=load_token_counter(settings.model.backbone), dataset=ds,
                          require_full_coverage=require_full_coverage)
    if json_output:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        console = Console(emoji=False)  # render_report escapes user text; no :emoji: codes either
        for renderable in render_report(report):
            console.print(renderable)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def generate(
    dataset: Dataset = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="JSONL to write (COC_JSONL)")] = None,
    profile: Profile = None,
    action_key: ActionKey = None,
    state_key: StateKey = None,
    instruction_key: InstructionKey = None,
    gripper_dim: Annotated[int, typer.Option(help="action dim of the gripper command (-1 = last)")] = -1,
    no_gripper: Annotated[bool, typer.Option("--no-gripper", help="the actions have no gripper dim")] = False,
    grip_threshold: Annotated[float, typer.Option(help="a gripper command above this closes")] = 0.0,
    position_dims: Annotated[str | None, typer.Option(
        help="state dims of the hand position, comma separated (default: the first 3)")] = None,
    max_tokens: MaxTokens = None,
    backbone: Backbone = None,
    vlm: Annotated[str | None, typer.Option(
        "--vlm", help="write labels with this Qwen-VL model (alias, hub id or local dir); needs its weights")] = None,
    vlm_frames: Annotated[int, typer.Option(help="frames shown to the VLM per episode")] = 4,
    image_key: ImageKey = None,
    device: Device = None,
    overwrite: Overwrite = False,
) -> None:
    """Write one CoC label per episode of a dataset, from its task and recorded motion.

    Each episode is segmented into phases (approach, grasp, move, release at gripper events; approach, contact,
    settle without them) and each phase's sentence says why it follows from the goal. Templated and deterministic;
    --vlm lets a Qwen-VL model write the labels (on --device). The instruction is INSTRUCTION_KEY, unset: the
    dataset's task strings. The file passes `fplus coc validate` with full coverage.
    """
    from rich.console import Console

    from fplus.coc.generate import generate_labels
    from fplus.coc.phases import MotionSpec
    from fplus.errors import ConfigError

    settings = settings_from_cli(profile, DATASET=dataset, COC_JSONL=str(out) if out else None,
                                 ACTION_KEY=action_key, STATE_KEY=state_key, INSTRUCTION_KEY=instruction_key,
                                 IMAGE_KEY=image_key, COC_MAX_TOKENS=max_tokens, BACKBONE=backbone)
    if settings.coc.jsonl is None:
        raise ConfigError("no output file: pass --out or set COC_JSONL")
    try:
        dims = tuple(int(x) for x in position_dims.split(",")) if position_dims else None
    except ValueError as err:
        raise ConfigError(f"--position-dims must be comma-separated integers, got {position_dims!r}") from err
    spec = MotionSpec(gripper_dim=None if no_gripper else gripper_dim, grip_threshold=grip_threshold,
                      position_dims=dims)
    generate_labels(settings, Path(settings.coc.jsonl), Console(emoji=False), spec=spec, overwrite=overwrite, vlm=vlm,
                    vlm_frames=vlm_frames, device=device)

