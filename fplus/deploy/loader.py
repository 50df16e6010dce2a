"""Open a trained run for inference: its dataset (fingerprint-checked), its policy on a device, its world latents.

Every consumer of a trained checkpoint goes through here after `fplus.rundir.load_run` (offline eval, the closed
loop, a policy server), so the checks are the same everywhere:

    run = load_run(run_dir, step)          # torch-free: settings, experiment, verified checkpoint of this run
    opened = open_run(run, device)         # dataset (fingerprint == the run's), policy from the checkpoint
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fplus.data.lerobot import DataKeys, LeRobotDataset, keys_from_settings
from fplus.device import resolve_device
from fplus.model.policy import FPlusPolicy
from fplus.rundir import Run


@dataclass
class OpenedRun:
    """A run ready for inference: `run` (fplus.rundir.Run), `dataset` and its `keys`, `policy` (eval mode) on
    `device`."""

    run: Run
    dataset: LeRobotDataset
    keys: DataKeys
    policy: FPlusPolicy
    device: str

    def latents(self) -> np.ndarray | None:
        """The cached raw world latents (N, D) of the dataset for the run's encoder, or None without world latents."""
        if not self.policy.config.world_dim:
            return None
        from fplus.world.cache import find_latents

        w = self.run.settings.world
        encoder = w.dino_model if w.source == "dino" else w.vjepa_model
        _, latents = find_latents(w.cache_dir, self.dataset, self.keys.image, w.source, encoder, w.pooling,
                                  w.temporal_window)
        return np.asarray(latents)


def open_run(run: Run, device: str | None = None) -> OpenedRun:
    """Open the run's dataset (refused when its fingerprint is not the run's) and load the checkpoint's policy.

    `device` None: the run's EVAL_DEVICE (auto: cuda when available)."""
    settings = run.settings
    keys = keys_from_settings(settings.data)
    ds = LeRobotDataset.open(settings.data.dataset, keys, revision=settings.data.revision)
    run.check_dataset(ds.fingerprint, str(settings.data.dataset))
    device = resolve_device(device or settings.eval.device)
    policy = FPlusPolicy.load(run.policy_dir, device=device).eval()
    return OpenedRun(run, ds, keys, policy, device)
