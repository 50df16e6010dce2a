import pytest

from tests.helpers import compute_toy_latents, toy_settings, write_toy_dataset


@pytest.fixture(autouse=True)
def _reset_accelerate():
    """Accelerate keeps process-wide singletons: reset them around every training test."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy dataset (5 episodes, a moving square) with its tiny-DINO latents, shared by a test module."""
    root = tmp_path_factory.mktemp("toy")
    write_toy_dataset(root / "ds")
    compute_toy_latents(toy_settings(root, root / "ds"))
    return root
