"""Read LeRobot v3.0 datasets (local directory or hub repo id) with pyarrow and PyAV.

    ds = LeRobotDataset.open("outputs/demo/data", keys=DataKeys(image="observation.images.image",
                                                               action="action", instruction="task"))
    ds.episodes[0].length, ds.column("action")          # (N, 7) float32, rows in global `index` order
    ds.episode_frames("observation.images.image", 0)    # (T, H, W, 3) uint8
    ds.instructions()                                   # (N,) instruction string of every frame

Opening reads `meta/` only; a configured key that does not exist fails at once with the keys that do. The frame
table is checked when it is first read: a NaN or inf in a float feature (action, state, any float column) is an
error naming the key, the first bad episode and frame, and the data file (`value_problems` lists them without
raising, for `fplus data info` and `fplus doctor`). Unreadable JSON, parquet or video files are errors naming
the file.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from fplus.data import format as fmt
from fplus.data.hub import resolve_root
from fplus.data.stats import from_jsonable
from fplus.data.v21 import v30_root
from fplus.errors import ConfigError, DataError

FLOAT_DTYPES = ("float16", "float32", "float64")
RESTORE = "restore it from the dataset's source (download or export the dataset again)"
# Columns the reader needs in every data file and in the episodes table.
DATA_INDEX_COLUMNS = ("index", "episode_index", "frame_index", "timestamp", "task_index")
EPISODE_COLUMNS = ("episode_index", "length", "dataset_from_index", "dataset_to_index", "tasks", "data/chunk_index",
                   "data/file_index")


def _read_parquet(path: Path, columns: list[str] | None = None):
    """pq.read_table, with an unreadable file (truncated, not parquet, bad columns) an error naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot be read as parquet ({_first_line(err)}); {RESTORE}") from None


def _read_schema(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot be read as parquet ({_first_line(err)}); {RESTORE}") from None


def _first_line(err: BaseException) -> str:
    """The first line of an error's message, without pyarrow's "Could not open Parquet input source '<path>': "."""
    text = str(err).strip()
    text = re.sub(r"^Could not open Parquet input source '[^']*': ", "", text.splitlines()[0] if text else "")
    return text or type(err).__name__


def _float_rows(col) -> np.ndarray:
    """A float column (pyarrow Array: scalars or lists) as (N,) or (N, D) float; nulls become NaN."""
    import pyarrow as pa

    if not (pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type)):
        return col.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    values = col.flatten().to_numpy(zero_copy_only=False)
    if not col.null_count:
        return values.reshape(len(col), -1)
    valid = ~col.is_null().to_numpy(zero_copy_only=False)
    rows = values.reshape(int(valid.sum()), -1)
    out = np.full((len(col), rows.shape[1]), np.nan)
    out[valid] = rows
    return out


def _episode_list(episodes: np.ndarray, limit: int = 10) -> str:
    listed = ", ".join(map(str, episodes[:limit].tolist()))
    return listed + (f" and {len(episodes) - limit} more" if len(episodes) > limit else "")


@dataclass(frozen=True)
class DataKeys:
    """The dataset keys a consumer needs; None means "not used". Built from `DataSettings` by `keys_from_settings`."""

    image: str | None = None
    wrist_image: str | None = None
    state: str | None = None
    action: str | None = None
    instruction: str | None = None

    def named(self) -> dict[str, str]:
        """{setting name: key} of the keys that are set."""
        names = {"IMAGE_KEY": self.image, "WRIST_IMAGE_KEY": self.wrist_image, "STATE_KEY": self.state,
                 "ACTION_KEY": self.action, "INSTRUCTION_KEY": self.instruction}
        return {name: key for name, key in names.items() if key is not None}


