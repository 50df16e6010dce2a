"""Small datasets and settings for tests (built locally, no hub)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fplus.data.lerobot import LeRobotDataset
from fplus.data.writer import LeRobotWriter
from fplus.settings import Settings, load_settings

CAM = "observation.images.image"


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons (DESIGN 9): reset them between runs in one test process."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def write_toy_dataset(root: Path, lengths=(12, 9, 15, 11, 10), size: int = 64, seed: int = 0) -> LeRobotDataset:
    """Episodes where a bright square moves; the action is the square's next displacement (learnable)."""
    rng = np.random.default_rng(seed)
    w = LeRobotWriter(root, fps=10, features={
        CAM: {"dtype": "video", "shape": [size, size, 3], "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": [2], "names": ["x", "y"]},
        "action": {"dtype": "float32", "shape": [2], "names": ["dx", "dy"]}})
    tasks = ["move the square right", "move the square down"]
    for e, n in enumerate(lengths):
        direction = np.array([1, 0]) if e % 2 == 0 else np.array([0, 1])
        pos = rng.integers(4, 16, size=2) + np.outer(np.arange(n), direction * 2)
        frames = np.full((n, size, size, 3), 30, np.uint8)
        for t, (x, y) in enumerate(pos):
            frames[t, y:y + 8, x:x + 8] = (230, 200, 40)
        action = np.tile(direction * 2.0, (n, 1)).astype(np.float32)
        w.add_episode(tasks[e % 2], {CAM: frames, "observation.state": pos.astype(np.float32),
                                     "action": action})
    return LeRobotDataset.open(w.finalize())


def toy_settings(tmp: Path, dataset: Path, **overrides) -> Settings:
    """Settings of a tiny CPU run on a toy dataset (tiny backbone and encoders, small batches)."""
    values = {
        "DATASET": str(dataset), "IMAGE_KEY": CAM, "STATE_KEY": "observation.state", "ACTION_KEY": "action",
        "INSTRUCTION_KEY": "task", "VAL_FRACTION": "0.2", "BACKBONE": "tiny", "IMAGE_SIZE": "64",
        "FINETUNE": "full", "PRECISION": "fp32", "ACTION_HORIZON": "4", "WORLD_HISTORY": "3", "WORLD_FUTURE": "2",
        "DINO_MODEL": "tiny", "VJEPA_MODEL": "tiny", "CACHE_DIR": str(tmp / "cache"), "BATCH_SIZE": "4",
        "MAX_EPOCHS": "1", "LOG_EVERY": "1", "OUTPUT_DIR": str(tmp / "runs"), "WARMUP_STEPS": "2",
        "PROPHET_WIDTH": "32", "PROPHET_LAYERS": "1", "PROPHET_HEADS": "2", "INJECTION_HEADS": "2",
        "LR_HEADS": "3e-3", "LR_PROPHET": "3e-3", "LR_BACKBONE": "1e-4",
    }
    values.update({k: str(v) for k, v in overrides.items()})
    return load_settings(None, values, environ={}, dotenv=None)


def compute_toy_latents(settings: Settings) -> None:
    from fplus.world.cache import compute_latents
    from fplus.world.encoders import build_encoder

    ds = LeRobotDataset.open(settings.data.dataset)
    w = settings.world
    enc = build_encoder(w.source, dino_model=w.dino_model, vjepa_model=w.vjepa_model, pooling=w.pooling,
                        temporal_window=w.temporal_window)
    compute_latents(ds, settings.data.image_key, enc, w.cache_dir, w.batch_size, progress=False)


def policy_config(*, action_dim: int, state_dim: int | None = None, world_dim: int | None = None, history: int = 4,
                  future: int = 4, coc_mode: str = "joint_after_act", init_seed: int = 0, **model):
    """A PolicyConfig for unit tests: `model` are ModelSettings fields (backbone="tiny", prophet=True, ...);
    FINETUNE defaults to `full` here (the tests' backbone is tiny), the rest to the settings' defaults."""
    from fplus.model.config import PolicyConfig
    from fplus.settings import ModelSettings

    return PolicyConfig(model=ModelSettings(**{"finetune": "full", **model}), action_dim=action_dim,
                        state_dim=state_dim, world_dim=world_dim, history=history, future=future, coc_mode=coc_mode,
                        init_seed=init_seed)


def run_cli(*args: str, env: dict | None = None):
    """`fplus ARGS` in this process through Typer's CliRunner (stdout and stderr apart, wide columns; the data keys,
    FPLUS_DEBUG and RANK of the test environment unset unless `env` sets them): the Result has exit_code, stdout,
    stderr."""
    from typer.testing import CliRunner

    from fplus.cli.main import app

    unset = {"IMAGE_KEY": None, "INSTRUCTION_KEY": None, "FPLUS_DEBUG": None, "RANK": None}
    return CliRunner().invoke(app, [str(a) for a in args], env={**unset, "COLUMNS": "200", **(env or {})})
