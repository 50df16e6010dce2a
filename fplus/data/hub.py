"""Where a dataset lives: a local directory, or a hub dataset repo fetched into the local hub cache."""

from __future__ import annotations

from pathlib import Path

from fplus.errors import DataError


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def resolve_root(source: str | Path, revision: str | None = None) -> tuple[Path, str | None]:
    """A local directory, or a hub repo id downloaded with huggingface_hub. Returns (root, repo_id or None)."""
    path = Path(source).expanduser()
    if path.exists():
        return path, None
    text = str(source)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return Path(download_dataset(text, revision)), text
    raise DataError(f"dataset {text!r} not found (neither a local directory nor a hub repo id like user/name)")


def download_dataset(repo_id: str, revision: str | None = None) -> str:
    """`snapshot_download` of a hub dataset repo (the local cache when it holds it). The failures a user can fix are
    a DataError each, saying which and what to do: not cached while the hub cannot be reached (HF_HUB_OFFLINE=1 or
    no network), an incomplete cached copy, no such repository, no such revision, a gated repository, no access
    (HTTP 401/403). Anything else (a proxy error, the hub failing, a full disk) is raised as it is."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    login = "log in with `hf auth login` or set HF_TOKEN"
    try:
        return snapshot_download(repo_id=repo_id, repo_type="dataset", revision=revision)
    except IncompleteSnapshotError as err:
        raise DataError(f"{repo_id!r}: the hub cache holds an incomplete copy ({err.snapshot_path}) and the hub cannot "
                        "be reached; download it again with network access, or pass a local directory") from err
    except LocalEntryNotFoundError as err:  # offline or no connection, and not in the local cache
        why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else f"no connection: {_first_line(err.__cause__ or err)}"
        raise DataError(f"{repo_id!r} is not a local directory, and the hub dataset is not in the local cache while "
                        f"the hub cannot be reached ({why}); download it with network access (`hf download "
                        f"{repo_id} --repo-type dataset`) or pass a local directory") from err
    except GatedRepoError as err:  # before RepositoryNotFoundError, its base class
        raise DataError(f"hub dataset {repo_id!r} is gated: accept its conditions at "
                        f"https://huggingface.co/datasets/{repo_id}, then {login}") from err
    except RepositoryNotFoundError as err:
        raise DataError(f"{repo_id!r} is neither a local directory nor a dataset on the hub (a private one needs a "
                        f"token: {login}); check the path or repo id") from err
    except RevisionNotFoundError as err:
        raise DataError(f"hub dataset {repo_id!r} has no revision {revision!r}: set DATASET_REVISION to one of its "
                        "branches, tags or commits (unset: main)") from err
    except HFValidationError as err:
        raise DataError(f"dataset {repo_id!r} not found: not a local directory, and not a valid hub repo id "
                        f"({_first_line(err)})") from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            raise DataError(f"no access to hub dataset {repo_id!r} (HTTP {status}): {login} with a token that can "
                            "read it") from err
        raise
