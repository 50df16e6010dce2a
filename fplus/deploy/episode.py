"""One episode's observations as the policy reads them, shared by the closed loop and the policy server:
the online world latents of a live episode and the batch of one observation."""

from __future__ import annotations

import numpy as np
import torch

from fplus import batch as K


class OnlineLatents:
    """World latents of a live rollout: z_t from the causal clip of the last m frames seen (repeat-padded)."""

    def __init__(self, encoder, history: int):
        self.encoder, self.history = encoder, history
        self.frames: list[np.ndarray] = []
        self.latents: list[torch.Tensor] = []

    def add(self, frame: np.ndarray) -> None:
        self.frames.append(frame)
        m = self.encoder.temporal_window
        idx = [max(0, len(self.frames) - m + i) for i in range(m)]
        clip = torch.from_numpy(np.stack([self.frames[i] for i in idx]))[None]  # (1, m, H, W, 3)
        # rounded to float16 as the cache stores latents: online and offline latents of a frame are identical
        self.latents.append(self.encoder.encode_frames(clip)[0].half().float())

    def history_window(self) -> torch.Tensor:
        """(1, T, D): z[t-T+1 .. t], the first latent repeated before the rollout started."""
        n = len(self.latents)
        idx = [max(0, n - self.history + i) for i in range(self.history)]
        return torch.stack([self.latents[i] for i in idx])[None]


def observation_batch(obs: dict, cameras: tuple[str, ...], instruction: str, use_state: bool) -> dict:
    """The policy batch of one observation: IMAGES (1, h, w, 3) for one camera, (1, C, h, w, 3) for C cameras."""
    frames = [obs[c] for c in cameras]
    images = frames[0] if len(frames) == 1 else np.stack(frames)
    batch = {K.IMAGES: torch.from_numpy(images)[None], K.INSTRUCTIONS: [instruction]}
    if use_state:
        batch[K.STATE] = torch.from_numpy(obs["state"])[None]
    return batch
