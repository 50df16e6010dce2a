"""Injected failures of a hub dataset download (`DATASET=user/name`): each failure a user can fix is its own
one-line error saying what to do; anything else is raised as it is (no "could not be downloaded" for every cause).

`huggingface_hub.snapshot_download` is replaced by a function raising the hub's own exception classes.
"""

from __future__ import annotations

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from typer.testing import CliRunner

from fplus.cli.main import app
from fplus.data.hub import resolve_root
from fplus.errors import DataError

REPO = "some-user/some-dataset"
SUFFIX = "  (FPLUS_DEBUG=1 for the traceback)"


def response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", f"https://huggingface.co/api/datasets/{REPO}"))


def offline() -> LocalEntryNotFoundError:
    return LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder for the specified revision on "
                                   "the local disk and outgoing traffic has been disabled.")


def no_connection() -> LocalEntryNotFoundError:
    try:
        try:
            raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")
        except httpx2.ConnectError as cause:
            raise LocalEntryNotFoundError("Got: ConnectError: ... Please check your internet connection") from cause
    except LocalEntryNotFoundError as err:
        return err


@pytest.fixture
def download(monkeypatch, tmp_path):
    """Make snapshot_download raise `failure` (set it on the returned object); records the calls."""
    monkeypatch.chdir(tmp_path)  # REPO is no local directory here

    class Fake:
        def __init__(self):
            self.failure: BaseException | None = None
            self.calls: list[dict] = []

        def __call__(self, **kwargs):
            self.calls.append(kwargs)
            raise self.failure

    fake = Fake()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


def data_info(env: dict | None = None):
    return CliRunner().invoke(app, ["data", "info", REPO], env={"FPLUS_DEBUG": None, "RANK": None,
                                                                "DATASET_REVISION": None, **(env or {})})


def one_line(out) -> str:
    assert out.exit_code == 1, out.output
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].endswith(SUFFIX)
    return lines[0].removesuffix(SUFFIX)


def test_offline_and_not_cached(download, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    download.failure = offline()
    assert one_line(data_info()) == (
        f"error: '{REPO}' is not a local directory, and the hub dataset is not in the local cache while the hub "
        f"cannot be reached (HF_HUB_OFFLINE=1); download it with network access (`hf download {REPO} --repo-type "
        "dataset`) or pass a local directory")
    assert download.calls == [{"repo_id": REPO, "repo_type": "dataset", "revision": None}]


def test_no_connection_and_not_cached(download, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    download.failure = no_connection()
    line = one_line(data_info())
    assert "not in the local cache while the hub cannot be reached (no connection: [Errno -3] Temporary failure " \
           "in name resolution)" in line and f"`hf download {REPO} --repo-type dataset`" in line


def test_incomplete_cached_copy(download):
    download.failure = IncompleteSnapshotError("some files are missing", snapshot_path="/hf/snapshots/abc")
    assert one_line(data_info()) == (
        f"error: '{REPO}': the hub cache holds an incomplete copy (/hf/snapshots/abc) and the hub cannot be reached; "
        "download it again with network access, or pass a local directory")


def test_repository_not_found(download):
    download.failure = RepositoryNotFoundError("404 Client Error. Repository Not Found", response=response(404))
    assert one_line(data_info()) == (
        f"error: '{REPO}' is neither a local directory nor a dataset on the hub (a private one needs a token: log in "
        "with `hf auth login` or set HF_TOKEN); check the path or repo id")


def test_revision_not_found(download):
    download.failure = RevisionNotFoundError("404 Client Error. Revision Not Found", response=response(404))
    out = data_info({"DATASET_REVISION": "v9"})
    assert one_line(out) == (f"error: hub dataset '{REPO}' has no revision 'v9': set DATASET_REVISION to one of its "
                             "branches, tags or commits (unset: main)")
    assert download.calls[-1]["revision"] == "v9"


def test_gated_repository(download):
    download.failure = GatedRepoError("403 Client Error. Cannot access gated repo", response=response(403))
    assert one_line(data_info()) == (
        f"error: hub dataset '{REPO}' is gated: accept its conditions at https://huggingface.co/datasets/{REPO}, then "
        "log in with `hf auth login` or set HF_TOKEN")


@pytest.mark.parametrize("status", [401, 403])
def test_no_access(download, status):
    download.failure = HfHubHTTPError(f"{status} Client Error. Unauthorized", response=response(status))
    assert one_line(data_info()) == (f"error: no access to hub dataset '{REPO}' (HTTP {status}): log in with `hf "
                                     "auth login` or set HF_TOKEN with a token that can read it")


def test_invalid_repo_id(download):
    download.failure = HFValidationError("Repo id must use alphanumeric chars or '-', '_', '.'")
    assert one_line(data_info()) == (f"error: dataset '{REPO}' not found: not a local directory, and not a valid hub "
                                     "repo id (Repo id must use alphanumeric chars or '-', '_', '.')")


def test_the_cause_is_kept(download):
    download.failure = RepositoryNotFoundError("404 Client Error.", response=response(404))
    with pytest.raises(DataError) as err:
        resolve_root(REPO)
    assert err.value.__cause__ is download.failure


@pytest.mark.parametrize("failure", [
    HfHubHTTPError("500 Server Error: Internal Server Error", response=response(500)),
    RuntimeError("a bug in the download"),
    OSError(28, "No space left on device"),
])
def test_anything_else_is_raised_as_it_is(download, failure):
    download.failure = failure
    with pytest.raises(type(failure)) as err:
        resolve_root(REPO)
    assert err.value is failure
    line = one_line(data_info())  # the CLI names the type of an error that is not fplus's own
    assert line.startswith(f"error ({type(failure).__name__}): ")
