"""Weighted mixtures of LeRobot datasets, read as one dataset (docs/data.md, "Mixtures").

    ds = open_dataset(settings.data, keys)      # DATASET=path_a:0.7,user/b:0.3 (or mix.yaml): a MixtureDataset;
                                                # one dataset: LeRobotDataset.open, exactly as before
    ds.episodes, ds.column("action"), ds.frame_at(key, row), ds.episode_frames(key, e), ds.stats, ds.fingerprint
    split = split_dataset(ds, val_fraction, seed)   # each member split by episode with the seed, then combined

A `MixtureDataset` exposes the part of LeRobotDataset's interface the pipeline reads, so PolicySamples, validation,
offline eval and the closed loop work unchanged: member i's episode e is the mixture's episode
`episode_offsets[i] + e` and its row r the mixture's row `row_offsets[i] + r` (members in DATASET's order).
The members must agree on the keys the run uses (dtype, shape, names) and on fps (`agreement_problems`). Its
statistics are recomputed from the members' concatenated columns (count-weighted, exact, quantiles included); its
fingerprint combines the members' fingerprints and weights (`member_records` is what config.json records).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from functools import cached_property

import numpy as np

from fplus.data import format as fmt
from fplus.data.lerobot import FLOAT_DTYPES, DataKeys, Episode, LeRobotDataset
from fplus.data.split import MemberSplit, Split, split_episodes
from fplus.data.stats import vector_stats
from fplus.errors import DataError

CAMERA_DTYPES = ("video", "image")  # both decode to (H, W, 3) uint8 frames: members may differ in this


class MixtureDataset:
    """Several LeRobot datasets read as one, in order, with their mixture weights.

    Args:
        members: the opened datasets. names: each one as DATASET names it (messages, config.json).
        weights: normalised mixture weights (sum 1). revisions: each one's hub revision (None: main or local).
    """

    repo_id = None  # a mixture is no hub repo (its members may be)

    def __init__(self, members: Sequence[LeRobotDataset], names: Sequence[str], weights: Sequence[float],
                 revisions: Sequence[str | None]):
        if not len(members) == len(names) == len(weights) == len(revisions) or len(members) < 2:
            raise ValueError("a mixture has two or more members, each with a name, weight and revision")
        self.members = list(members)
        self.names = list(names)
        self.weights = tuple(float(w) for w in weights)
        self.revisions = list(revisions)
        self.row_offsets = np.cumsum([0] + [m.num_frames for m in members]).astype(np.int64)
        spans = [max((e.index for e in m.episodes), default=-1) + 1 for m in members]
        self.episode_offsets = np.cumsum([0] + spans).astype(np.int64)
        self.fps = members[0].fps

    def describe(self) -> str:
        """`mixture of 2 datasets: path_a (0.7), user/b (0.3)`."""
        parts = ", ".join(f"{n} ({w:.4g})" for n, w in zip(self.names, self.weights, strict=True))
        return f"mixture of {len(self.members)} datasets: {parts}"

    # ----- metadata ---------------------------------------------------------------------------------------------

    @cached_property
    def features(self) -> dict[str, dict]:
        """The features every member has, as the first member declares them."""
        return {k: f for k, f in self.members[0].features.items() if all(k in m.features for m in self.members)}

    @property
    def keys(self) -> list[str]:
        return [*self.features, fmt.TASK_KEY]

    @property
    def camera_keys(self) -> list[str]:
        return [k for k in self.features if all(m.features[k]["dtype"] in CAMERA_DTYPES for m in self.members)]

    @property
    def video_keys(self) -> list[str]:
        return [k for k in self.features if all(m.features[k]["dtype"] == "video" for m in self.members)]

    @property
    def num_frames(self) -> int:
        return int(self.row_offsets[-1])

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    @cached_property
    def episodes(self) -> list[Episode]:
        """Every member's episodes with the mixture's indices and rows (video spans: the member's files)."""
        return [replace(e, index=e.index + int(eo), start=e.start + int(ro), stop=e.stop + int(ro))
                for m, eo, ro in zip(self.members, self.episode_offsets, self.row_offsets, strict=False)
                for e in m.episodes]

    @cached_property
    def _episode_by_index(self) -> dict[int, Episode]:
        return {e.index: e for e in self.episodes}

    def episode(self, episode_index: int) -> Episode:
        ep = self._episode_by_index.get(episode_index)
        if ep is None:
            raise DataError(f"episode {episode_index} not in the {self.describe()} ({self.num_episodes} episodes)")
        return ep

    def member_of_episode(self, episode_index: int) -> tuple[int, int]:
        """(member, the member's own episode index) of a mixture episode."""
        self.episode(episode_index)
        i = int(np.searchsorted(self.episode_offsets, episode_index, side="right")) - 1
        return i, episode_index - int(self.episode_offsets[i])

    def member_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """(n,) member index of mixture rows (n,)."""
        return np.searchsorted(self.row_offsets, np.asarray(rows, dtype=np.int64), side="right") - 1

    @cached_property
    def tasks(self) -> list[str]:
        """The members' task strings, each once, in order of first appearance."""
        return list(dict.fromkeys(t for m in self.members for t in m.tasks))

    @cached_property
    def _task_maps(self) -> list[np.ndarray]:
        position = {t: i for i, t in enumerate(self.tasks)}
        return [np.array([position[t] for t in m.tasks], dtype=np.int64) for m in self.members]

    # ----- checks -----------------------------------------------------------------------------------------------

    def agreement_problems(self, keys: DataKeys | None) -> list[str]:
        """Every difference between the members on the keys a run uses (dtype, shape, names) and fps: one message
        per dataset, key and property, naming the first dataset's value. Keys a member lacks are not compared
        (`key_problems` names them)."""
        first, name0 = self.members[0], self.names[0]
        problems = [f"{n}: fps {m.fps} where {name0} has {first.fps}"
                    for m, n in zip(self.members[1:], self.names[1:], strict=True) if m.fps != first.fps]
        for setting, key in (keys.named() if keys is not None else {}).items():
            if key == fmt.TASK_KEY or key not in first.features:
                continue
            want = first.features[key]
            for m, n in zip(self.members[1:], self.names[1:], strict=True):
                have = m.features.get(key)
                if have is None:
                    continue
                for prop in ("dtype", "shape", "names"):
                    a, b = have.get(prop), want.get(prop)
                    if prop == "dtype" and a in CAMERA_DTYPES and b in CAMERA_DTYPES:
                        continue
                    if a != b:
                        problems.append(f"{n}: {setting}={key!r} {prop} {a} where {name0} has {b}")
        return problems

    def key_problems(self, keys: DataKeys) -> list[str]:
        """Each member's problems with `keys` (prefixed with its name), then the differences between members."""
        own = [f"{n}: {p}" for m, n in zip(self.members, self.names, strict=True) for p in m.key_problems(keys)]
        return own + self.agreement_problems(keys)

    def validate_keys(self, keys: DataKeys) -> None:
        """Fail listing every problem of `keys` on the members and every difference between them."""
        problems = self.key_problems(keys)
        if problems:
            raise DataError(f"the datasets of the mixture do not fit the keys the run uses or do not agree: "
                            f"{'; '.join(problems)}. Every dataset of a mixture needs those keys with the same "
                            "dtype, shape and names, and the same fps")
        for m in self.members:
            m.validate_keys(keys)  # task strings

    def value_problems(self) -> list[str]:
        return [f"{n}: {p}" for m, n in zip(self.members, self.names, strict=True) for p in m.value_problems()]

    # ----- columns and statistics -------------------------------------------------------------------------------

    def column(self, key: str) -> np.ndarray:
        """A tabular feature of every mixture row: the members' columns concatenated; `index`, `episode_index` and
        `task_index` are the mixture's (rows, offset episodes, positions in `tasks`)."""
        if key == "index":
            return np.arange(self.num_frames, dtype=np.int64)
        parts = [m.column(key) for m in self.members]
        if key == "episode_index":
            parts = [p.astype(np.int64) + int(eo) for p, eo in zip(parts, self.episode_offsets, strict=False)]
        elif key == "task_index":
            parts = [t[p.astype(np.int64)] for p, t in zip(parts, self._task_maps, strict=True)]
        return np.concatenate(parts)

    def instructions(self, key: str = fmt.TASK_KEY) -> np.ndarray:
        """(N,) instruction string of every mixture row."""
        return np.concatenate([np.asarray(m.instructions(key), dtype=object) for m in self.members])

    def episode_of_frames(self) -> np.ndarray:
        return self._episode_of

    @cached_property
    def _episode_of(self) -> np.ndarray:
        return self.column("episode_index")

    @cached_property
    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        """Statistics of every float feature the members share with one shape (fplus.data.stats.vector_stats of
        the concatenated columns): count-weighted and exact, quantiles of the pooled values."""
        out = {}
        for key, feature in self.features.items():
            specs = [m.features[key] for m in self.members]
            if any(f["dtype"] not in FLOAT_DTYPES or list(f["shape"]) != list(feature["shape"]) for f in specs):
                continue
            out[key] = vector_stats(np.concatenate([m.column(key) for m in self.members]))
        return out

    @cached_property
    def fingerprint(self) -> str:
        """A short hash of the members' fingerprints and weights, in order (not their paths: a copy of the same
        data elsewhere has the same fingerprint)."""
        data = [[m.fingerprint, w] for m, w in zip(self.members, self.weights, strict=True)]
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]

    def member_records(self) -> list[dict]:
        """What config.json records of each member (`dataset_members`): name, revision, weight, fingerprint, size."""
        return [{"dataset": n, "revision": r, "weight": w, "fingerprint": m.fingerprint, "episodes": m.num_episodes,
                 "frames": m.num_frames}
                for m, n, w, r in zip(self.members, self.names, self.weights, self.revisions, strict=True)]

    # ----- frames -----------------------------------------------------------------------------------------------

    def episode_frames(self, key: str, episode_index: int) -> np.ndarray:
        """Every frame (T, H, W, 3) uint8 of a mixture episode, from its member."""
        i, local = self.member_of_episode(episode_index)
        return self.members[i].episode_frames(key, local)

    def frame_at(self, key: str, index: int) -> np.ndarray:
        """One frame (H, W, 3) uint8 at a mixture row, decoded alone by its member."""
        if not 0 <= index < self.num_frames:
            raise DataError(f"row {index} not in the {self.describe()} ({self.num_frames} frames)")
        i = int(self.member_of_rows(np.array([index]))[0])
        return self.members[i].frame_at(key, index - int(self.row_offsets[i]))

    def frames(self, key: str, indices: np.ndarray) -> np.ndarray:
        """Frames at mixture rows (n,) -> (n, H, W, 3) uint8, each member decoding its own."""
        indices = np.asarray(indices, dtype=np.int64)
        which = self.member_of_rows(indices)
        out = None
        for i in np.unique(which):
            sel = np.nonzero(which == i)[0]
            frames = self.members[i].frames(key, indices[sel] - self.row_offsets[i])
            if out is None:
                out = np.empty((len(indices), *frames.shape[1:]), dtype=np.uint8)
            out[sel] = frames
        return out if out is not None else np.empty((0, 0, 0, 3), np.uint8)


