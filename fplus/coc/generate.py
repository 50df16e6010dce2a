"""`generate_coc`: one CoC label per episode of a dataset, templated from the task and the recorded motion.

    job = LabelJob(action_key="action", state_key="observation.state", instruction_key="task", spec=MotionSpec(),
                   counter=load_token_counter("tiny"), max_tokens=128)
    result = generate_coc(ds, Path("coc.jsonl"), job)
    result = generate_labels(settings, Path("coc.jsonl"), console)  # from settings, summary printed (the CLI's)

Each episode is segmented into phases (`fplus.coc.phases`), its task text and phases become a text
(`fplus.coc.template`, the richest style that fits COC_MAX_TOKENS) or, with a `VlmLabeler`, a VLM rewrites them.
The JSONL ({"episode_index", "coc_text"} per line, in episode order) is written atomically (a temporary file in the
same directory, then a rename) and an existing file is kept unless `overwrite`. The written file is validated
against the dataset with full coverage before returning. Deterministic for a given dataset and options.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fplus.coc.phases import MotionSpec, Phase, segment_episode
from fplus.coc.template import fit_text
from fplus.coc.tokens import TokenCounter
from fplus.coc.validate import CocReport, validate_coc
from fplus.data import format as fmt
from fplus.data.coc import TEXT_KEY
from fplus.data.lerobot import DataKeys, LeRobotDataset
from fplus.errors import ConfigError, DataError
from fplus.io import write_text_atomic

if TYPE_CHECKING:
    from rich.console import Console

    from fplus.coc.vlm import VlmLabeler
    from fplus.settings import Settings


@dataclass(frozen=True)
class LabelJob:
    """What to label and how: the dataset keys (`state_key` None: motion from the actions alone), the motion
    segmentation, the token counter and budget, and optionally a VLM that sees `image_key`'s frames."""

    action_key: str
    state_key: str | None
    instruction_key: str
    spec: MotionSpec
    counter: TokenCounter
    max_tokens: int
    vlm: VlmLabeler | None = None
    image_key: str | None = None


@dataclass(frozen=True)
class EpisodeLabel:
    """The label of one episode: its task, phases, text, the style that wrote it (a template style or "vlm"),
    and its token count."""

    episode_index: int
    task: str
    phases: tuple[Phase, ...]
    text: str
    style: str
    tokens: int


@dataclass
class GenerateResult:
    """What `generate_coc` wrote: the file, every label, the validation report, VLM texts that were rejected."""

    path: Path
    labels: list[EpisodeLabel]
    report: CocReport
    counter: TokenCounter
    vlm_rejected: list[int] = field(default_factory=list)

    def styles(self) -> Counter[str]:
        """How many labels each style wrote."""
        return Counter(label.style for label in self.labels)

    def phase_patterns(self) -> Counter[str]:
        """How many episodes have each phase sequence, e.g. "approach > grasp > move > release"."""
        return Counter(" > ".join(p.name for p in label.phases) for label in self.labels)


def episode_tasks(ds: LeRobotDataset, instruction_key: str) -> dict[int, str]:
    """{episode_index: instruction}: an episode's first task string (`task`), or a string column at its first frame."""
    if instruction_key != fmt.TASK_KEY:
        column = ds.instructions(instruction_key)
        return {ep.index: str(column[ep.start]) for ep in ds.episodes}
    tasks: dict[int, str] = {}
    for ep in ds.episodes:
        if not ep.tasks:
            raise DataError(f"episode {ep.index} has no task string in {ds.root}")
        tasks[ep.index] = ep.tasks[0]
    return tasks


def _vectors(ds: LeRobotDataset, key: str, name: str) -> np.ndarray:
    values = ds.column(key)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise DataError(f"{name}={key!r} must be a vector feature, got shape {values.shape[1:]}")
    return values.astype(np.float64)


