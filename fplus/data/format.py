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

import json

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
