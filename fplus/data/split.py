"""Train/validation split by episode (never by frame: neighbouring frames would leak across the split)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fplus.errors import DataError
from fplus.io import read_json, write_text_atomic


@dataclass(frozen=True)
class MemberSplit:
    """The split of one dataset of a mixture: its `dataset` (as DATASET names it), `episode_offset` (its episode i is
    the mixture's episode_offset + i) and its own episode indices of each part, sorted."""

    dataset: str
    episode_offset: int
    train: tuple[int, ...]
    val: tuple[int, ...]


@dataclass(frozen=True)
class Split:
    """Episode indices of each part, sorted; `seed` and `val_fraction` record how it was drawn. For a mixture the
    indices are the mixture's (fplus.data.mixture) and `members` holds each dataset's own split (empty for one
    dataset, whose split.json has no `members`)."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    seed: int
    val_fraction: float
    members: tuple[MemberSplit, ...] = ()

    def save(self, path: Path) -> None:
        """Write the split as JSON, atomically."""
        data = asdict(self)
        if not self.members:
            del data["members"]
        write_text_atomic(path, json.dumps(data, indent=2))

    @classmethod
    def load(cls, path: Path) -> Split:
        """A saved split (an FplusError naming the file when it is missing or damaged)."""
        raw = read_json(path, "the run's train/validation split", "restore it, or start the run again")
        try:
            members = tuple(MemberSplit(str(m["dataset"]), int(m["episode_offset"]),
                                        tuple(int(e) for e in m["train"]), tuple(int(e) for e in m["val"]))
                            for m in raw.get("members", ()))  # absent: one dataset
            return cls(tuple(int(e) for e in raw["train"]), tuple(int(e) for e in raw["val"]), int(raw["seed"]),
                       float(raw["val_fraction"]), members)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path} is not a train/validation split ({type(err).__name__}: {err}); restore it, "
                             "or start the run again") from None


def split_episodes(episode_indices: list[int], val_fraction: float, seed: int) -> Split:
    """Shuffle episodes with `seed` and hold out round(val_fraction * n) of them (at least 1 when val_fraction > 0).

    Fails when the split would leave no training episode.
    """
    episodes = np.array(sorted(set(episode_indices)), dtype=np.int64)
    n = len(episodes)
    n_val = 0 if val_fraction <= 0 else max(1, int(round(val_fraction * n)))
    if n - n_val < 1:
        raise DataError(f"cannot hold out {n_val} of {n} episodes for validation: lower VAL_FRACTION")
    order = np.random.default_rng(seed).permutation(n)
    val = np.sort(episodes[order[:n_val]])
    train = np.sort(episodes[order[n_val:]])
    return Split(tuple(int(i) for i in train), tuple(int(i) for i in val), seed, val_fraction)