def label_episodes(ds: LeRobotDataset, job: LabelJob, *, console: Console | None = None,
                   progress: bool = True) -> tuple[list[EpisodeLabel], list[int]]:
    """Labels of every episode (in episode order) and the episodes whose VLM text was rejected (empty or too long:
    they keep the templated text)."""
    action_key, state_key, instruction_key = job.action_key, job.state_key, job.instruction_key
    spec, counter, max_tokens, vlm, image_key = job.spec, job.counter, job.max_tokens, job.vlm, job.image_key
    ds.validate_keys(DataKeys(action=action_key, state=state_key, instruction=instruction_key,
                              image=image_key if vlm is not None else None))
    if vlm is not None and image_key is None:
        raise ConfigError("--vlm needs the camera to show the model: pass --image-key or set IMAGE_KEY")
    actions = _vectors(ds, action_key, "ACTION_KEY")
    states = _vectors(ds, state_key, "STATE_KEY") if state_key is not None else None
    if spec.gripper_dim is not None and not -actions.shape[1] <= spec.gripper_dim < actions.shape[1]:
        raise ConfigError(f"--gripper-dim {spec.gripper_dim} is outside {action_key!r}'s {actions.shape[1]} dims "
                         "(-1 = the last dim)")

    tasks = episode_tasks(ds, instruction_key)

    def fits(text: str) -> bool:
        return counter.count(text) <= max_tokens

    from fplus.progress import make_progress

    labels, rejected = [], []
    with make_progress("episodes", console, disable=not progress) as bar:
        task_id = bar.add_task("CoC labels", total=ds.num_episodes, info="")
        for ep in ds.episodes:
            task = tasks[ep.index]
            phases = segment_episode(actions[ep.start:ep.stop],
                                     None if states is None else states[ep.start:ep.stop], spec)
            text, style = fit_text(task, phases, fits)
            if vlm is not None:
                frames = ds.episode_frames(image_key, ep.index)
                written = vlm.label(frames, task, phases, text, max_tokens)
                if written and fits(written):
                    text, style = written, "vlm"
                else:
                    rejected.append(ep.index)
            labels.append(EpisodeLabel(ep.index, task, tuple(phases), text, style, counter.count(text)))
            bar.advance(task_id)
    return labels, rejected


def write_jsonl_atomic(path: Path, records: list[dict], overwrite: bool) -> None:
    """Write JSON lines to `path` through a temporary file and a rename; an existing file needs `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise DataError(f"{path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def generate_coc(ds: LeRobotDataset, out: Path, job: LabelJob, *, overwrite: bool = False,
                 console: Console | None = None, progress: bool = True) -> GenerateResult:
    """Label every episode and write the JSONL (see the module docstring); returns what was written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it")
    labels, rejected = label_episodes(ds, job, console=console, progress=progress)
    write_jsonl_atomic(out, [{"episode_index": label.episode_index, TEXT_KEY: label.text} for label in labels],
                       overwrite=overwrite)
    report = validate_coc(out, max_tokens=job.max_tokens, counter=job.counter, dataset=ds, require_full_coverage=True)
    if not report.ok:  # a bug, never the user's fault: say so plainly
        raise DataError(f"the generated {out} fails validation: {'; '.join(map(str, report.errors[:3]))}")
    return GenerateResult(path=out, labels=labels, report=report, counter=job.counter, vlm_rejected=rejected)