def open_dataset(data, keys: DataKeys | None = None) -> LeRobotDataset | MixtureDataset:
    """The dataset(s) DATASET names (`data`: a fplus.settings.DataSettings), keys validated when given. One dataset:
    `LeRobotDataset.open(DATASET, keys, revision=DATASET_REVISION)`, as before mixtures; several: a MixtureDataset,
    every member opened first, then every problem of every member and every difference between them in one DataError.
    ConfigError: DATASET unset or malformed."""
    members = data.members()
    if len(members) == 1:
        return LeRobotDataset.open(members[0].source, keys, revision=members[0].revision)
    opened = [LeRobotDataset.open(m.source, revision=m.revision) for m in members]
    mixture = MixtureDataset(opened, [m.source for m in members], [m.weight for m in members],
                             [m.revision for m in members])
    if keys is not None:
        mixture.validate_keys(keys)
    else:
        problems = mixture.agreement_problems(None)
        if problems:
            raise DataError(f"the datasets of the mixture do not agree: {'; '.join(problems)}")
    return mixture


def members_of(ds: LeRobotDataset | MixtureDataset) -> list[LeRobotDataset]:
    """The datasets of `ds`: its members, or itself."""
    return list(ds.members) if isinstance(ds, MixtureDataset) else [ds]


