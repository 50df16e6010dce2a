import pytest

from tests.helpers import compute_toy_latents, reset_accelerate, toy_settings, write_toy_dataset


@pytest.fixture(autouse=True)
def _reset_accelerate():
    """Accelerate keeps process-wide singletons: reset them around every training test."""
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy dataset (5 episodes, a moving square) with its tiny-DINO latents, shared by a test module."""
    root = tmp_path_factory.mktemp("toy")
    write_toy_dataset(root / "ds")
    compute_toy_latents(toy_settings(root, root / "ds"))
    return root


@pytest.fixture(scope="module")
def toy_ds(tmp_path_factory):
    """The toy dataset alone (for E0, which reads no latents)."""
    root = tmp_path_factory.mktemp("toy_ds")
    write_toy_dataset(root / "ds")
    return root