def generate_from_settings(
    settings: Settings,
    out: Path,
    *,
    spec: MotionSpec,
    overwrite: bool = False,
    vlm_name: str | None = None,
    vlm_frames: int = 4,
    device: str | None = None,
    console: Console | None = None,
    progress: bool = True,
) -> GenerateResult:
    """`generate_coc` for resolved settings: DATASET, ACTION_KEY (required), STATE_KEY (optional), INSTRUCTION_KEY
    (unset: the dataset's `task` strings), IMAGE_KEY (for the VLM), BACKBONE's tokenizer, COC_MAX_TOKENS."""
    from fplus.coc.tokens import load_token_counter

    d = settings.data
    if d.dataset is None:
        raise ConfigError("no dataset: pass --dataset or set DATASET")
    if d.action_key is None:
        raise ConfigError("ACTION_KEY not set: pass --action-key or name it in a profile, .env or the environment")
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it")
    instruction_key = d.instruction_key or fmt.TASK_KEY
    ds = LeRobotDataset.open(d.dataset, revision=d.revision)
    if vlm_name is not None and d.image_key is None:
        raise ConfigError("--vlm needs the camera to show the model: pass --image-key or set IMAGE_KEY")
    # the keys first (instant), before the tokenizer or the VLM are loaded
    ds.validate_keys(DataKeys(action=d.action_key, state=d.state_key, instruction=instruction_key,
                              image=d.image_key if vlm_name is not None else None))
    counter = load_token_counter(settings.model.backbone)
    vlm = None
    if vlm_name is not None:
        from fplus.coc.vlm import VlmLabeler

        vlm = VlmLabeler.load(vlm_name, device=device, num_frames=vlm_frames)
    job = LabelJob(action_key=d.action_key, state_key=d.state_key, instruction_key=instruction_key, spec=spec,
                   counter=counter, max_tokens=settings.coc.max_tokens, vlm=vlm, image_key=d.image_key)
    return generate_coc(ds, out, job, overwrite=overwrite, console=console, progress=progress)


def generate_labels(settings: Settings, out: Path, console: Console, *, spec: MotionSpec | None = None,
                    overwrite: bool = False, vlm: str | None = None, vlm_frames: int = 4,
                    device: str | None = None) -> GenerateResult:
    """`generate_from_settings` (spec None: the default `MotionSpec`), then its summary (`render_result`) printed
    on `console`: what `fplus coc generate` and `fplus matrix` (MATRIX_MISSING_COC=generate) do.

    device: the VLM's (None or "auto": cuda when available).
    """
    result = generate_from_settings(settings, out, spec=spec or MotionSpec(), overwrite=overwrite, vlm_name=vlm,
                                    vlm_frames=vlm_frames, device=device, console=console)
    for renderable in render_result(result):
        console.print(renderable)
    return result


def render_result(result: GenerateResult) -> list:
    """Rich renderables: phase patterns and styles, then a summary panel with an example label."""
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    patterns = Table(title="phases", title_justify="left")
    patterns.add_column("episodes", justify="right")
    patterns.add_column("phase sequence")
    for pattern, count in sorted(result.phase_patterns().items(), key=lambda kv: (-kv[1], kv[0])):
        patterns.add_row(str(count), pattern)
    tokens = [label.tokens for label in result.labels]
    approx = "" if result.counter.exact else "~"
    styles = ", ".join(f"{style} {n}" for style, n in sorted(result.styles().items()))
    lines = [f"wrote [bold]{escape(str(result.path))}[/]: {len(result.labels)} labels ({styles})",
             f"tokens max {approx}{max(tokens)} / mean {approx}{sum(tokens) / len(tokens):.1f} "
             f"(limit {result.report.tokens.limit if result.report.tokens else '?'}, "
             f"tokenizer {escape(result.counter.name)})"]
    if not result.counter.exact:
        lines.append(f"[yellow]token counts are approximate: {escape(result.counter.note)}")
    if result.vlm_rejected:
        lines.append(f"[yellow]the VLM text of {len(result.vlm_rejected)} episode(s) was empty or too long; they "
                     f"keep the templated text")
    c = result.report.coverage
    if c is not None:
        lines.append(f"coverage {c.labelled}/{c.episodes} episodes; validation [green]OK")
    first = result.labels[0]
    lines.append(f"\nepisode {first.episode_index} ({escape(first.task)}):\n{escape(first.text)}")
    return [patterns, Panel("\n".join(lines), title="CoC generate", expand=False)]
