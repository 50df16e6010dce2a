"""The reader against datasets written by the lerobot library itself (colours and values encode the indices)."""

import json
import shutil
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from fplus.data.lerobot import DataKeys, LeRobotDataset
from fplus.errors import FplusError

KEYS = DataKeys(image="observation.images.image", wrist_image="observation.images.wrist_image",
                state="observation.state", action="action", instruction="task")


def test_metadata_of_the_shared_fixture(libero_fixture):
    ds = LeRobotDataset.open(libero_fixture, KEYS)
    assert (ds.num_episodes, ds.num_frames, ds.fps) == (3, 48, 10)
    assert [e.length for e in ds.episodes] == [12, 20, 16]
    assert [(e.start, e.stop) for e in ds.episodes] == [(0, 12), (12, 32), (32, 48)]
    assert ds.tasks == ["put the red bowl on the plate", "open the top drawer of the cabinet",
                        "pick up the ketchup and place it in the basket"]
    assert ds.video_keys == ["observation.images.image", "observation.images.wrist_image"]
    assert ds.stats["action"]["mean"].shape == (7,)
    assert ds.stats["observation.images.image"]["mean"].shape == (3, 1, 1)


def test_tabular_columns_equal_the_encoded_values(libero_fixture):
    ds = LeRobotDataset.open(libero_fixture, KEYS)
    state, action = ds.column("observation.state"), ds.column("action")
    assert state.shape == (48, 8) and action.shape == (48, 7) and action.dtype == np.float32
    for ep in ds.episodes:
        fi = np.arange(ep.length)
        np.testing.assert_array_equal(state[ep.start:ep.stop, 0], ep.index)
        np.testing.assert_array_equal(state[ep.start:ep.stop, 1], fi)
        expected = (fi[:, None] + np.arange(7)[None] / 10).astype(np.float32)
        np.testing.assert_array_equal(action[ep.start:ep.stop], expected)
        np.testing.assert_array_equal(ds.column("frame_index")[ep.start:ep.stop], fi)
    raw = pq.read_table(libero_fixture / "data/chunk-000/file-000.parquet").sort_by("index")
    np.testing.assert_array_equal(np.stack(raw.column("action").to_pylist()).astype(np.float32), action)
    instr = ds.instructions("task")
    assert instr[0] == ds.tasks[0] and instr[12] == ds.tasks[1] and instr[47] == ds.tasks[2]


@pytest.mark.parametrize("key,blue", [("observation.images.image", 128), ("observation.images.wrist_image", 127)])
def test_decoded_frames_match_colours_at_every_episode_boundary(libero_fixture, key, blue):
    ds = LeRobotDataset.open(libero_fixture, KEYS)
    for ep in ds.episodes:
        frames = ds.episode_frames(key, ep.index)
        assert frames.shape == (ep.length, 64, 64, 3) and frames.dtype == np.uint8
        mean = frames.reshape(ep.length, -1, 3).mean(axis=1)
        fi = np.arange(ep.length)
        assert np.abs(mean[:, 0] - (fi * 8) % 256).max() <= 4, "red encodes frame_index"
        assert np.abs(mean[:, 1] - (ep.index * 60) % 256).max() <= 4, "green encodes episode_index"
        assert np.abs(mean[:, 2] - blue).max() <= 4


def test_frames_by_global_index_cross_episodes(libero_fixture):
    ds = LeRobotDataset.open(libero_fixture, KEYS)
    idx = np.array([47, 0, 11, 12, 31, 32])
    frames = ds.frames("observation.images.image", idx)
    red = frames[:, 32, 32, 0].astype(int)
    green = frames[:, 32, 32, 1].astype(int)
    expected_fi = np.array([15, 0, 11, 0, 19, 0])
    expected_ep = np.array([2, 0, 0, 1, 1, 2])
    assert np.abs(red - expected_fi * 8).max() <= 4
    assert np.abs(green - expected_ep * 60).max() <= 4


def test_wrong_keys_fail_fast_listing_existing_keys(libero_fixture):
    t0 = time.perf_counter()
    with pytest.raises(FplusError) as err:
        LeRobotDataset.open(libero_fixture, DataKeys(image="observation.images.top", instruction="instruction"))
    assert time.perf_counter() - t0 < 1.0
    msg = str(err.value)
    assert "IMAGE_KEY='observation.images.top' is not in the dataset" in msg
    assert "INSTRUCTION_KEY='instruction' is not in the dataset" in msg
    assert "observation.images.image, observation.state, action, observation.images.wrist_image" in msg


def test_key_of_the_wrong_kind_is_reported(libero_fixture):
    with pytest.raises(FplusError, match="IMAGE_KEY='action' is a float32 feature, not a camera"):
        LeRobotDataset.open(libero_fixture, DataKeys(image="action"))
    with pytest.raises(FplusError, match="ACTION_KEY='observation.images.image' has dtype video"):
        LeRobotDataset.open(libero_fixture, DataKeys(action="observation.images.image"))


def test_empty_instruction_is_an_error(libero_fixture, tmp_path):
    import pyarrow as pa

    copy = tmp_path / "ds"
    shutil.copytree(libero_fixture, copy)
    table = pq.read_table(copy / "meta/tasks.parquet")
    texts = table.column("__index_level_0__").to_pylist()
    texts[1] = "  "
    table = table.set_column(1, "__index_level_0__", pa.array(texts))
    pq.write_table(table, copy / "meta/tasks.parquet")
    with pytest.raises(FplusError, match=r"task_index \[1\] has an empty instruction"):
        LeRobotDataset.open(copy, KEYS)


def test_not_a_dataset_and_wrong_version(tmp_path, libero_fixture):
    with pytest.raises(FplusError, match="not found"):
        LeRobotDataset.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FplusError, match="meta/info.json is missing"):
        LeRobotDataset.open(tmp_path / "empty")
    copy = tmp_path / "old"
    shutil.copytree(libero_fixture, copy)
    info = json.loads((copy / "meta/info.json").read_text())
    info["codebase_version"] = "v2.1"
    (copy / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(FplusError, match="codebase_version 'v2.1'"):
        LeRobotDataset.open(copy)


def test_fingerprint_is_stable_and_changes_with_content(libero_fixture, tmp_path):
    a = LeRobotDataset.open(libero_fixture).fingerprint
    assert a == LeRobotDataset.open(libero_fixture).fingerprint
    copy = tmp_path / "ds"
    shutil.copytree(libero_fixture, copy)
    assert LeRobotDataset.open(copy).fingerprint == a
    with open(copy / "data/chunk-000/file-000.parquet", "ab") as f:
        f.write(b"\0")
    assert LeRobotDataset.open(copy).fingerprint != a
