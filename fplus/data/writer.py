"""Write LeRobot v3.0 datasets (parquet + H.264 MP4 through PyAV) that the lerobot library reads unchanged.

    w = LeRobotWriter(root, fps=10, features={...})
    w.add_episode(task="push the puck to the goal", frames={"observation.images.image": (T,H,W,3) uint8,
                                                              "observation.state": (T,4), "action": (T,4)})
    w.finalize()

Episodes are appended to the current data/video file until it exceeds its size limit, then a new file starts,
as the lerobot recorder does. The dataset is written into `<root>.partial` and renamed to `root` by `finalize`,
so an interrupted write never leaves something that looks like a finished dataset; a full disk removes the
partial dataset and says which file it was writing and how much space is left. Non-finite float values are
refused when an episode is added.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fplus.data import format as fmt
from fplus.data.stats import image_pixel_sample, image_stats, to_jsonable, vector_stats
from fplus.data.video import VideoEncoder
from fplus.errors import DataError

_ARROW_TYPES = {"float32": pa.float32(), "float64": pa.float64(), "int64": pa.int64(), "int32": pa.int32(),
                "bool": pa.bool_(), "string": pa.string()}


class LeRobotWriter:
    """Streaming writer of one LeRobot v3.0 dataset.

    Args:
        root: the dataset directory to create.
        fps: frames per second of every episode (timestamps are frame_index / fps).
        features: the recorded features (not the index columns, which are added):
            video: {"dtype": "video", "shape": [H, W, 3], "names": ["height", "width", "channels"]};
            vectors: {"dtype": "float32", "shape": [D], "names": [...]}; strings: {"dtype": "string", "shape": [1]}.
        robot_type: free text stored in info.json.
        overwrite: replace an existing `root` (otherwise an existing dataset is an error).
    """

    def __init__(self, root: Path, fps: int, features: dict[str, dict], robot_type: str | None = None,
                 overwrite: bool = False):
        self.root = Path(root)
        if self.root.exists() and not overwrite:
            raise DataError(f"{self.root} already exists; pass overwrite=True (--overwrite) to replace it")
        clash = set(features) & set(fmt.INDEX_FEATURES)
        if clash:
            raise DataError(f"features {sorted(clash)} are written by the writer itself; remove them")
        for key, ft in features.items():
            if ft["dtype"] not in (*_ARROW_TYPES, "video"):
                raise DataError(f"{key}: unsupported dtype {ft['dtype']!r}")
        self.fps = fps
        self.robot_type = robot_type
        self.features = {k: dict(v, shape=list(v["shape"])) for k, v in features.items()}
        self.video_keys = [k for k, f in features.items() if f["dtype"] == "video"]
        self.table_keys = [k for k, f in features.items() if f["dtype"] != "video"]
        for key in self.video_keys:
            h, w, c = self.features[key]["shape"]
            self.features[key]["info"] = {
                "video.height": h, "video.width": w, "video.codec": "h264", "video.pix_fmt": "yuv420p",
                "video.is_depth_map": False, "video.fps": fps, "video.channels": c, "has_audio": False,
            }
        self.all_features = {**self.features, **fmt.INDEX_FEATURES}

        self.tasks: dict[str, int] = {}
        self.episodes: list[dict] = []
        self.total_frames = 0
        self._data_file = (0, 0)
        self._data_writer: pq.ParquetWriter | None = None
        self._schema = self._arrow_schema()
        self._video_file = {k: (0, 0) for k in self.video_keys}
        self._encoders: dict[str, VideoEncoder] = {}
        self._pixels: dict[str, list[np.ndarray]] = {k: [] for k in self.video_keys}
        self._columns: dict[str, list[np.ndarray]] = {  # numeric columns, for the dataset statistics
            k: [] for k, f in self.all_features.items() if f["dtype"] not in ("video", "string")}
        self.tmp = self.root.with_name(self.root.name + ".partial")
        if self.tmp.exists():  # left by a killed writer
            shutil.rmtree(self.tmp)
        self._writing: Path = self.tmp
        with self._disk_full_guard():
            self.tmp.mkdir(parents=True)

    def _arrow_schema(self) -> pa.Schema:
        fields = []
        for key in [*self.table_keys, *fmt.INDEX_FEATURES]:
            ft = self.all_features[key]
            base = _ARROW_TYPES[ft["dtype"]]
            if ft["dtype"] == "string" or list(ft["shape"]) == [1]:
                fields.append(pa.field(key, base))
            else:
                fields.append(pa.field(key, pa.list_(base, ft["shape"][0])))
        return pa.schema(fields, metadata={b"huggingface": fmt.hf_features_metadata(self.all_features)})

    @contextmanager
    def _disk_full_guard(self) -> Iterator[None]:
        """A full disk while writing: drop the partial dataset and raise an FplusError naming the file."""
        try:
            yield
        except Exception as err:
            if not fmt.is_disk_full(err):
                raise
            where = self._writing
            self.abort()
            raise DataError(f"disk full while writing {where} ({fmt.free_space(self.tmp.parent)}); the partial "
                             f"dataset {self.tmp} was removed and {self.root} is unchanged: free space (or write "
                             "elsewhere) and run again") from None

    def add_episode(self, task: str, frames: dict[str, np.ndarray]) -> int:
        """Append one episode; returns its episode_index. `frames[key]` is (T, *shape) for every feature.

        Raises:
            FplusError: keys, lengths or shapes do not match the features; a float value is NaN or inf; the disk
                is full (the partial dataset is removed).
        """
        if not isinstance(task, str) or not task.strip():
            raise DataError("an episode needs a non-empty task (instruction) string")
        missing = set(self.features) - set(frames)
        extra = set(frames) - set(self.features)
        if missing or extra:
            raise DataError(f"episode keys differ from the features: missing {sorted(missing)}, extra {sorted(extra)}")
        lengths = {k: len(v) for k, v in frames.items()}
        length = next(iter(lengths.values()))
        if length == 0 or any(n != length for n in lengths.values()):
            raise DataError(f"every feature of an episode needs the same non-zero length, got {lengths}")
        for key in self.table_keys:
            ft = self.features[key]
            if ft["dtype"] != "string" and tuple(np.shape(frames[key])[1:]) not in (tuple(ft["shape"]), ()):
                raise DataError(f"{key}: expected (T, {ft['shape']}), got {np.shape(frames[key])}")

        episode_index = len(self.episodes)
        task_index = self.tasks.setdefault(task, len(self.tasks))
        start = self.total_frames
        frame_index = np.arange(length, dtype=np.int64)
        columns = {
            "timestamp": (frame_index / self.fps).astype(np.float32),
            "frame_index": frame_index,
            "episode_index": np.full(length, episode_index, dtype=np.int64),
            "index": np.arange(start, start + length, dtype=np.int64),
            "task_index": np.full(length, task_index, dtype=np.int64),
        }
        for key in self.table_keys:
            dtype = self.features[key]["dtype"]
            columns[key] = np.asarray(frames[key]) if dtype == "string" else np.asarray(frames[key], dtype=dtype)
            if dtype.startswith("float"):
                bad = ~np.isfinite(columns[key].reshape(length, -1))
                if bad.any():
                    raise DataError(
                        f"{key} of episode {episode_index} ({task!r}) has {int(bad.sum())} non-finite values "
                        f"(NaN/inf), first at frame {int(np.argmax(bad.any(axis=1)))}; fix the recording (a dataset "
                        "with NaN trains NaN weights)")

        episode: dict = {"episode_index": episode_index, "tasks": [task], "length": length}
        with self._disk_full_guard():
            episode.update(self._write_table(columns, length))
            episode["dataset_from_index"] = start
            episode["dataset_to_index"] = start + length
            for key in self.video_keys:
                episode.update(self._write_video(key, np.asarray(frames[key])))
        stats = {}
        for key in self.video_keys:
            pixels = image_pixel_sample(np.asarray(frames[key]))
            self._pixels[key].append(pixels)
            stats[key] = image_stats(pixels, length)
        for key, values in columns.items():
            if self.all_features[key]["dtype"] != "string":
                self._columns[key].append(values)
                stats[key] = vector_stats(values)
        for key, s in stats.items():
            for name, value in s.items():
                episode[f"stats/{key}/{name}"] = value.tolist()
        self.episodes.append(episode)
        self.total_frames += length
        return episode_index

    def _write_table(self, columns: dict[str, np.ndarray], length: int) -> dict:
        arrays = []
        for field in self._schema:
            values = columns[field.name]
            if pa.types.is_fixed_size_list(field.type):
                flat = pa.array(values.reshape(-1), type=field.type.value_type)
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, field.type.list_size))
            else:
                arrays.append(pa.array(values.reshape(length) if values.ndim > 1 else values, type=field.type))
        table = pa.Table.from_arrays(arrays, schema=self._schema)
        path = self.tmp / fmt.DATA_PATH.format(chunk_index=self._data_file[0], file_index=self._data_file[1])
        if self._data_writer is not None and path.stat().st_size > fmt.DATA_FILES_SIZE_IN_MB * 2**20:
            self._data_writer.close()
            self._data_writer = None
            self._data_file = fmt.next_file(*self._data_file)
            path = self.tmp / fmt.DATA_PATH.format(chunk_index=self._data_file[0], file_index=self._data_file[1])
        self._writing = path
        if self._data_writer is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._data_writer = pq.ParquetWriter(str(path), self._schema, compression="snappy")
        self._data_writer.write_table(table)  # one row group per episode
        return {"data/chunk_index": self._data_file[0], "data/file_index": self._data_file[1]}

    def _write_video(self, key: str, frames: np.ndarray) -> dict:
        h, w, c = self.features[key]["shape"]
        if frames.shape[1:] != (h, w, c) or frames.dtype != np.uint8:
            raise DataError(f"{key}: expected frames (T, {h}, {w}, {c}) uint8, got {frames.shape} {frames.dtype}")
        encoder = self._encoders.get(key)
        if encoder is not None and encoder.size_bytes() > fmt.VIDEO_FILES_SIZE_IN_MB * 2**20:
            encoder.close()
            encoder = None
            self._video_file[key] = fmt.next_file(*self._video_file[key])
        if encoder is None:
            chunk, file = self._video_file[key]
            path = self.tmp / fmt.VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file)
            self._writing = path
            encoder = self._encoders[key] = VideoEncoder(path, self.fps, h, w)
        self._writing = encoder.path
        from_ts = encoder.frames_written / self.fps
        encoder.write(frames)
        prefix = f"videos/{key}/"
        return {
            prefix + "chunk_index": self._video_file[key][0],
            prefix + "file_index": self._video_file[key][1],
            prefix + "from_timestamp": from_ts,
            prefix + "to_timestamp": encoder.frames_written / self.fps,
        }

    def finalize(self) -> Path:
        """Close the files, write the metadata and move the dataset into place. Returns the dataset root.

        An existing `root` (overwrite) is replaced only once the new dataset is complete.
        """
        if not self.episodes:
            raise DataError("no episodes were added; refusing to write an empty dataset")
        with self._disk_full_guard():
            self._finish_files()
        if self.root.exists():
            old = self.root.with_name(self.root.name + ".replaced")
            if old.exists():
                shutil.rmtree(old)
            self.root.rename(old)
            self.tmp.rename(self.root)
            shutil.rmtree(old)
        else:
            self.tmp.rename(self.root)
        return self.root

    def _finish_files(self) -> None:
        if self._data_writer is not None:
            self._writing = Path(self._data_writer.where)
            writer, self._data_writer = self._data_writer, None
            writer.close()
        while self._encoders:
            key, encoder = next(iter(self._encoders.items()))
            self._writing = encoder.path
            del self._encoders[key]
            encoder.close()
        self._write_tasks()
        self._write_episodes()
        stats = {key: image_stats(np.concatenate(px), self.total_frames) for key, px in self._pixels.items()}
        stats.update({key: vector_stats(np.concatenate(v)) for key, v in self._columns.items()})
        self._writing = self.tmp / fmt.STATS_PATH
        self._writing.write_text(json.dumps(to_jsonable(stats), indent=4))
        info = {
            "codebase_version": fmt.CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": len(self.episodes),
            "total_frames": self.total_frames,
            "total_tasks": len(self.tasks),
            "chunks_size": fmt.CHUNKS_SIZE,
            "data_files_size_in_mb": fmt.DATA_FILES_SIZE_IN_MB,
            "video_files_size_in_mb": fmt.VIDEO_FILES_SIZE_IN_MB,
            "fps": self.fps,
            "splits": {"train": f"0:{len(self.episodes)}"},
            "data_path": fmt.DATA_PATH,
            "video_path": fmt.VIDEO_PATH if self.video_keys else None,
            "features": self.all_features,
        }
        self._writing = self.tmp / fmt.INFO_PATH
        self._writing.write_text(json.dumps(info, indent=4))  # last: a dataset without it is not a dataset

    def _write_tasks(self) -> None:
        table = pa.table({
            "task_index": pa.array(list(self.tasks.values()), pa.int64()),
            "__index_level_0__": pa.array(list(self.tasks), pa.string()),
        })
        table = table.replace_schema_metadata({b"pandas": fmt.tasks_pandas_metadata(pa.__version__)})
        path = self._writing = self.tmp / fmt.TASKS_PATH
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)

    def _write_episodes(self) -> None:
        rows = [dict(ep, **{"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}) for ep in self.episodes]
        table = pa.Table.from_pylist(rows)
        path = self._writing = self.tmp / fmt.EPISODES_PATH.format(chunk_index=0, file_index=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)

    def abort(self) -> None:
        """Drop a partial write (e.g. after an exception or an interrupt); the target `root` is left untouched.
        Safe to call more than once, and after a failed write (closing errors are ignored: the files go anyway)."""
        closers = [self._data_writer.close] if self._data_writer is not None else []
        closers += [encoder.close for encoder in self._encoders.values()]
        self._data_writer, self._encoders = None, {}
        for close in closers:
            try:
                close()
            except Exception:  # noqa: BLE001,S110 -- the partial files are deleted next
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)
