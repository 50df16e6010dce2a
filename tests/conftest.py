"""Shared test setup: offline hub, no settings leaking in from the developer's environment or .env."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MUJOCO_GL", "egl")

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURE = REPO.parent / "shared" / "fixtures" / "lerobot_v30_libero_like"
LOCAL_FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(autouse=True)
def _clean_settings_env(monkeypatch, tmp_path):
    """Run each test from an empty directory with no fplus variables set (profiles are found via the package)."""
    from fplus.settings import PROFILE_ENV, env_vars

    for name in [*env_vars(), PROFILE_ENV, "FPLUS_PROFILES_DIR", "FPLUS_DEBUG"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def libero_fixture() -> Path:
    """The team's shared LIBERO-like dataset written by the lerobot library (README: the frame colours), from
    ../shared when the checkout sits next to it, else the identical copy in tests/fixtures."""
    return SHARED_FIXTURE if SHARED_FIXTURE.is_dir() else LOCAL_FIXTURES / "lerobot_v30_libero_like"