def keys_from_settings(data_settings, require: tuple[str, ...] = ("image", "action", "instruction")) -> DataKeys:
    """DataKeys of a `DataSettings`; a required key that is unset is an error naming its variable."""
    keys = DataKeys(image=data_settings.image_key, wrist_image=data_settings.wrist_image_key,
                    state=data_settings.state_key, action=data_settings.action_key,
                    instruction=data_settings.instruction_key)
    env_names = {"image": "IMAGE_KEY", "wrist_image": "WRIST_IMAGE_KEY", "state": "STATE_KEY",
                 "action": "ACTION_KEY", "instruction": "INSTRUCTION_KEY"}
    unset = [env_names[r] for r in require if getattr(keys, r) is None]
    if unset:
        raise ConfigError(f"{', '.join(unset)} not set: name the dataset keys in a profile, .env or the environment")
    return keys


@dataclass(frozen=True)
class VideoSpan:
    """Where an episode's frames of one camera live: file (chunk, file) and time span [from_ts, to_ts)."""

    chunk_index: int
    file_index: int
    from_ts: float
    to_ts: float


@dataclass(frozen=True)
class Episode:
    """One episode: global frame rows [start, stop), its task strings, data file and video spans."""

    index: int
    length: int
    start: int
    stop: int
    tasks: tuple[str, ...]
    data_file: tuple[int, int]
    videos: dict[str, VideoSpan] = field(default_factory=dict)


