"""Typed, validated settings: one frozen tree, layered from profiles, `.env`, the environment and the CLI.

Every field has exactly one flat environment name (the seed's names are kept: DATASET, IMAGE_KEY,
INSTRUCTION_KEY, CACHE_DIR, WORLD_SOURCE, BACKBONE, BATCH_SIZE, MAX_EPOCHS, LOG_EVERY, COC_JSONL).
Precedence, highest first: CLI overrides > the experiment's overrides (E0-E4, chosen by EXPERIMENT) >
environment variables > `.env` > `profiles/<name>.env` > defaults.

An unknown key in a profile or `.env` file, or an unknown profile name, is an error listing the valid names.
Profiles and `.env` are parsed strictly (`parse_env_text`): a line that is not KEY=VALUE, a comment or blank, and
bytes that are not UTF-8, are errors naming the file and line. An environment variable that looks like a misspelt
setting (BATCH_SIZ) is ignored with a warning (`warn_env_near_misses`; FPLUS_NO_ENV_CHECK=1 turns it off).
Data keys (IMAGE_KEY, ACTION_KEY, INSTRUCTION_KEY) have no defaults: a profile or the user must name them.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fplus.envfile import read_env_file, warn_env_near_misses
from fplus.errors import ConfigError

PROFILE_ENV = "FPLUS_PROFILE"
PROFILES_DIR_ENV = "FPLUS_PROFILES_DIR"


def env(name: str, default: Any, doc: str, **kwargs: Any) -> Any:
    """A settings field with its flat environment variable `name` and a one-line description `doc`."""
    return Field(default, description=doc, json_schema_extra={"env": name}, **kwargs)


class Section(BaseModel):
    """Base of every settings section: frozen, unknown fields forbidden, empty strings mean "unset"."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_none(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return {k: (None if isinstance(v, str) and v.strip() == "" else v) for k, v in data.items()}
        return data


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


MIXTURE_SUFFIXES = (".yaml", ".yml", ".json")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?|[+-]?(?:inf|infinity|nan)", re.IGNORECASE)
_MEMBER_KEYS = ("path", "repo", "weight", "revision")


@dataclass(frozen=True)
class DatasetMember:
    """One dataset of DATASET: `source` (a local path, absolute for a mixture file's `path`, or a hub repo id),
    its normalised mixture `weight` (the weights of a DATASET sum to 1) and hub `revision` (None: main)."""

    source: str
    weight: float
    revision: str | None = None


def parse_dataset(text: str, revision: str | None = None) -> tuple[DatasetMember, ...]:
    """The datasets DATASET names (docs/data.md, "Mixtures"), in order:

    - an existing local path that is not a mixture file: that one dataset, verbatim (colons and commas included);
    - a path ending in .yaml, .yml or .json: a mixture file (`datasets:` a list of {path | repo, weight, revision});
    - else a comma-separated list of SOURCE[:WEIGHT], WEIGHT being the text after the last colon when it reads as
      a number (0.7, 3, 1e-2); every member has one or none has (equal weights). One member without a weight is
      today's single dataset, with `revision` (DATASET_REVISION), which a list of several does not take.

    Weights must be positive and finite; they are normalised to sum to 1. Raises ConfigError (one line)."""
    text = text.strip()
    path = Path(text).expanduser()
    if path.suffix.lower() in MIXTURE_SUFFIXES and not path.is_dir():
        return _normalised(_read_mixture_file(path), f"mixture file {text}: ")
    if path.exists():
        return (DatasetMember(text, 1.0, revision),)
    parts = [part.strip() for part in text.split(",")]
    if any(not part for part in parts):
        raise ConfigError("an empty entry in the list of datasets: separate datasets with single commas "
                          "(path_a:0.7,user/b:0.3)")
    members = []
    for part in parts:
        source, colon, tail = part.rpartition(":")
        if colon and source and _NUMBER.fullmatch(tail.strip()):
            members.append((source.strip(), _weight(tail.strip(), source.strip(), ""), None))
        else:
            members.append((part, None, None))
    if len(members) == 1:
        return (DatasetMember(members[0][0], 1.0, revision),)
    if revision is not None:
        raise ConfigError(f"the revision of one dataset, but DATASET names {len(members)} ({text}): give each hub "
                          "dataset its revision in a mixture file (docs/data.md)")
    return _normalised(members, "")


def _weight(value: Any, source: str, where: str) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = math.nan
    if isinstance(value, bool) or not math.isfinite(weight) or weight <= 0:
        raise ConfigError(f"{where}the weight {value!r} of {source!r} is not a positive finite number "
                          "(weights such as 0.7 and 0.3; they are normalised to sum to 1)")
    return weight


def _normalised(members: list[tuple[str, float | None, str | None]], where: str) -> tuple[DatasetMember, ...]:
    """Members with their weights normalised (all None: equal weights); mixed weights and duplicates are errors."""
    if not members:
        raise ConfigError(f"{where}no dataset listed")
    unweighted = [source for source, weight, _ in members if weight is None]
    if unweighted and len(unweighted) < len(members):
        raise ConfigError(f"{where}{', '.join(map(repr, unweighted))} {'has' if len(unweighted) == 1 else 'have'} "
                          "no weight but others do: give every dataset a weight, or none (equal weights)")
    seen: set[tuple[str, str | None]] = set()
    for source, _, rev in members:
        if (source, rev) in seen:
            raise ConfigError(f"{where}{source!r} is listed twice; list each dataset once, with its total weight")
        seen.add((source, rev))
    weights = [1.0 if weight is None else weight for _, weight, _ in members]
    total = math.fsum(weights)
    return tuple(DatasetMember(source, w / total, rev) for (source, _, rev), w in zip(members, weights, strict=True))


