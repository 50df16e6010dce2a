"""Round trip: what fplus writes, fplus reads back exactly (tabular) or within codec error (video)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from fplus.data.lerobot import DataKeys, LeRobotDataset
from fplus.data.writer import LeRobotWriter
from fplus.errors import FplusError

FEATURES = {
    "observation.images.cam": {"dtype": "video", "shape": [32, 48, 3], "names": ["height", "width", "channels"]},
    "observation.state": {"dtype": "float32", "shape": [3], "names": ["x", "y", "z"]},
    "action": {"dtype": "float32", "shape": [2], "names": ["a", "b"]},
}
LENGTHS = [7, 12, 5]
TASKS = ["push the block", "open the drawer", "push the block"]


def coloured(episode: int, length: int) -> np.ndarray:
    frames = np.zeros((length, 32, 48, 3), np.uint8)
    frames[..., 0] = (np.arange(length) * 16 % 256)[:, None, None]
    frames[..., 1] = episode * 70
    frames[..., 2] = 200
    return frames


def write(root, overwrite=False):
    w = LeRobotWriter(root, fps=15, features=FEATURES, robot_type="sawyer", overwrite=overwrite)
    rng = np.random.default_rng(0)
    for e, (n, task) in enumerate(zip(LENGTHS, TASKS, strict=True)):
        w.add_episode(task, {"observation.images.cam": coloured(e, n),
                             "observation.state": rng.normal(size=(n, 3)).astype(np.float32),
                             "action": np.stack([np.arange(n), np.full(n, e)], 1).astype(np.float32)})
    return w.finalize()


def test_round_trip(tmp_path):
    root = write(tmp_path / "ds")
    ds = LeRobotDataset.open(root, DataKeys(image="observation.images.cam", state="observation.state",
                                            action="action", instruction="task"))
    assert (ds.num_episodes, ds.num_frames, ds.fps) == (3, 24, 15)
    assert ds.tasks == ["push the block", "open the drawer"]
    assert list(ds.column("task_index")) == [0] * 7 + [1] * 12 + [0] * 5
    np.testing.assert_array_equal(ds.column("action")[7:19, 0], np.arange(12))
    np.testing.assert_array_equal(ds.column("index"), np.arange(24))
    np.testing.assert_allclose(ds.column("timestamp")[7:10], [0, 1 / 15, 2 / 15], atol=1e-6)
    for e, n in enumerate(LENGTHS):
        frames = ds.episode_frames("observation.images.cam", e)
        assert frames.shape == (n, 32, 48, 3)
        mean = frames.reshape(n, -1, 3).mean(1)
        assert np.abs(mean - coloured(e, n)[:, 0, 0]).max() <= 4


def test_layout_and_metadata_follow_lerobot_v30(tmp_path, libero_fixture):
    root = write(tmp_path / "ds")
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (3, 24, 2)
    assert (info["fps"], info["robot_type"], info["splits"]) == (15, "sawyer", {"train": "0:3"})
    # the layout fields as the lerobot library itself writes them (its dataset in the shared fixtures)
    lerobot = json.loads((libero_fixture / "meta/info.json").read_text())
    for field in ("chunks_size", "data_files_size_in_mb", "video_files_size_in_mb", "data_path", "video_path"):
        assert info[field] == lerobot[field], field
    assert info["features"]["observation.images.cam"]["info"] == {
        "video.height": 32, "video.width": 48, "video.codec": "h264", "video.pix_fmt": "yuv420p",
        "video.is_depth_map": False, "video.fps": 15, "video.channels": 3, "has_audio": False}
    assert set(info["features"]) >= {"timestamp", "frame_index", "episode_index", "index", "task_index"}
    # the one video file holds every frame of the three episodes, at the dataset's size and rate
    import av

    video = root / info["video_path"].format(video_key="observation.images.cam", chunk_index=0, file_index=0)
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height, stream.average_rate) == ("h264", 48, 32, 15)
        assert sum(1 for _ in container.decode(video=0)) == sum(LENGTHS) == 24
    episodes = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["videos/observation.images.cam/from_timestamp"] for e in episodes] == pytest.approx([0, 7 / 15, 19 / 15])
    assert episodes[1]["stats/action/max"] == [11.0, 1.0]
    assert episodes[2]["dataset_from_index"] == 19 and episodes[2]["dataset_to_index"] == 24
    tasks = pq.read_table(root / "meta/tasks.parquet")
    assert tasks.column_names == ["task_index", "__index_level_0__"]
    assert b"pandas" in tasks.schema.metadata
    data = pq.ParquetFile(root / "data/chunk-000/file-000.parquet")
    assert data.metadata.num_row_groups == 3, "one row group per episode"
    stats = json.loads((root / "meta/stats.json").read_text())
    assert np.array(stats["observation.images.cam"]["mean"]).shape == (3, 1, 1)
    # image statistics per channel in [0, 1] (lerobot's convention), from the frames as given (before encoding)
    pixels = np.concatenate([coloured(e, n) for e, n in enumerate(LENGTHS)]).reshape(-1, 3) / 255.0
    for name, expected in (("mean", pixels.mean(0)), ("std", pixels.std(0)), ("min", pixels.min(0)),
                           ("max", pixels.max(0))):
        np.testing.assert_allclose(np.array(stats["observation.images.cam"][name]).reshape(3), expected,
                                   rtol=1e-6, atol=1e-6, err_msg=name)
    assert stats["observation.images.cam"]["count"] == [24]
    assert stats["action"]["max"] == [11.0, 2.0] and stats["action"]["count"] == [24]


def test_refuses_to_clobber_and_rejects_bad_episodes(tmp_path):
    root = write(tmp_path / "ds")
    with pytest.raises(FplusError, match="already exists"):
        LeRobotWriter(root, fps=15, features=FEATURES)
    w = LeRobotWriter(tmp_path / "other", fps=15, features=FEATURES)
    n = 4
    good = {"observation.images.cam": coloured(0, n), "observation.state": np.zeros((n, 3), np.float32),
            "action": np.zeros((n, 2), np.float32)}
    with pytest.raises(FplusError, match="non-empty task"):
        w.add_episode("", good)
    with pytest.raises(FplusError, match="missing"):
        w.add_episode("t", {k: v for k, v in good.items() if k != "action"})
    with pytest.raises(FplusError, match="same non-zero length"):
        w.add_episode("t", {**good, "action": np.zeros((n + 1, 2), np.float32)})
    with pytest.raises(FplusError, match="no episodes"):
        w.finalize()
    w.abort()
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.partial").exists()


def test_overwrite_replaces(tmp_path):
    write(tmp_path / "ds")
    w = LeRobotWriter(tmp_path / "ds", fps=15, features=FEATURES, overwrite=True)
    w.add_episode("close the drawer", {"observation.images.cam": coloured(2, 4),
                                       "observation.state": np.ones((4, 3), np.float32),
                                       "action": np.full((4, 2), 7.0, np.float32)})
    ds = LeRobotDataset.open(w.finalize())
    assert (ds.num_episodes, ds.num_frames, ds.tasks) == (1, 4, ["close the drawer"])  # nothing of the old one
    np.testing.assert_array_equal(ds.column("action"), np.full((4, 2), 7.0, np.float32))
    assert sorted(p.name for p in (tmp_path / "ds" / "data" / "chunk-000").iterdir()) == ["file-000.parquet"]


def test_string_and_bool_columns(tmp_path):
    features = {**FEATURES, "language": {"dtype": "string", "shape": [1], "names": None},
                "done": {"dtype": "bool", "shape": [1], "names": None}}
    w = LeRobotWriter(tmp_path / "ds", fps=15, features=features)
    n = 3
    w.add_episode("t", {"observation.images.cam": coloured(0, n), "observation.state": np.zeros((n, 3), np.float32),
                        "action": np.zeros((n, 2), np.float32), "language": np.array(["go", "go on", "stop"]),
                        "done": np.array([False, False, True])})
    ds = LeRobotDataset.open(w.finalize(), DataKeys(instruction="language"))
    assert list(ds.instructions("language")) == ["go", "go on", "stop"]
    assert ds.column("done").tolist() == [False, False, True]
