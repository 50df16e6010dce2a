"""The serving tests' shared run: one tiny trained E2 run (world memory, state), trained once per session."""

from __future__ import annotations

import pytest

from tests.deploy.serve_helpers import ServedRun
from tests.helpers import compute_toy_latents, toy_settings, write_toy_dataset


@pytest.fixture(scope="session")
def served_run(tmp_path_factory) -> ServedRun:
    """A tiny E2 run (tiny DINO latents, Prophet + injection, 2-d state, H=4, 2-d actions) trained 2 steps."""
    from accelerate.state import AcceleratorState, PartialState

    from fplus.deploy.loader import open_run
    from fplus.rundir import load_run, run_dir_for
    from fplus.train.run import train_run
    from fplus.world.encoders import build_encoder

    root = tmp_path_factory.mktemp("served")
    write_toy_dataset(root / "ds", lengths=(8, 7, 9, 6))
    s = toy_settings(root, root / "ds", EXPERIMENT="E2", MAX_STEPS=2, VAL_FRACTION=0.25)
    compute_toy_latents(s)
    train_run(s, run_dir_for(s), progress_bar=False)
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    opened = open_run(load_run(run_dir_for(s)), "cpu")
    w = s.world
    encoder = build_encoder(w.source, dino_model=w.dino_model, vjepa_model=w.vjepa_model, pooling=w.pooling,
                            temporal_window=w.temporal_window)
    return ServedRun(run_dir_for(s), opened.policy, encoder)