class LeRobotDataset:
    """A LeRobot v3.0 dataset opened for reading. Metadata is read eagerly; frame tables and videos lazily."""

    def __init__(self, root: Path, repo_id: str | None = None):
        self.root = root
        self.repo_id = repo_id
        info_path = root / fmt.INFO_PATH
        if not info_path.is_file():
            raise DataError(f"{root} is not a LeRobot dataset: {fmt.INFO_PATH} is missing")
        self.info: dict = fmt.read_json(info_path, RESTORE)
        version = self.info.get("codebase_version")
        if version != fmt.CODEBASE_VERSION:
            raise DataError(f"{root}: codebase_version {version!r}; fplus reads LeRobot {fmt.CODEBASE_VERSION} only")
        for required in ("fps", "features", "data_path", "total_frames", "total_episodes"):
            if required not in self.info:
                raise DataError(f"{info_path}: required field {required!r} is missing; {RESTORE}")
        features = self.info["features"]
        bad = [k for k, f in features.items() if not isinstance(f, dict) or "dtype" not in f or "shape" not in f] \
            if isinstance(features, dict) else None
        if bad is None or bad:
            what = "`features` is not an object" if bad is None else f"feature {bad[0]!r} has no dtype or shape"
            raise DataError(f"{info_path}: {what}; {RESTORE}")
        if not isinstance(self.info["fps"], int | float) or self.info["fps"] <= 0:
            raise DataError(f"{info_path}: fps is {self.info['fps']!r}, expected a positive number; {RESTORE}")
        self.fps: int = self.info["fps"]
        self.features: dict[str, dict] = self.info["features"]
        self._video_cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    @classmethod
    def open(cls, source: str | Path, keys: DataKeys | None = None, revision: str | None = None) -> LeRobotDataset:
        """Open a dataset and validate `keys` against it (and its task strings when the instruction is `task`).
        A LeRobot v2.1 dataset is read through its v3.0 copy, made on the first open (fplus.data.v21)."""
        root, repo_id = resolve_root(source, revision)
        ds = cls(v30_root(root, repo_id), repo_id)
        if keys is not None:
            ds.validate_keys(keys)
        return ds

    # ----- metadata ---------------------------------------------------------------------------------------------

    @property
    def keys(self) -> list[str]:
        """Every key a setting can name: the features plus `task` (the episode's task string)."""
        return [*self.features, fmt.TASK_KEY]

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f["dtype"] == "video"]

    @property
    def camera_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f["dtype"] in ("video", "image")]

    @property
    def num_frames(self) -> int:
        return int(self.info["total_frames"])

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    def validate_keys(self, keys: DataKeys) -> None:
        """Fail with the existing keys if a configured key is missing or of the wrong kind; check instructions."""
        problems = self.key_problems(keys)
        if problems:
            raise DataError("; ".join(problems) + f". Keys in {self.root}: {', '.join(self.keys)}")
        if keys.instruction == fmt.TASK_KEY:
            self.tasks  # noqa: B018 -- reading validates that no task string is empty

    def key_problems(self, keys: DataKeys) -> list[str]:
        """Human-readable problems of `keys` on this dataset (empty when all is well)."""
        problems = []
        for name, key in keys.named().items():
            if key not in self.keys:
                problems.append(f"{name}={key!r} is not in the dataset")
            elif name.endswith("IMAGE_KEY") and key not in self.camera_keys:
                problems.append(f"{name}={key!r} is a {self.features[key]['dtype']} feature, not a camera")
            elif name in ("STATE_KEY", "ACTION_KEY") and self.features[key]["dtype"] not in ("float32", "float64"):
                problems.append(f"{name}={key!r} has dtype {self.features[key]['dtype']}, expected float")
            elif name == "INSTRUCTION_KEY" and key != fmt.TASK_KEY and self.features[key]["dtype"] != "string":
                problems.append(f"{name}={key!r} has dtype {self.features[key]['dtype']}, expected string or `task`")
        return problems

    @cached_property
    def tasks(self) -> list[str]:
        """Task strings by task_index. An empty task string is an error, never a silent empty instruction."""
        path = self.root / fmt.TASKS_PATH
        if not path.is_file():
            raise DataError(f"{path} is missing")
        table = _read_parquet(path)
        names = [c for c in table.column_names if c != "task_index"]
        if "task_index" not in table.column_names or len(names) != 1:
            raise DataError(f"{path}: expected columns task_index and the task string, got {table.column_names}")
        index = table.column("task_index").to_pylist()
        text = table.column(names[0]).to_pylist()
        tasks: list[str | None] = [None] * (max(index) + 1 if index else 0)
        for i, t in zip(index, text, strict=True):
            tasks[i] = t
        empty = [i for i, t in enumerate(tasks) if t is None or not str(t).strip()]
        if empty:
            raise DataError(f"{path}: task_index {empty} has an empty instruction; fix the dataset (an empty "
                             "instruction would silently train a task-blind policy)")
        return [str(t) for t in tasks]

    @cached_property
    def episodes(self) -> list[Episode]:
        """Episodes in episode_index order, with their frame rows and video spans."""
        paths = sorted((self.root / fmt.EPISODES_DIR).glob("chunk-*/file-*.parquet"))
        if not paths:
            raise DataError(f"{self.root / fmt.EPISODES_DIR} holds no episode parquet files")
        rows = []
        for p in paths:
            columns = [c for c in _read_schema(p).names if not c.startswith("stats/")]
            needed = [*EPISODE_COLUMNS] + [f"videos/{key}/{name}" for key in self.video_keys
                                           for name in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
            missing = [c for c in needed if c not in columns]
            if missing:
                raise DataError(f"{p}: column {missing[0]!r} is missing ({len(missing)} missing in all); {RESTORE}")
            table = _read_parquet(p, columns=columns)
            if any(table.column(c).null_count for c in needed):
                column = next(c for c in needed if table.column(c).null_count)
                raise DataError(f"{p}: column {column!r} has empty (null) cells; {RESTORE}")
            rows += table.to_pylist()
        rows.sort(key=lambda r: r["episode_index"])
        episodes = []
        for r in rows:
            videos = {
                key: VideoSpan(r[f"videos/{key}/chunk_index"], r[f"videos/{key}/file_index"],
                               float(r[f"videos/{key}/from_timestamp"]), float(r[f"videos/{key}/to_timestamp"]))
                for key in self.video_keys
            }
            episodes.append(Episode(
                index=int(r["episode_index"]), length=int(r["length"]),
                start=int(r["dataset_from_index"]), stop=int(r["dataset_to_index"]),
                tasks=tuple(r["tasks"]), data_file=(int(r["data/chunk_index"]), int(r["data/file_index"])),
                videos=videos,
            ))
        total = sum(e.length for e in episodes)
        if total != self.num_frames:
            raise DataError(f"{self.root}: episodes hold {total} frames but info.json says {self.num_frames}")
        return episodes

    def episode(self, episode_index: int) -> Episode:
        ep = self._episode_by_index.get(episode_index)
        if ep is None:
            raise DataError(f"episode {episode_index} not in {self.root} ({self.num_episodes} episodes)")
        return ep

    @cached_property
    def _episode_by_index(self) -> dict[int, Episode]:
        return {e.index: e for e in self.episodes}

    @cached_property
    def _raw_stats(self) -> dict[str, dict[str, np.ndarray]]:
        path = self.root / fmt.STATS_PATH
        if not path.is_file():
            return {}
        raw = fmt.read_json(path, RESTORE)
        bad = [k for k, v in raw.items() if not isinstance(v, dict)]
        if bad:
            raise DataError(f"{path}: the statistics of {bad[0]!r} are not an object; {RESTORE}")
        return from_jsonable(raw)

    @property
    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        """Per-feature statistics from meta/stats.json ({} when the file is absent); a NaN/inf in the statistics
        of a float feature is an error (it would normalise every action or state to NaN)."""
        problems = self._stats_problems
        if problems:
            raise DataError("; ".join(problems))
        return self._raw_stats

    @cached_property
    def _stats_problems(self) -> list[str]:
        path = self.root / fmt.STATS_PATH
        problems = []
        for key, stats in self._raw_stats.items():
            if key not in self.features or self.features[key]["dtype"] not in FLOAT_DTYPES:
                continue
            for name, value in stats.items():
                try:
                    finite = np.isfinite(np.asarray(value, dtype=np.float64)).all()
                except (TypeError, ValueError):
                    problems.append(f"{path}: {key}/{name} is not an array of numbers; {RESTORE}")
                    continue
                if not finite:
                    problems.append(f"{path}: {key}/{name} holds non-finite values (NaN/inf); fix the {key} values "
                                    "of the dataset, then compute its statistics again")
        return problems

    @cached_property
    def fingerprint(self) -> str:
        """A short hash of the metadata and the data/video file sizes: changes when the dataset's content changes."""
        h = hashlib.sha256()
        h.update((self.root / fmt.INFO_PATH).read_bytes())
        for p in sorted(self.root.glob("meta/episodes/*/*.parquet")) + sorted(self.root.glob("meta/tasks.parquet")):
            h.update(p.read_bytes())
        for p in sorted(self.root.glob("data/*/*.parquet")) + sorted(self.root.glob("videos/**/*.mp4")):
            h.update(f"{p.relative_to(self.root)}:{p.stat().st_size}".encode())
        return h.hexdigest()[:16]

    # ----- frame table ------------------------------------------------------------------------------------------

    @property
    def table(self):
        """The frame table (pyarrow.Table) of the non-video columns, sorted by global `index`.

        Raises:
            DataError: a float column holds NaN or inf (see `value_problems`).
        """
        problems = self._data_problems
        if problems:
            raise DataError("; ".join(problems))
        return self._frame_table

    def value_problems(self) -> list[str]:
        """Non-finite values in the float columns of the frame table and in the statistics of float features,
        one message per key (empty when all is well). Reads the data files; raises only when they cannot be read."""
        return self._data_problems + self._stats_problems

    @cached_property
    def _data_problems(self) -> list[str]:
        """One message per float column holding NaN/inf: count, first episode / frame / global index, data file."""
        table = self._frame_table
        problems = []
        episode_of = frame_of = None
        for key, ft in self.features.items():
            if ft["dtype"] not in FLOAT_DTYPES or key not in table.column_names:
                continue
            try:
                values = _float_rows(table.column(key).combine_chunks())
            except ValueError:
                problems.append(f"{self.root}: rows of {key} have different lengths; {RESTORE}")
                continue
            bad = ~np.isfinite(values)
            count = int(bad.sum())
            if not count:
                continue
            rows = bad.reshape(len(bad), -1).any(axis=1)
            if episode_of is None:
                episode_of = table.column("episode_index").to_numpy()
                frame_of = table.column("frame_index").to_numpy()
            first = int(np.argmax(rows))
            episodes = np.unique(episode_of[rows])
            ep = self.episode(int(episode_of[first]))
            data_file = self.info["data_path"].format(chunk_index=ep.data_file[0], file_index=ep.data_file[1])
            which = "that episode" if len(episodes) == 1 else f"episodes {_episode_list(episodes)}"
            problems.append(
                f"{self.root}: {key} has {count} non-finite value{'s' if count > 1 else ''} (NaN/inf) in "
                f"{len(episodes)} episode{'s' if len(episodes) > 1 else ''}, first at episode {ep.index} frame "
                f"{int(frame_of[first])} (global index {first}, {data_file}); fix or drop {which}")
        return problems

    @cached_property
    def _frame_table(self):
        """The frame table as read, sorted by `index`, with its index column checked (values not checked)."""
        import pyarrow as pa

        files = sorted({e.data_file for e in self.episodes})
        tables = []
        for chunk, file in files:
            path = self.root / self.info["data_path"].format(chunk_index=chunk, file_index=file)
            if not path.is_file():
                raise DataError(f"data file missing: {path}; {RESTORE}")
            table = _read_parquet(path)
            missing = [c for c in DATA_INDEX_COLUMNS if c not in table.column_names]
            if missing:
                raise DataError(f"{path}: column {missing[0]!r} is missing; {RESTORE}")
            tables.append(table)
        try:
            table = pa.concat_tables(tables, promote_options="default")
        except pa.ArrowException as err:
            raise DataError(f"{self.root}: the data files do not share one schema ({_first_line(err)}); "
                             f"{RESTORE}") from None
        table = table.sort_by("index")
        if table.num_rows != self.num_frames:
            raise DataError(f"{self.root}: data files hold {table.num_rows} rows but info.json says {self.num_frames}")
        index = table.column("index").to_numpy(zero_copy_only=False)
        if not np.array_equal(index, np.arange(self.num_frames)):
            raise DataError(f"{self.root}: the `index` column is not 0..{self.num_frames - 1}")
        return table

    def column(self, key: str) -> np.ndarray:
        """A tabular feature for every frame: (N,) for scalars, (N, D) for vectors, in `index` order."""
        if key not in self.features or self.features[key]["dtype"] in ("video", "image"):
            raise DataError(f"{key!r} is not a tabular feature; tabular keys: "
                             f"{', '.join(k for k in self.features if k not in self.camera_keys)}")
        col = self.table.column(key).combine_chunks()
        import pyarrow as pa

        if pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type):
            values = col.flatten().to_numpy(zero_copy_only=False)
            return values.reshape(len(col), -1)
        return col.to_numpy(zero_copy_only=False)

    def instructions(self, key: str = fmt.TASK_KEY) -> np.ndarray:
        """(N,) instruction string of every frame, from the task table (`task`) or a string column."""
        if key == fmt.TASK_KEY:
            tasks = np.asarray(self.tasks, dtype=object)
            return tasks[self.column("task_index")]
        values = self.column(key)
        empty = [i for i, v in enumerate(values) if v is None or not str(v).strip()]
        if empty:
            raise DataError(f"{key!r} is empty at frames {empty[:10]}{'...' if len(empty) > 10 else ''}")
        return values

    def episode_of_frames(self) -> np.ndarray:
        """(N,) episode_index of every frame."""
        return self.column("episode_index")

    # ----- frames -----------------------------------------------------------------------------------------------

    def episode_frames(self, key: str, episode_index: int) -> np.ndarray:
        """Every frame of one episode from a camera: (T, H, W, 3) uint8, T = episode length.

        Video frames are matched to the parquet timestamps (from_timestamp + timestamp), as lerobot does;
        a small LRU cache keeps the last decoded episodes.
        """
        cache_key = (key, episode_index)
        if cache_key in self._video_cache:
            self._video_cache.move_to_end(cache_key)
            return self._video_cache[cache_key]
        ep = self.episode(episode_index)
        if key not in self.camera_keys:
            raise DataError(f"{key!r} is not a camera; cameras: {', '.join(self.camera_keys)}")
        timestamps = self.column("timestamp")[ep.start:ep.stop].astype(np.float64)
        if self.features[key]["dtype"] == "image":
            frames = self._decode_images(key, ep)
        else:
            from fplus.data.video import align_frames, decode_span

            span = ep.videos[key]
            path = self.root / self.info["video_path"].format(
                video_key=key, chunk_index=span.chunk_index, file_index=span.file_index)
            where = f"camera {key}, episode {episode_index}"
            decoded, times = decode_span(path, span.from_ts, span.to_ts, self.fps, where=where)
            frames = align_frames(decoded, times, span.from_ts + timestamps, self.fps, where=f"{path} ({where})")
        self._video_cache[cache_key] = frames
        if len(self._video_cache) > 8:
            self._video_cache.popitem(last=False)
        return frames

    def _decode_images(self, key: str, ep: Episode) -> np.ndarray:
        import io

        from PIL import Image

        cells = self.table.column(key).slice(ep.start, ep.length).to_pylist()
        frames = []
        for i, cell in enumerate(cells):
            try:
                frames.append(np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB")))
            except (OSError, TypeError, ValueError) as err:
                data_file = self.info["data_path"].format(chunk_index=ep.data_file[0], file_index=ep.data_file[1])
                raise DataError(f"{self.root / data_file}: the image of {key} at episode {ep.index} frame {i} "
                                 f"cannot be decoded ({_first_line(err)}); {RESTORE}") from None
        return np.stack(frames)

    def frame_at(self, key: str, index: int) -> np.ndarray:
        """One frame (H, W, 3) uint8 at a global index, decoded alone (seek + a few frames, or the next frames
        without a seek when the last frame decoded from that file came just before): for random access where
        decoding whole episodes would be wasted work. The array may be shared: do not write to it."""
        if self.features[key]["dtype"] == "image":
            return self.frames(key, np.array([index]))[0]
        from fplus.data.video import VideoReader

        if not hasattr(self, "_reader"):
            self._reader = VideoReader()
        episode_of, times = self._frame_times
        ep = self.episode(int(episode_of[index]))
        span = ep.videos[key]
        path = self.root / self.info["video_path"].format(video_key=key, chunk_index=span.chunk_index,
                                                          file_index=span.file_index)
        return self._reader.frame_at(path, span.from_ts + float(times[index]), self.fps,
                                     where=f"camera {key}, episode {ep.index}")

    @cached_property
    def _frame_times(self) -> tuple[np.ndarray, np.ndarray]:
        """(N,) episode_index and (N,) timestamp of every frame, read once for `frame_at`."""
        return self.episode_of_frames(), self.column("timestamp").astype(np.float64)

    def frames(self, key: str, indices: np.ndarray) -> np.ndarray:
        """Frames at global indices (n,) -> (n, H, W, 3) uint8, decoding each touched episode once."""
        indices = np.asarray(indices, dtype=np.int64)
        episode_of = self.episode_of_frames()[indices]
        out = None
        for episode_index in np.unique(episode_of):
            ep = self.episode(int(episode_index))
            frames = self.episode_frames(key, ep.index)
            sel = np.nonzero(episode_of == episode_index)[0]
            if out is None:
                out = np.empty((len(indices), *frames.shape[1:]), dtype=np.uint8)
            out[sel] = frames[indices[sel] - ep.start]
        return out if out is not None else np.empty((0, 0, 0, 3), np.uint8)
