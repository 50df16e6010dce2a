"""The training data pipeline: frames of chosen episodes -> samples (DESIGN 3) -> batches (keys in fplus.batch).

    samples = PolicySamples(ds, keys, episodes, horizon=H, history=T, future=K, latents=z, coc=texts)
    loader  = DataLoader(samples, batch_size, sampler=EpochSampler(len(samples), seed, ...),
                         collate_fn=Collate(policy.processor))    # prompts built in the workers
    mixture = WeightedEpochSampler(ds.member_of_rows(samples.rows), ds.weights, seed, ...)  # a MixtureDataset
    train   = DataLoader(samples, batch_size, sampler=EpochIndices(sampler), persistent_workers=True,
                         collate_fn=Collate(policy.processor, with_coc=True, augment=ImageAugment.from_settings(...)))
              # training: one loader for the whole run; each epoch sets train.sampler.epoch_sampler and iterates it
              # again; the samples carry their epoch to Collate, which keys the augmentation draws (AUGMENT) with it

Frames come from a `FrameStore`: all frames of the episodes decoded once into RAM when they fit in
FRAME_CACHE_GB, else each frame decoded alone when asked for (seek to its keyframe, decode forward).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from fplus import batch as K
from fplus.data.lerobot import DataKeys, LeRobotDataset
from fplus.data.windows import episode_bounds, sample_windows
from fplus.errors import DataError


def default_workers(num_workers: int | None, processes: int = 1) -> int:
    """NUM_WORKERS as set, or (unset) 0 without a CUDA GPU (the model runs on the CPUs, and a worker only takes them
    from it: the demo E0 on 2 CPUs trains fastest with 0, benchmarks/data.py), else from the CPUs this process may
    use: one per CPU of its share of the machine (`processes` training processes share it), less one for the
    training process itself, at most 8."""
    if num_workers is not None:
        return num_workers
    if not torch.cuda.is_available():
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // max(processes, 1) - 1))


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

    def __getitem__(self, i: int | tuple[int, int]) -> dict:
        """Sample i; an (epoch, i) pair (from `EpochIndices`) adds "epoch", which `Collate` takes for the draws."""
        if isinstance(i, tuple):
            epoch, i = i
            return {**self[i], "epoch": epoch}
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
    """The DataLoader's collate function: `collate`, then (training only) the image augmentation, then the policy's
    processor (prompt building: tokenizer, image resize and normalisation), so that it runs in the worker
    processes and the batch arrives as tensors.

    Args:
        processor: a fplus.model.processor.PolicyProcessor (or None: no prompt). with_coc: build the CoC prompt
            (training of a CoC experiment; validation and evaluation predict actions only).
        augment: a fplus.model.augment.ImageAugment, or None (no augmentation: validation, evaluation, AUGMENT=none).
            Only the training loader passes one. epoch: the training epoch of the samples (a key of the draws, with
            SEED, each sample's global frame row and the camera: the batches do not depend on the workers), used
            when the samples do not carry theirs (those of an `EpochIndices` loader do).
        coc_fraction: COC_FRACTION, the share of each training batch that carries its CoC text (with_coc).
        coc_prompt: also build K.COC_PROMPT, the prompt with every sample's CoC text, beside the plain K.PROMPT
            (validation of a CoC experiment scores L_text on it; only when the samples carry CoC texts).
    """

    def __init__(self, processor=None, with_coc: bool = False, augment=None, epoch: int = 0,
                 coc_fraction: float = 1.0, coc_prompt: bool = False):
        self.processor = processor
        self.with_coc = with_coc
        self.coc_prompt = coc_prompt
        self.coc_fraction = coc_fraction
        self.augment = augment
        self.epoch = epoch

    def __call__(self, samples: list[dict]) -> dict:
        epoch = samples[0].get("epoch", self.epoch)  # samples of an EpochIndices loader carry their epoch
        with one_thread():
            batch = collate([{k: v for k, v in s.items() if k != "epoch"} for s in samples])
            if self.augment is not None:
                batch[K.IMAGES] = self.augment(batch[K.IMAGES], batch["index"], epoch)
            if self.processor is None:
                return batch
            return self.processor(batch, with_coc=self.with_coc, coc_fraction=self.coc_fraction,
                                  coc_prompt=self.coc_prompt)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's intra-op pool set to one thread for the block, then restored: the batches are built as in a
    DataLoader worker (which runs on one thread) when the training process builds them (NUM_WORKERS=0). On a busy
    machine the pool runs the pipeline's many small tensor ops (augmentation, prompt building) 5-12x slower than
    one thread; on a quiet one it gains ~1.3x (2 CPUs, benchmarks/data.py, threads)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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

    def order(self) -> torch.Tensor:
        """The epoch's sample order (size,) before sharding: a permutation drawn from seed + epoch (or 0..size-1)."""
        if self.shuffle:
            return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return torch.arange(self.size)

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        total = self.per_process() * self.world
        order = torch.cat([order, order[: total - self.size]]) if total > self.size else order
        mine = order[self.rank::self.world].tolist()
        return iter(mine[self.start:])

    def __len__(self) -> int:
        return self.per_process() - self.start


class EpochIndices(Sampler[tuple[int, int]]):
    """The samples of an epoch's sampler as (epoch, sample) pairs, for one DataLoader that serves every epoch of a
    run with the same (persistent) workers: set `epoch_sampler` to the next epoch's sampler before iterating the
    loader again. The epoch travels with each index to the workers, where `Collate` keys the draws with it."""

    def __init__(self, epoch_sampler: EpochSampler):
        self.epoch_sampler = epoch_sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch_sampler.epoch
        return ((epoch, i) for i in self.epoch_sampler)

    def __len__(self) -> int:
        return len(self.epoch_sampler)


class WeightedEpochSampler(EpochSampler):
    """An EpochSampler over the samples of a mixture that draws each member in proportion to its weight.

    An epoch is `len(groups)` draws (as many as the training samples, so steps per epoch are as without weights).
    Member i gets `quotas()[i]` of them: weight_i x size, rounded by largest remainder (the quotas sum to the size).
    Its draws are its samples in a seeded random order, without replacement when the quota is at most its sample
    count, else whole permutations of them repeated and then part of one more (every sample drawn floor or ceil of
    quota / count times). The epoch's order is a seeded permutation of all draws. Every draw is a function of (seed,
    epoch) alone (a numpy SeedSequence), so sharding over processes (rank r of W takes positions r, r+W, ...) and
    `start` (resume mid-epoch) work as in EpochSampler.

    Args:
        groups: (size,) the member of each sample (0..M-1; every member has at least one sample).
        weights: (M,) the members' mixture weights (normalised here).
    """

    def __init__(self, groups: np.ndarray, weights: Sequence[float], seed: int, epoch: int = 0, start: int = 0,
                 rank: int = 0, world: int = 1):
        super().__init__(len(groups), seed, epoch, start, rank, world, shuffle=True)
        self.groups = np.asarray(groups, dtype=np.int64)
        w = np.asarray(weights, dtype=np.float64)
        counts = np.bincount(self.groups, minlength=len(w))
        if len(counts) != len(w) or (w <= 0).any() or not np.isfinite(w).all() or (counts == 0).any():
            raise DataError(f"a weighted sampler needs a positive weight and at least one sample per member (samples "
                            f"per member {counts.tolist()}, weights {w.tolist()})")
        self.weights = w / w.sum()

    def quotas(self) -> np.ndarray:
        """(M,) draws per member in an epoch: weight x size, rounded by largest remainder (ties: the earlier member)."""
        raw = self.weights * self.size
        quotas = np.floor(raw).astype(np.int64)
        order = np.argsort(-(raw - quotas), kind="stable")
        quotas[order[: self.size - int(quotas.sum())]] += 1
        return quotas

    def order(self) -> torch.Tensor:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed % 2**64, self.epoch]))
        draws = []
        for member, quota in enumerate(self.quotas()):
            pool = np.nonzero(self.groups == member)[0]
            repeats, rest = divmod(int(quota), len(pool))
            draws += [rng.permutation(pool) for _ in range(repeats)] + [rng.permutation(pool)[:rest]]
        return torch.from_numpy(rng.permutation(np.concatenate(draws)))


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