def _read_mixture_file(path: Path) -> list[tuple[str, float | None, str | None]]:
    """The entries of a mixture file: `path` entries made absolute (relative to the file's directory)."""
    if not path.is_file():
        raise ConfigError(f"mixture file {path} not found (DATASET ending in {', '.join(MIXTURE_SUFFIXES)} names a "
                          "mixture file)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"mixture file {path} cannot be read ({err})") from None
    if path.suffix.lower() == ".json":
        import json

        try:
            raw = json.loads(text)
        except ValueError as err:
            raise ConfigError(f"{path} is not valid JSON ({err})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (`pip install pyyaml`); or write the mixture as "
                              ".json") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"{path} is not valid YAML ({first})") from None
    entries = raw.get("datasets") if isinstance(raw, dict) and set(raw) == {"datasets"} else None
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected one key `datasets`, a list of {{path | repo, weight, revision}}")
    members = []
    for i, entry in enumerate(entries, 1):
        where = f"{path} dataset {i}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected {{path | repo, weight, revision}}, got {entry!r}")
        unknown = sorted(set(entry) - set(_MEMBER_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(_MEMBER_KEYS)}")
        if ("path" in entry) == ("repo" in entry):
            raise ConfigError(f"{where}: give exactly one of `path` (a local directory, relative to the file) and "
                              "`repo` (a hub dataset repo id)")
        name = entry.get("path", entry.get("repo"))
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}: `{'path' if 'path' in entry else 'repo'}` must be a non-empty string")
        revision = entry.get("revision")
        if revision is not None and ("path" in entry or not isinstance(revision, str)):
            raise ConfigError(f"{where}: `revision` is a string, and only a hub dataset (`repo`) has one")
        source = name.strip()
        if "path" in entry:
            source = os.path.normpath(path.parent.absolute() / Path(source).expanduser())
        weight = None if entry.get("weight") is None else _weight(entry["weight"], source, f"{where}: ")
        members.append((source, weight, revision))
    return members


