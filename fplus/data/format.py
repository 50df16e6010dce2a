"""Constants and small helpers of the LeRobot v3.0 on-disk layout, shared by the reader and the writer.

Layout (all paths relative to the dataset root):
    meta/info.json                         codebase_version, fps, features, totals, path templates
    meta/stats.json                        per-feature statistics
    meta/tasks.parquet                     task_index column, the task string as pandas index
    meta/episodes/chunk-XXX/file-XXX.parquet   one row per episode: length, data/video file and span, stats/*
    data/chunk-XXX/file-XXX.parquet        one row per frame
    videos/<key>/chunk-XXX/file-XXX.mp4    frames of many episodes, concatenated in time
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

from fplus.errors import DataError

CODEBASE_VERSION = "v3.0"
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = EPISODES_DIR + "/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
CHUNKS_SIZE = 1000
DATA_FILES_SIZE_IN_MB = 100
VIDEO_FILES_SIZE_IN_MB = 200

# Columns every frame has, added by the writer.
INDEX_FEATURES: dict[str, dict] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
# The key an instruction can be read from when it is not a column: the episode's task string.
TASK_KEY = "task"


def next_file(chunk_index: int, file_index: int, chunks_size: int = CHUNKS_SIZE) -> tuple[int, int]:
    """The (chunk, file) after the given one: files roll over into a new chunk after `chunks_size`."""
    file_index += 1
    if file_index >= chunks_size:
        return chunk_index + 1, 0
    return chunk_index, file_index


def hf_features_metadata(features: dict[str, dict]) -> bytes:
    """The `huggingface` parquet schema metadata that the `datasets` library writes for these features."""
    out = {}
    for key, ft in features.items():
        if ft["dtype"] in ("video",):
            continue
        if ft["dtype"] == "image":
            out[key] = {"_type": "Image"}
        elif ft["dtype"] == "string":
            out[key] = {"dtype": "string", "_type": "Value"}
        elif list(ft["shape"]) == [1]:
            out[key] = {"dtype": ft["dtype"], "_type": "Value"}
        elif len(ft["shape"]) == 1:
            out[key] = {"feature": {"dtype": ft["dtype"], "_type": "Value"}, "length": ft["shape"][0], "_type": "List"}
        else:
            raise ValueError(f"{key}: arrays of rank {len(ft['shape'])} are not supported in the data table")
    return json.dumps({"info": {"features": out}}).encode()


def tasks_pandas_metadata(pyarrow_version: str) -> bytes:
    """Pandas metadata making `pd.read_parquet(meta/tasks.parquet)` return the task strings as the index."""
    meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [
            {"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
             "metadata": {"encoding": "UTF-8"}}
        ],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode", "numpy_type": "object",
             "metadata": None},
        ],
        "attributes": {},
        "creator": {"library": "pyarrow", "version": pyarrow_version},
        "pandas_version": "2.2.3",
    }
    return json.dumps(meta).encode()


# ----- reading and writing files with errors that name the file -----------------------------------------------------


def read_json(path: Path, fix: str) -> dict:
    """A JSON object from `path`; unreadable, non-UTF-8, invalid or truncated JSON is an FplusError naming the file,
    the line and column, and `fix` (what to do)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror}); {fix}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at line {line} column {column}); "
                         f"{fix}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        ends_early = err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string")
        kind = "truncated JSON (the file ends early)" if ends_early else f"invalid JSON ({err.msg})"
        raise DataError(f"{path}: {kind} at line {err.lineno} column {err.colno}; {fix}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got a {type(data).__name__}; {fix}")
    return data


def is_disk_full(err: BaseException) -> bool:
    """Whether an exception (OSError, or a pyarrow / PyAV error carrying one) means "no space left on device"."""
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(err)


def free_space(path: Path) -> str:
    """ "1.2 GiB left on that disk" for the file system holding `path` (or its nearest existing parent)."""
    probe = Path(path).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "free space unknown"
    return f"{human_bytes(free)} left on that disk"


def human_bytes(n: float) -> str:
    """ "512 B", "3.4 MiB", "1.2 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