def member_records(ds: LeRobotDataset | MixtureDataset) -> list[dict] | None:
    """`MixtureDataset.member_records`, or None for one dataset."""
    return ds.member_records() if isinstance(ds, MixtureDataset) else None


def dataset_label(ds: LeRobotDataset | MixtureDataset) -> str:
    """How messages name `ds`: its root directory, or the mixture's description."""
    return ds.describe() if isinstance(ds, MixtureDataset) else str(ds.root)


def split_dataset(ds: LeRobotDataset | MixtureDataset, val_fraction: float, seed: int) -> Split:
    """The train/validation split by episode. One dataset: `split_episodes` of its episodes. A mixture: each member
    split by `split_episodes` with the same seed (its split does not depend on the other members), the mixture's
    parts the union in mixture indices, each member's own split in `members`."""
    if not isinstance(ds, MixtureDataset):
        return split_episodes([e.index for e in ds.episodes], val_fraction, seed)
    parts = []
    for m, name, offset in zip(ds.members, ds.names, ds.episode_offsets, strict=False):
        try:
            own = split_episodes([e.index for e in m.episodes], val_fraction, seed)
        except DataError as err:
            raise DataError(f"{name}: {err}") from None
        parts.append(MemberSplit(name, int(offset), own.train, own.val))
    train = tuple(sorted(p.episode_offset + e for p in parts for e in p.train))
    val = tuple(sorted(p.episode_offset + e for p in parts for e in p.val))
    return Split(train, val, seed, val_fraction, tuple(parts))


def check_split(split: Split, ds: LeRobotDataset | MixtureDataset, path) -> None:
    """A saved split must describe `ds`: a mixture's split the same members at the same offsets; one dataset's split
    no members. DataError naming the file otherwise."""
    want = [int(o) for o in ds.episode_offsets[:-1]] if isinstance(ds, MixtureDataset) else []
    if [m.episode_offset for m in split.members] != want:
        what = f"a mixture of {len(split.members)} datasets" if split.members else "one dataset"
        raise DataError(f"{path} splits {what} but the run reads {dataset_label(ds)}; restore the split or the "
                        "dataset, or start the run again")
