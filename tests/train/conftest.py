import pytest


@pytest.fixture(autouse=True)
def _reset_accelerate():
    """Accelerate keeps process-wide singletons: reset them around every training test."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
