"""The exported model folder (`fplus export RUN OUT`): a self-contained, shareable policy, and how it is found again.

    OUT/fplus_export.json      the marker: format, fplus version, run, experiment, step, backbone id + revision, world
                               encoder id + revision (None without world latents; its weights are not bundled),
                               dataset id + revision + fingerprint, the observation layout (frame shape, tasks,
                               action names) and the sha256 of every file below
    OUT/config.json            the policy config (fplus.model.config.PolicyConfig)           } FPlusPolicy.save's
    OUT/policy.safetensors     heads, Prophet, injection, token rows, normalisers, latent stats } files, copied from
    OUT/backbone_trainable.safetensors   the backbone weights training changed (LoRA or all)  } the checkpoint's
    OUT/processor/             tokenizer, image processor, fplus_processor.json               } policy/
    OUT/normalization.json     the action/state normalisation (readable copy of the buffers)
    OUT/latent_stats.json      mean/std of the world latents over the training split (world policies)
    OUT/training_config.json   the run's config.json: every setting, the policy config, the dataset fingerprint
    OUT/split.json             the run's train/validation episodes (offline evaluation uses the validation ones)
    OUT/results/               the run's offline-step-N.json and sim-<sim>-step-N.json of the exported step
    OUT/README.md              the model card (YAML front matter for the hub)
    OUT/eval/                  written later by `fplus eval OUT` (not part of the export, not hashed)

Since the folder holds exactly what `FPlusPolicy.save` writes, `FPlusPolicy.load(OUT)` reads it;
`FPlusPolicy.from_pretrained(path_or_hub_id)` first resolves a hub id (huggingface_hub `snapshot_download`) and
checks every file against the marker's hashes (`resolve_pretrained`). fplus.deploy.export writes the folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fplus.errors import CheckpointError, ConfigError, FplusError
from fplus.io import file_sha256, read_json

MARKER = "fplus_export.json"
FORMAT = "fplus-export"
FORMAT_VERSION = 1
MODEL_CARD = "README.md"
TRAINING_CONFIG = "training_config.json"
NORMALIZATION = "normalization.json"
RESULTS_DIR = "results"
EVAL_DIR = "eval"
UNHASHED = (MARKER, MODEL_CARD)
"""Files never hashed: the marker itself and the model card (editable on the hub without breaking the folder)."""
REQUIRED = ("format", "format_version", "fplus_version", "run", "experiment", "step", "backbone", "world_encoder",
            "dataset", "observation", "files")
_AGAIN = "export it again (fplus export RUN OUT --overwrite) or download it again"



def _hashed_files(folder: Path) -> list[Path]:
    """Every file of the folder that the marker records (not the marker, the card, eval/ or hidden files)."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or str(rel) in UNHASHED or rel.parts[0] == EVAL_DIR \
                or any(part.startswith(".") for part in rel.parts):
            continue
        out.append(p)
    return out


def is_exported(path: str | Path) -> bool:
    """Whether `path` is an exported model folder (it holds fplus_export.json)."""
    return (Path(path) / MARKER).is_file()


def write_marker(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write OUT/fplus_export.json: `meta` (every REQUIRED key but format, format_version and files) and the sha256
    of every file now in `folder` (call it last, before the model card). Returns what was written."""
    files = {str(p.relative_to(folder)): file_sha256(p) for p in _hashed_files(folder)}
    marker = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "files": files}
    missing = [k for k in REQUIRED if k not in marker]
    if missing:
        raise ValueError(f"export metadata lacks {missing}")  # a bug of the writer, not a user error
    (folder / MARKER).write_text(json.dumps(marker, indent=2))
    return marker


def read_marker(folder: Path) -> dict[str, Any]:
    """The marker of an exported folder, checked for its format and keys (a CheckpointError naming the file)."""
    path = Path(folder) / MARKER
    try:
        marker = read_json(path, "the export marker", _AGAIN)
    except FplusError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an fplus export marker (no `format: {FORMAT}`); {_AGAIN}")
    if marker.get("format_version") != FORMAT_VERSION:  # an absent one is reported here too
        raise CheckpointError(f"{path}: format_version {marker.get('format_version')!r}, this fplus reads "
                              f"{FORMAT_VERSION}; install the fplus version that wrote it "
                              f"({marker.get('fplus_version')}) or export it again")
    missing = [k for k in REQUIRED if k not in marker]
    if missing:
        raise CheckpointError(f"{path}: `{missing[0]}` is missing; {_AGAIN}")
    return marker


def verify_folder(folder: str | Path) -> dict[str, Any]:
    """Check an exported folder: its marker, and every recorded file present with its recorded hash. Returns the
    marker. CheckpointError: not an exported folder, a missing or changed file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a directory (expected an exported model folder: fplus export)")
    if not is_exported(folder):
        raise CheckpointError(f"{folder} is not an exported model folder ({MARKER} missing); export a run with "
                              "`fplus export RUN OUT`, or pass a run directory where a run directory is accepted")
    marker = read_marker(folder)
    for name, digest in marker["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (recorded in {folder / MARKER}); {_AGAIN}")
        if file_sha256(path) != digest:
            raise CheckpointError(f"{path} does not match its hash in {folder / MARKER}: the folder is damaged or "
                                  f"was edited; {_AGAIN}")
    return marker


def resolve_pretrained(path_or_hub_id: str | Path, revision: str | None = None) -> Path:
    """The local exported folder of a path or a hub model id (owner/name, fetched with huggingface_hub's
    `snapshot_download`, from the local cache alone under HF_HUB_OFFLINE=1), verified (`verify_folder`).

    ConfigError: a revision given with a local path, a name that is neither. CheckpointError: a hub id that cannot
    be fetched (offline and not cached, no such repo or revision, no access), a damaged folder."""
    text = str(path_or_hub_id)
    path = Path(text).expanduser()
    if path.exists():
        if revision is not None:
            raise ConfigError(f"{path} is a local folder: revision={revision!r} applies to hub ids only; drop it")
        verify_folder(path)
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text) or text.startswith("."):
        raise CheckpointError(f"{text!r} is neither an exported model folder nor a hub model id (owner/name)")
    folder = Path(_download(text, revision))
    verify_folder(folder)
    return folder


def _download(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    try:
        return snapshot_download(repo_id=repo_id, repo_type="model", revision=revision)
    except LocalEntryNotFoundError as err:
        why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise CheckpointError(f"{repo_id!r}{at} is not a local folder and not in the local hub cache while {why}; "
                              f"download it with network access (`hf download {repo_id}`) or pass a local "
                              "folder") from err
    except GatedRepoError as err:  # before RepositoryNotFoundError, its base class
        raise CheckpointError(f"hub model {repo_id!r} is gated: accept its conditions on the hub, then log in "
                              "(`hf auth login` or HF_TOKEN)") from err
    except RepositoryNotFoundError as err:
        raise CheckpointError(f"{repo_id!r} is neither a local folder nor a model on the hub (a private one needs "
                              "a token: `hf auth login` or HF_TOKEN)") from err
    except RevisionNotFoundError as err:
        raise CheckpointError(f"hub model {repo_id!r} has no revision {revision!r}") from err