class DataSettings(Section):
    """Which dataset, which keys, how to split it, and the embedded Meta-World demo dataset."""

    dataset: str | None = env("DATASET", None, "LeRobot v3.0 dataset: local directory or hub repo id; or several "
                              "with weights (path_a:0.7,user/b:0.3) or a mixture file (.yaml/.json): docs/data.md")
    revision: str | None = env("DATASET_REVISION", None, "hub revision (branch, tag or commit) of DATASET")
    image_key: str | None = env("IMAGE_KEY", None, "main camera feature, e.g. observation.images.image")
    wrist_image_key: str | None = env("WRIST_IMAGE_KEY", None, "optional second camera feature")
    state_key: str | None = env("STATE_KEY", None, "proprio state feature (unset: the policy gets no state)")
    action_key: str | None = env("ACTION_KEY", None, "action feature, e.g. action")
    instruction_key: str | None = env(
        "INSTRUCTION_KEY", None, "language instruction: `task` (LeRobot task table) or a string column"
    )
    val_fraction: float = env("VAL_FRACTION", 0.1, "fraction of episodes held out for validation", ge=0, lt=1)
    split_seed: int = env("SPLIT_SEED", 0, "seed of the train/validation episode split")
    augment: Literal["none", "default"] = env(
        "AUGMENT", "none", "training image augmentation: none, or default (the AUG_* settings below, whose defaults "
        "are the preset); validation and evaluation never augment")
    aug_crop_scale_min: float = env("AUG_CROP_SCALE_MIN", 0.85, "AUGMENT=default: smallest random crop, as a "
                                    "fraction of the image area (aspect ratio kept)", gt=0, le=1)
    aug_crop_scale_max: float = env("AUG_CROP_SCALE_MAX", 1.0, "AUGMENT=default: largest random crop, as a "
                                    "fraction of the image area", gt=0, le=1)
    aug_shift: float = env("AUG_SHIFT", 0.04, "AUGMENT=default: largest extra shift of the crop window, as a "
                           "fraction of the image side (edges replicated)", ge=0, le=0.5)
    aug_rotation: float = env("AUG_ROTATION", 5.0, "AUGMENT=default: largest rotation in degrees (either way)",
                              ge=0, le=180)
    aug_brightness: float = env("AUG_BRIGHTNESS", 0.2, "AUGMENT=default: brightness factor drawn in "
                                "[1 - x, 1 + x]", ge=0, le=1)
    aug_contrast: float = env("AUG_CONTRAST", 0.2, "AUGMENT=default: contrast factor drawn in [1 - x, 1 + x]",
                              ge=0, le=1)
    aug_saturation: float = env("AUG_SATURATION", 0.2, "AUGMENT=default: saturation factor drawn in "
                                "[1 - x, 1 + x]", ge=0, le=1)
    aug_hue: float = env("AUG_HUE", 0.05, "AUGMENT=default: hue shift drawn in [-x, x], in turns of the colour "
                         "circle (0.5 = 180 degrees)", ge=0, le=0.5)
    demo_tasks: list[str] = env(
        "DEMO_TASKS",
        ["reach-v3", "push-v3", "drawer-open-v3", "button-press-topdown-v3"],
        "Meta-World v3 tasks of the demo dataset (comma separated)",
    )
    demo_episodes: int = env("DEMO_EPISODES", 20, "demo episodes per task", ge=1)
    demo_image_size: int = env("DEMO_IMAGE_SIZE", 96, "demo camera resolution in pixels (square)", ge=16)
    demo_max_steps: int = env("DEMO_MAX_STEPS", 120, "max simulator steps per demo episode", ge=1)
    demo_seed: int = env("DEMO_SEED", 0, "seed of the demo episodes")

    _csv = field_validator("demo_tasks", mode="before")(_split_csv)

    @field_validator("dataset")
    @classmethod
    def _dataset_spec(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_dataset(value)
            except ConfigError as err:
                raise ValueError(str(err)) from None
        return value

    @field_validator("revision")
    @classmethod
    def _one_revision(cls, value: str | None, info) -> str | None:
        dataset = info.data.get("dataset")
        if value is not None and dataset is not None:
            try:
                parse_dataset(dataset, value)
            except ConfigError as err:
                raise ValueError(str(err)) from None
        return value

    def members(self) -> tuple[DatasetMember, ...]:
        """The datasets DATASET names with their normalised weights and revisions (`parse_dataset`); one member is
        a single-dataset run. ConfigError: DATASET is unset."""
        if self.dataset is None:
            raise ConfigError("no dataset: set DATASET (or use a profile that does)")
        return parse_dataset(self.dataset, self.revision)

    @model_validator(mode="after")
    def _crop_range(self) -> DataSettings:
        if self.aug_crop_scale_min > self.aug_crop_scale_max:
            raise ValueError(f"AUG_CROP_SCALE_MIN={self.aug_crop_scale_min} is above AUG_CROP_SCALE_MAX="
                             f"{self.aug_crop_scale_max}; the crop scale range must be MIN <= MAX")
        return self


class WorldSettings(Section):
    """World latents (DESIGN 4) and the memory windows of a training sample (DESIGN 3)."""

    source: Literal["dino", "vjepa"] = env("WORLD_SOURCE", "dino", "world latent encoder family: dino|vjepa")
    dino_model: str = env("DINO_MODEL", "facebook/dinov2-base", "DINOv2/DINOv3 hub id, local dir or `tiny`")
    vjepa_model: str = env("VJEPA_MODEL", "facebook/vjepa2-vitl-fpc64-256", "V-JEPA 2 hub id, local dir or `tiny`")
    pooling: Literal["cls", "mean"] = env("WORLD_POOLING", "cls", "dino pooling: CLS token or mean of patches")
    temporal_window: int = env("WORLD_TEMPORAL_WINDOW", 8, "vjepa clip length m (frames ending at t)", ge=1)
    cache_dir: Path = env("CACHE_DIR", Path("cache/latents"), "where world latents are cached")
    history: int = env("WORLD_HISTORY", 4, "T: latents z[t-T+1..t] fed to the Prophet", ge=1)
    future: int = env("WORLD_FUTURE", 4, "K: future latents z[t+1..t+K] predicted", ge=1)
    batch_size: int = env("LATENTS_BATCH_SIZE", 32, "frames per encoder batch when precomputing", ge=1)


class ModelSettings(Section):
    """The F+ policy (DESIGN 5)."""

    backbone: str = env("BACKBONE", "qwen3-vl-2b",
                        "alias (qwen3-vl-2b|qwen3-vl-4b|qwen3-vl-8b|qwen2.5-vl-3b), hub id, dir or tiny")
    action_horizon: int = env("ACTION_HORIZON", 8, "H: actions per chunk = number of <ACT_i> tokens", ge=1)
    image_size: int = env("IMAGE_SIZE", 224, "backbone image side in pixels (224 -> 49 visual tokens)", ge=28)
    finetune: Literal["full", "frozen", "lora"] = env("FINETUNE", "lora", "backbone fine-tuning mode")
    lora_rank: int = env("LORA_RANK", 16, "LoRA rank", ge=1)
    lora_layers: int = env("LORA_LAYERS", 8, "LoRA on the last N decoder layers", ge=1)
    gradient_checkpointing: bool = env("GRADIENT_CHECKPOINTING", False, "recompute activations in backward")
    precision: Literal["fp32", "bf16"] = env("PRECISION", "bf16", "precision on GPU: bf16 stores the frozen "
                                             "backbone weights in bf16 and autocasts (trainable weights stay fp32); "
                                             "CPU runs in fp32")
    attn_impl: Literal["auto", "sdpa", "flash_attention_2", "eager"] = env(
        "ATTN_IMPL", "auto", "attention implementation of the backbone: auto (flash_attention_2 on CUDA when the "
        "flash-attn package imports, else sdpa), sdpa, flash_attention_2 or eager")
    normalization: Literal["mean_std", "quantile"] = env("NORMALIZATION", "mean_std", "action/state normalisation")
    prophet: bool = env("PROPHET", False, "Prophet predicts future latents, trained with L_world (E1, E2, E4)")
    injection: bool = env("INJECTION", False, "inject the memory into the ACT states by gated cross-attention")
    flare_align: bool = env("FLARE_ALIGN", False, "<FUT_j> tokens aligned to future latents at ALIGN_LAYER (E4)")
    coc: bool = env("COC", False, "chain-of-causation text loss (E3, E4); needs COC_JSONL")
    align_layer: int | None = env("ALIGN_LAYER", None, "backbone layer of the FLARE alignment (unset: the middle)")
    prophet_width: int = env("PROPHET_WIDTH", 256, "Prophet transformer width", ge=8)
    prophet_layers: int = env("PROPHET_LAYERS", 2, "Prophet transformer layers", ge=1)
    prophet_heads: int = env("PROPHET_HEADS", 4, "Prophet attention heads", ge=1)
    prophet_delta: bool = env("PROPHET_DELTA", False, "Prophet predicts z_future - z_t")
    prophet_context: bool = env("PROPHET_CONTEXT", True, "Prophet also reads the pooled ACT hidden states, so "
                                "L_world trains the backbone (needed for E1 to shape the policy)")
    injection_heads: int = env("INJECTION_HEADS", 4, "heads of the gated cross-attention", ge=1)
    lambda_world: float = env("LAMBDA_WORLD", 1.0, "weight of L_world = 1 - cos(z_pred, z_future)", ge=0)
    lambda_text: float = env("LAMBDA_TEXT", 0.1, "weight of the CoC text loss", ge=0)
    lambda_align: float = env("LAMBDA_ALIGN", 0.5, "weight of the FLARE alignment loss", ge=0)
    action_head: Literal["mse", "flow"] = env("ACTION_HEAD", "mse", "action head: mse (an MLP per ACT state, MSE "
                                              "loss) or flow (conditional flow matching over the chunk; RTC)")
    flow_steps: int = env("FLOW_STEPS", 10, "flow head: Euler integration steps when sampling a chunk", ge=1)
    flow_width: int = env("FLOW_WIDTH", 256, "flow head: width of the velocity network", ge=8)
    flow_layers: int = env("FLOW_LAYERS", 2, "flow head: self-attention blocks over the chunk steps", ge=1)
    flow_heads: int = env("FLOW_HEADS", 4, "flow head: attention heads (divides FLOW_WIDTH)", ge=1)
    flow_time_dim: int = env("FLOW_TIME_DIM", 64, "flow head: size of the sinusoidal embedding of tau (even)", ge=2,
                             multiple_of=2)
    flow_tau: Literal["beta", "uniform"] = env("FLOW_TAU", "beta", "flow head: training distribution of tau "
                                               "(0 noise, 1 data): beta = pi0's Beta(1.5, 1) towards noise, uniform")
    rtc_max_guidance: float = env("RTC_MAX_GUIDANCE", 5.0, "RTC: clip beta of the prefix guidance weight (flow "
                                  "head; paper default 5)", ge=0)

    @model_validator(mode="after")
    def _parts_fit(self) -> ModelSettings:
        if self.injection and not self.prophet:
            raise ValueError("INJECTION=true needs PROPHET=true (the injected memory is the Prophet's prediction)")
        if self.prophet and not self.injection and not self.prophet_context:
            raise ValueError("PROPHET=true with INJECTION=false and PROPHET_CONTEXT=false: L_world would train a "
                             "side model that never reaches the actions (E1 would equal E0); set "
                             "PROPHET_CONTEXT=true")
        if self.action_head == "flow" and self.flow_width % self.flow_heads:
            raise ValueError(f"FLOW_WIDTH={self.flow_width} is not a multiple of FLOW_HEADS={self.flow_heads}")
        return self


class TrainSettings(Section):
    """The training loop (DESIGN 5, 6)."""

    experiment: str | None = env("EXPERIMENT", None, "experiment E0-E4 (DESIGN 6); unset: the model flags as set")
    batch_size: int = env("BATCH_SIZE", 8, "samples per optimiser step per device", ge=1)
    max_epochs: int = env("MAX_EPOCHS", 10, "epochs over the training episodes", ge=1)
    log_every: int = env("LOG_EVERY", 10, "steps between metric lines", ge=1)
    seed: int = env("SEED", 0, "training seed")
    num_workers: int | None = env("NUM_WORKERS", None, "data loader worker processes (unset: 0 without a CUDA "
                                  "GPU, else from the CPU count: fplus.train.data.default_workers)", ge=0)
    output_dir: Path = env("OUTPUT_DIR", Path("runs"), "parent directory of run directories")
    max_steps: int | None = env("MAX_STEPS", None, "stop after this many optimiser steps (unset: MAX_EPOCHS)", ge=1)
    grad_accum: int = env("GRAD_ACCUM", 1, "micro-batches per optimiser step", ge=1)
    lr_backbone: float = env("LR_BACKBONE", 2e-5, "learning rate of the backbone (or its LoRA adapters)", gt=0)
    lr_heads: float = env("LR_HEADS", 3e-4, "learning rate of action head, state projection, injection, align", gt=0)
    lr_prophet: float = env("LR_PROPHET", 3e-4, "learning rate of the Prophet", gt=0)
    weight_decay: float = env("WEIGHT_DECAY", 0.01, "AdamW weight decay", ge=0)
    warmup_steps: int = env("WARMUP_STEPS", 100, "linear warm-up steps, then cosine decay", ge=0)
    min_lr_ratio: float = env("MIN_LR_RATIO", 0.1, "final learning rate as a fraction of the peak", ge=0, le=1)
    max_grad_norm: float = env("MAX_GRAD_NORM", 1.0, "gradient clipping norm", gt=0)
    p_oracle_start: float = env("P_ORACLE_START", 0.9, "scheduled sampling: oracle memory probability at step 0",
                                ge=0, le=1)
    p_oracle_end: float = env("P_ORACLE_END", 0.1, "scheduled sampling: oracle memory probability at the end",
                              ge=0, le=1)
    save_every: int | None = env("SAVE_EVERY", None, "steps between checkpoints (unset: end of every epoch)", ge=1)
    keep_last: int = env("KEEP_LAST", 2, "checkpoints kept (older ones are deleted)", ge=1)
    val_batches: int | None = env("VAL_BATCHES", None, "validation batches (unset: all)", ge=1)
    val_every: int | None = env("VAL_EVERY", None, "steps between validations (unset: at the end of every epoch); "
                                "the last step is always validated", ge=1)
    logger: Literal["none", "tensorboard", "trackio", "wandb"] = env(
        "LOGGER", "none", "extra metrics logger (wandb: also the closed-loop results of `fplus eval --sim`)")
    wandb_project: str = env("WANDB_PROJECT", "fplus", "LOGGER=wandb: the W&B project")
    wandb_entity: str | None = env("WANDB_ENTITY", None, "LOGGER=wandb: the W&B entity (unset: your default one)")
    wandb_run_name: str | None = env("WANDB_RUN_NAME", None,
                                     "LOGGER=wandb: display name of the W&B run (unset: the run directory's name)")
    wandb_tags: list[str] = env("WANDB_TAGS", [], "LOGGER=wandb: tags of the W&B run, comma separated (the "
                                "experiment id is always one)")
    frame_cache_gb: float = env("FRAME_CACHE_GB", 4.0, "decode all frames into RAM when they fit in this", ge=0)
    nonfinite: Literal["error", "skip"] = env("NONFINITE", "error", "a non-finite loss or gradient: stop training "
                                              "(error) or skip that batch, counting it (skip)")

    @field_validator("wandb_tags", mode="before")
    @classmethod
    def _tags(cls, value: Any) -> Any:
        return [] if value is None else _split_csv(value)  # WANDB_TAGS= (empty) is no tags


class EvalSettings(Section):
    """Offline and closed-loop evaluation (DESIGN 6, 7)."""

    sim: Literal["none", "metaworld", "libero"] = env("EVAL_SIM", "none", "closed-loop simulator")
    episodes: int = env("EVAL_EPISODES", 10, "closed-loop episodes per task (under corruption `none`)", ge=1)
    corrupted_episodes: int | None = env("EVAL_EPISODES_CORRUPTED", None, "closed-loop episodes per task under the "
                                         "other corruption modes (unset: EVAL_EPISODES)", ge=1)
    suite: Literal["libero_spatial", "libero_object", "libero_goal", "libero_10"] = env(
        "EVAL_SUITE", "libero_spatial", "LIBERO suite of closed-loop evaluation")
    device: str = env("EVAL_DEVICE", "auto", "device of evaluation: auto (cuda when available), cpu, cuda, cuda:1")
    processes: int = env("EVAL_PROCESSES", 1, "closed-loop episodes run in this many parallel processes (CPU: "
                         "each with one torch thread); the results do not depend on it", ge=1)


class CocSettings(Section):
    """Chain-of-causation labels (DESIGN 5)."""

    jsonl: Path | None = env("COC_JSONL", None, "CoC labels: JSONL of {episode_index|episode_id, coc_text}")
    max_tokens: int = env("COC_MAX_TOKENS", 128, "longest CoC text in tokens", ge=1)
    mode: Literal["joint_after_act", "separate"] = env(
        "COC_MODE", "joint_after_act", "CoC tokens after the ACT tokens in one pass, or a separate pass"
    )
    fraction: float = env("COC_FRACTION", 1.0, "fraction of each training batch that carries its CoC text (the "
                          "first ceil(COC_FRACTION x BATCH_SIZE) samples of the shuffled batch; validation: all)",
                          gt=0, le=1)


def coc_samples(batch_size: int, fraction: float) -> int:
    """The samples of a batch of `batch_size` that carry their CoC text under COC_FRACTION `fraction` (0 < f <= 1):
    the count of the prompt builder (fplus.model.processor) and of the memory estimate (fplus.memory):
    ceil(f x B), at least 1 (with a tolerance, so that 0.25 x 8 is 2, not 3 from rounding)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"COC_FRACTION={fraction}: must be in (0, 1]")
    return max(1, math.ceil(fraction * batch_size - 1e-9))


class RunSettings(Section):
    """Naming of the run directory, what `fplus matrix` runs and where (MATRIX_DEVICES, Slurm)."""

    name: str | None = env("RUN_NAME", None, "run directory name under OUTPUT_DIR (unset: the experiment id)")
    experiments: list[str] = env("MATRIX_EXPERIMENTS", ["E0", "E2", "E4"], "experiments of `fplus matrix`")
    seeds: list[int] | None = env(
        "MATRIX_SEEDS", None, "training seeds of `fplus matrix` (e.g. 0,1,2): each experiment runs once per seed, "
        "in OUTPUT_DIR/<experiment>-seed<N>, and the report aggregates them (unset: SEED alone, in "
        "OUTPUT_DIR/<experiment>)")
    missing_coc: Literal["error", "skip", "generate"] = env(
        "MATRIX_MISSING_COC", "error",
        "CoC experiments without COC_JSONL in `fplus matrix`: fail, skip with a warning, or generate labels")

    make_demo_data: bool = env("MATRIX_MAKE_DEMO_DATA", False,
                               "`fplus matrix` records the Meta-World demo dataset into DATASET when it is missing")
    devices: list[str] = env(
        "MATRIX_DEVICES", ["auto"], "where `fplus matrix` places its runs: auto (every visible CUDA GPU, "
        "cuda:0,cuda:1,...; without one: cpu), or a comma list of devices (cpu, cuda:N) and GPU groups (cuda:0+cuda:1: "
        "one run on 2 GPUs through accelerate launch); several: runs in parallel, one per entry, each in its own "
        "process; one cpu or the one GPU of auto: in-process, one after another")
    launcher: Literal["local", "slurm"] = env(
        "MATRIX_LAUNCHER", "local", "`fplus matrix` runs on this machine (MATRIX_DEVICES), or submits each run as a "
        "Slurm job through submitit (the SLURM_* settings; needs the `slurm` extra)")
    accelerate_config: str = env(
        "MATRIX_ACCELERATE_CONFIG", "ddp", "accelerate config of a run on several GPUs (a MATRIX_DEVICES group, "
        "SLURM_GPUS_PER_JOB > 1): a name in profiles/accelerate/ (ddp, fsdp, deepspeed) or a .yaml path")
    slurm_partition: str | None = env("SLURM_PARTITION", None, "Slurm partition of the matrix's jobs (unset: the "
                                      "cluster's default)")
    slurm_gpus_per_job: int = env("SLURM_GPUS_PER_JOB", 1, "GPUs of each matrix job (one run; more than 1: DDP "
                                  "through accelerate launch on one node; 0: a CPU job)", ge=0)
    slurm_time_min: int = env("SLURM_TIME_MIN", 240, "time limit of each matrix job in minutes; a job that reaches "
                              "it saves a checkpoint and is requeued (at most 3 times)", ge=1)
    slurm_account: str | None = env("SLURM_ACCOUNT", None, "Slurm account charged for the matrix's jobs (unset: "
                                    "your default)")
    slurm_cpus_per_job: int | None = env("SLURM_CPUS_PER_JOB", None, "CPUs of each matrix job, e.g. NUM_WORKERS + 2 "
                                         "(unset: the partition's default)", ge=1)
    slurm_mem_gb: float | None = env("SLURM_MEM_GB", None, "memory of each matrix job in GB (unset: the "
                                     "partition's default)", gt=0)

    _csv = field_validator("experiments", "seeds", "devices", mode="before")(_split_csv)

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: list[str]) -> list[str]:
        hint = "e.g. MATRIX_DEVICES=cuda:0,cuda:1 or cuda:0+cuda:1,cuda:2+cuda:3 or cpu,cpu (or auto)"
        if not value:
            raise ValueError(f"MATRIX_DEVICES lists no device; {hint}")
        if "auto" in value:
            if len(value) > 1:
                raise ValueError(f"MATRIX_DEVICES=auto stands alone (got {','.join(value)}); {hint}")
            return value
        seen: set[str] = set()
        for group in value:
            parts = group.split("+")
            if parts == ["cpu"]:
                continue
            for part in parts:
                kind, _, index = part.partition(":")
                if kind != "cuda" or not index.isdigit():
                    what = "cpu stands alone, it joins no group" if part == "cpu" else f"{part!r} is not cpu or cuda:N"
                    raise ValueError(f"MATRIX_DEVICES entry {group!r}: {what} (a GPU group joins cuda:N devices "
                                     f"with +); {hint}")
                if part in seen:
                    raise ValueError(f"MATRIX_DEVICES names {part} twice: a GPU runs one run at a time; {hint}")
                seen.add(part)
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError(f"MATRIX_SEEDS must list distinct seeds, e.g. 0,1,2 (got {value})")
        return value


class ServeSettings(Section):
    """`fplus serve`: the websocket policy server (DESIGN 11) and which observation keys feed the run's inputs.

    Read from the serving environment (profile, .env, environment, options), never from the run's config.json."""

    host: str = env("SERVE_HOST", "127.0.0.1", "interface the policy server binds to (0.0.0.0: every interface)")
    port: int = env("SERVE_PORT", 8000, "port of the policy server (0: any free port, printed at start)",
                    ge=0, le=65535)
    image_key: str = env("SERVE_IMAGE_KEY", "observation/image",
                         "observation key of the main camera (uint8 H,W,3; feeds IMAGE_KEY)")
    wrist_image_key: str = env("SERVE_WRIST_IMAGE_KEY", "observation/wrist_image",
                               "observation key of the wrist camera (read when the run has a WRIST_IMAGE_KEY)")
    state_key: str = env("SERVE_STATE_KEY", "observation/state",
                         "observation key of the proprio state (read when the run has a STATE_KEY)")
    prompt_key: str = env("SERVE_PROMPT_KEY", "prompt", "observation key of the task instruction (a string)")
    max_message_mb: float = env("SERVE_MAX_MESSAGE_MB", 16.0, "largest observation message accepted, in MB "
                                "(larger: an error reply; over twice this the connection is closed)", gt=0)


class Settings(BaseSettings):
    """The whole settings tree. Build it with `load_settings`, never from a bare constructor in library code."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    data: DataSettings = DataSettings()
    world: WorldSettings = WorldSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    eval: EvalSettings = EvalSettings()
    coc: CocSettings = CocSettings()
    run: RunSettings = RunSettings()
    serve: ServeSettings = ServeSettings()

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        # Layers are resolved by `load_settings` (flat names, provenance, strict unknown-key checks),
        # which passes the merged result as init arguments.
        return (init_settings,)


@dataclass(frozen=True)
class EnvVar:
    """One settings field: its flat environment name, section, field name and description."""

    name: str
    section: str
    field: str
    doc: str
    default: Any


def env_vars() -> dict[str, EnvVar]:
    """Every settings variable by its flat environment name, in declaration order."""
    out: dict[str, EnvVar] = {}
    for section, sfield in Settings.model_fields.items():
        section_cls = sfield.annotation
        for fname, f in section_cls.model_fields.items():
            name = f.json_schema_extra["env"]
            if name in out:
                raise RuntimeError(f"environment name {name} is used twice")
            out[name] = EnvVar(name, section, fname, f.description or "", f.default)
    return out


def _did_you_mean(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def profiles_dirs() -> list[Path]:
    """Where profiles are looked up, first match wins: $FPLUS_PROFILES_DIR, ./profiles, the installed copy."""
    dirs = []
    if os.environ.get(PROFILES_DIR_ENV):
        dirs.append(Path(os.environ[PROFILES_DIR_ENV]))
    dirs.append(Path.cwd() / "profiles")
    package = Path(__file__).resolve().parent
    dirs += [package.parent / "profiles", package / "_profiles"]
    return dirs


def available_profiles() -> list[str]:
    """Names of every profile found in `profiles_dirs()`."""
    names = {p.stem for d in profiles_dirs() if d.is_dir() for p in d.glob("*.env")}
    return sorted(names)


def resolve_profile(profile: str) -> Path:
    """The file of a profile name (or a path to a `.env` file); unknown names fail with the valid ones."""
    as_path = Path(profile)
    if as_path.suffix == ".env" and as_path.is_file():
        return as_path
    if as_path.suffix == ".env" or len(as_path.parts) > 1:
        raise ConfigError(f"profile file {profile} not found: pass the path of an existing .env file or a profile "
                         f"name ({', '.join(available_profiles())})")
    for d in profiles_dirs():
        candidate = d / f"{profile}.env"
        if candidate.is_file():
            return candidate
    valid = available_profiles()
    raise ConfigError(f"unknown profile {profile!r}{_did_you_mean(profile, valid)}; valid profiles: {', '.join(valid)}")


def _check_known(values: Mapping[str, str], origin: str, known: dict[str, EnvVar],
                 lines: Mapping[str, int] | None = None) -> None:
    for key in values:
        if key not in known and key not in (PROFILE_ENV, "FPLUS_DEBUG"):
            where = f"{origin}:{lines[key]}" if lines and key in lines else origin
            raise ConfigError(
                f"unknown setting {key!r} in {where}{_did_you_mean(key, list(known))}; "
                f"valid names: {', '.join(known)} (documented in .env.example)"
            )


def _nest(flat: Mapping[str, Any], known: dict[str, EnvVar]) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key in known:
            var = known[key]
            nested.setdefault(var.section, {})[var.field] = value
    return nested


@dataclass(frozen=True)
class LoadedSettings:
    """Settings plus where each explicitly set variable came from (for `doctor` and error messages)."""

    settings: Settings
    profile: str | None
    origins: dict[str, str]


def load_settings(
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    dotenv: Path | None = Path(".env"),
) -> Settings:
    """Resolve the settings tree; see `load_settings_with_origins` for the layers."""
    return load_settings_with_origins(profile, overrides, environ=environ, dotenv=dotenv).settings


def load_settings_with_origins(
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    dotenv: Path | None = Path(".env"),
) -> LoadedSettings:
    """Resolve the settings tree from its layers.

    Args:
        profile: profile name or `.env` path; None falls back to $FPLUS_PROFILE, then to no profile.
        overrides: flat names (e.g. {"BATCH_SIZE": 4}) from the command line; None values are ignored.
        environ: the process environment (default `os.environ`); only known names are read from it, names that
            look like misspelt settings get one warning line each (`warn_env_near_misses`).
        dotenv: the `.env` file (skipped when absent or None).
    """
    known = env_vars()
    environ = os.environ if environ is None else environ
    profile = profile or environ.get(PROFILE_ENV) or None
    layers: list[tuple[str, dict[str, Any]]] = []
    if profile:
        path = resolve_profile(profile)
        lines: dict[str, int] = {}
        values = read_env_file(path, environ, lines=lines)
        _check_known(values, f"profile {path}", known, lines)
        layers.append((f"profile {profile}", values))
    if dotenv is not None and dotenv.is_file():
        lines = {}
        values = read_env_file(dotenv, environ, lines=lines)
        _check_known(values, str(dotenv), known, lines)
        layers.append((str(dotenv), values))
    warn_env_near_misses(environ, known)
    layers.append(("environment", {k: v for k, v in environ.items() if k in known}))
    cli = {k: v for k, v in (overrides or {}).items() if v is not None}
    experiment = cli.get("EXPERIMENT") or next(
        (values["EXPERIMENT"] for _, values in reversed(layers) if values.get("EXPERIMENT")), None)
    if experiment:
        from fplus.experiments import get_experiment

        layers.append((f"experiment {experiment}", get_experiment(experiment).overrides()))
    if overrides:
        unknown = [k for k in overrides if k not in known]
        if unknown:
            _check_known({unknown[0]: ""}, "command-line overrides", known)
        layers.append(("command line", {k: v for k, v in overrides.items() if v is not None}))

    flat: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for origin, values in layers:
        for key, value in values.items():
            flat[key] = value
            origins[key] = origin
    try:
        settings = Settings(**_nest(flat, known))
    except ValidationError as err:
        by_field = {(v.section, v.field): v.name for v in known.values()}
        lines = []
        for e in err.errors():
            loc = tuple(str(x) for x in e["loc"])
            name = by_field.get(loc[:2])
            msg = e["msg"].removeprefix("Value error, ")
            if name is None:
                lines.append(f"{'.'.join(loc)}: {msg}")
            else:
                lines.append(f"{name}={flat.get(name)!r} (from {origins.get(name, 'defaults')}): {msg}")
        raise ConfigError("invalid settings: " + "; ".join(lines)) from err
    return LoadedSettings(settings, profile, origins)


def settings_to_flat(settings: Settings) -> dict[str, Any]:
    """The settings as {ENV_NAME: value} (JSON-friendly: paths become strings)."""
    dumped = settings.model_dump(mode="json")
    return {v.name: dumped[v.section][v.field] for v in env_vars().values()}


def settings_to_environ(settings: Settings) -> dict[str, str]:
    """The settings as environment variables that load back to the same values: {ENV_NAME: text}, lists
    comma-separated, unset (None) values left out (for a subprocess's environment)."""
    return {k: ",".join(str(x) for x in v) if isinstance(v, list) else str(v)
            for k, v in settings_to_flat(settings).items() if v is not None}


def render_env_example() -> str:
    """The text of `.env.example`: every variable with its description and default."""
    lines = [
        "# Every fplus setting, with its default. Copy to .env and edit; precedence (highest first):",
        "# command line > the experiment's switches (EXPERIMENT) > environment > .env > profiles/<name>.env",
        "# (--profile or FPLUS_PROFILE) > defaults.",
        "# FPLUS_DEBUG=1 shows full tracebacks instead of one-line errors.",
    ]
    current = None
    flat_defaults = settings_to_flat(Settings())
    for var in env_vars().values():
        if var.section != current:
            current = var.section
            lines += ["", f"# --- {current} ---"]
        default = flat_defaults[var.name]
        if isinstance(default, list):
            default = ",".join(default)
        lines.append(f"# {var.doc}")
        lines.append(f"# {var.name}={'' if default is None else default}")
    return "\n".join(lines) + "\n"


def matrix_settings(profile: str | None, overrides: Mapping[str, Any] | None = None,
                    experiments: list[str] | None = None, seeds: list[int] | None = None,
                    **kwargs: Any) -> tuple[Settings, dict[str, Settings]]:
    """The base settings of a profile and, per matrix run, the settings it runs with: every layer and override
    applied, the experiment's own (and its seed's) on top. Runs are the experiments (`experiments`, default
    MATRIX_EXPERIMENTS) times the seeds (`seeds`, default MATRIX_SEEDS), keyed by run name: the experiment id when no
    seeds are set (SEED as resolved), else `<experiment>-seed<N>` (SEED=N, RUN_NAME the key). `kwargs` go to
    `load_settings` (environ, dotenv). An unknown experiment is a ConfigError naming the valid ones."""
    from fplus.experiments import check_experiments

    overrides = dict(overrides or {})
    if seeds is not None:
        overrides["MATRIX_SEEDS"] = ",".join(str(seed) for seed in seeds)
    base = load_settings(profile, overrides, **kwargs)
    names = list(experiments or base.run.experiments)
    check_experiments(names)
    if base.run.seeds is None:
        return base, {e: load_settings(profile, {**overrides, "EXPERIMENT": e}, **kwargs) for e in names}
    return base, {f"{e}-seed{seed}": load_settings(profile, {**overrides, "EXPERIMENT": e, "SEED": seed,
                                                             "RUN_NAME": f"{e}-seed{seed}"}, **kwargs)
                  for e in names for seed in base.run.seeds}
