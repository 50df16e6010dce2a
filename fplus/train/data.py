"""The training data pipeline: frames of chosen episodes -> samples (DESIGN 3) -> batches (keys in fplus.batch).

    samples = PolicySamples(ds, keys, episodes, horizon=H, history=T, future=K, latents=z, coc=texts)
    loader  = DataLoader(samples, batch_size, sampler=EpochSampler(len(samples), seed, ...),
                         collate_fn=Collate(policy.processor))    # prompts built in the workers

Frames come from a `FrameStore`: all frames of the episodes decoded once into RAM when they fit in
FRAME_CACHE_GB, else each frame decoded alone when asked for (seek to its keyframe, decode forward).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from fplus import batch as K
from fplus.data.lerobot import DataKeys, LeRobotDataset
from fplus.data.windows import episode_bounds, sample_windows
from fplus.errors import DataError


class FrameStore:
    """Camera frames by global row. `preload=True` decodes every frame of `episodes` up front; otherwise each
    frame is decoded alone on demand (`LeRobotDataset.frame_at`).

    Args:
        ds: the dataset. key: camera feature. episodes: the episodes that will be asked for.
    """

    def __init__(self, ds: LeRobotDataset, key: str, episodes: Sequence[int], preload: bool):
        self.ds, self.key = ds, key
        self.preloaded: dict[int, np.ndarray] = {}
        if preload:
            for e in episodes:
                self.preloaded[e] = ds.episode_frames(key, e)

    @staticmethod
    def estimate_bytes(ds: LeRobotDataset, key: str, episodes: Sequence[int]) -> int:
        """RAM needed to hold every frame of `episodes` (from the feature's declared shape)."""
        shape = ds.features[key]["shape"]
        frames = sum(ds.episode(e).length for e in episodes)
        return int(frames * np.prod(shape))

    def get(self, episode: int, row: int) -> np.ndarray:
        """The frame (h, w, 3) uint8 at global `row` of `episode` (from RAM, or decoded alone by seeking)."""
        frames = self.preloaded.get(episode)
        if frames is None:
            return self.ds.frame_at(self.key, row)
        return frames[row - self.ds.episode(episode).start]


class PolicySamples(Dataset):
    """One sample per frame of the given episodes.

    Args:
        ds: the dataset. keys: image, action, instruction (+ state, wrist image) keys, already validated.
        episodes: episode indices (e.g. the training split).
        horizon, history, future: H, T, K of DESIGN 3.
        latents: (N_frames, D) world latents of the whole dataset, or None (no world memory).
        coc: {episode_index: CoC text} or None.
        preload: decode every frame into RAM first (see FrameStore).
    """

    def __init__(self, ds: LeRobotDataset, keys: DataKeys, episodes: Sequence[int], horizon: int, history: int,
                 future: int, latents: np.ndarray | None = None, coc: dict[int, str] | None = None,
                 preload: bool = True):
        self.keys = keys
        self.horizon, self.history, self.future = horizon, history, future
        self.episodes = sorted(episodes)
        episode_of = ds.episode_of_frames()
        self.rows = np.concatenate([np.arange(ds.episode(e).start, ds.episode(e).stop) for e in self.episodes])
        self.start, self.stop = episode_bounds(episode_of)
        self.episode_of = episode_of
        self.actions = ds.column(keys.action).astype(np.float32)
        self.state = ds.column(keys.state).astype(np.float32) if keys.state else None
        self.instructions = ds.instructions(keys.instruction)
        self.latents = latents
        self.coc = coc
        cameras = [keys.image] + ([keys.wrist_image] if keys.wrist_image else [])
        self.stores = [FrameStore(ds, key, self.episodes, preload) for key in cameras]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        t = self.rows[i]
        w = sample_windows(np.array([t]), self.start[[t]], self.stop[[t]], self.horizon, self.history, self.future)
        episode = int(self.episode_of[t])
        images = [store.get(episode, t) for store in self.stores]
        sample = {
            K.IMAGES: torch.from_numpy(images[0] if len(images) == 1 else np.stack(images)),
            K.INSTRUCTIONS: str(self.instructions[t]),
            K.ACTIONS: torch.from_numpy(self.actions[w.action[0]]),
            K.ACTION_PAD: torch.from_numpy(w.action_pad[0]),
            "episode_index": episode,
            "index": int(t),
        }
        if self.state is not None:
            sample[K.STATE] = torch.from_numpy(self.state[t])
        if self.latents is not None:
            sample[K.Z_HIST] = torch.from_numpy(self.latents[w.history[0]].astype(np.float32))
            sample[K.Z_FUTURE] = torch.from_numpy(self.latents[w.future[0]].astype(np.float32))
            sample[K.FUTURE_VALID] = torch.from_numpy(w.future_valid[0])
        if self.coc is not None:
            sample[K.COC_TEXT] = self.coc[episode]
        return sample


def collate(samples: list[dict]) -> dict:
    """Stack tensors along a new batch dimension; strings and ints become lists."""
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if torch.is_tensor(values[0]) else values
    return out


class Collate:
    """The DataLoader's collate function: `collate`, then the policy's processor (prompt building: tokenizer, image
    resize and normalisation), so that it runs in the worker processes and the batch arrives as tensors.

    Args:
        processor: a fplus.model.processor.PolicyProcessor (or None: no prompt). with_coc: build the CoC prompt
            (training of a CoC experiment; validation and evaluation predict actions only).
    """

    def __init__(self, processor=None, with_coc: bool = False):
        self.processor = processor
        self.with_coc = with_coc

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate(samples)
        return batch if self.processor is None else self.processor(batch, with_coc=self.with_coc)


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded across processes, that can start mid-epoch (exact resume).

    Epoch e's order is a permutation drawn from seed + e; process r of W takes positions r, r+W, ... of it
    (padded by wrapping so every process gets the same count); `start` skips that many of this process's samples.
    """

    def __init__(self, size: int, seed: int, epoch: int = 0, start: int = 0, rank: int = 0, world: int = 1,
                 shuffle: bool = True):
        self.size, self.seed, self.epoch, self.start = size, seed, epoch, start
        self.rank, self.world, self.shuffle = rank, world, shuffle

    def per_process(self) -> int:
        return -(-self.size // self.world)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        total = self.per_process() * self.world
        order = torch.cat([order, order[: total - self.size]]) if total > self.size else order
        mine = order[self.rank::self.world].tolist()
        return iter(mine[self.start:])

    def __len__(self) -> int:
        return self.per_process() - self.start


def latent_stats(latents: np.ndarray, ds: LeRobotDataset, episodes) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (D,) float32 of the raw world latents (N, D) over the frames of `episodes`
    (the training split): the standardisation every path applies (DESIGN 4). Accumulated in float64."""
    total = sq = None
    n = 0
    for e in episodes:
        ep = ds.episode(e)
        z = np.asarray(latents[ep.start:ep.stop], dtype=np.float64)
        total = z.sum(0) if total is None else total + z.sum(0)
        sq = (z * z).sum(0) if sq is None else sq + (z * z).sum(0)
        n += len(z)
    if not n:
        raise DataError("no training frames to compute the world-latent statistics from")
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 0.0) * n / max(n - 1, 1))
    return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32))


def fits_in_ram(ds: LeRobotDataset, keys, budget_gb: float) -> bool:
    """Whether every frame of the dataset's cameras, decoded, fits in `budget_gb` (FRAME_CACHE_GB)."""
    cameras = [keys.image] + ([keys.wrist_image] if keys.wrist_image else [])
    need = sum(FrameStore.estimate_bytes(ds, k, [e.index for e in ds.episodes]) for k in cameras)
    return need <= budget_gb * 2**30
