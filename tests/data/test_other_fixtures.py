"""Datasets written by the lerobot library with other shapes, keys, codec (AV1), fps and image storage."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fplus.data.lerobot import DataKeys, LeRobotDataset
from tests.conftest import LOCAL_FIXTURES

LEROBOT_VENV = Path(os.environ.get("FPLUS_LEROBOT_VENV", "/opt/lerobot-venv"))
REPO = Path(__file__).resolve().parents[2]
# (fixture, cameras with their blue value, state dim, action dim, episode lengths, fps, codec)
CASES = [
    ("lerobot_v30_av1_multicam", {"observation.images.top": 160, "observation.images.side": 40}, 6, 5,
     [9, 17, 5, 13], 15),
    ("lerobot_v30_images", {"observation.image": 200}, 3, 2, [6, 4], 10),
]


@pytest.mark.parametrize("name,cameras,state_dim,action_dim,lengths,fps", CASES)
def test_reads_lerobot_written_fixture(name, cameras, state_dim, action_dim, lengths, fps):
    root = LOCAL_FIXTURES / name
    ds = LeRobotDataset.open(root, DataKeys(image=next(iter(cameras)), state="observation.state", action="action",
                                            instruction="task"))
    assert ds.fps == fps and [e.length for e in ds.episodes] == lengths
    state, action = ds.column("observation.state"), ds.column("action")
    assert state.shape == (sum(lengths), state_dim) and action.shape == (sum(lengths), action_dim)
    for ep in ds.episodes:
        fi = np.arange(ep.length)
        np.testing.assert_array_equal(state[ep.start:ep.stop, :2], np.stack([np.full(ep.length, ep.index), fi], 1))
        np.testing.assert_array_equal(action[ep.start:ep.stop],
                                      (fi[:, None] + np.arange(action_dim) / 10).astype(np.float32))
        for key, blue in cameras.items():
            frames = ds.episode_frames(key, ep.index)
            assert frames.shape[0] == ep.length and frames.shape[1:] == tuple(ds.features[key]["shape"])
            mean = frames.reshape(ep.length, -1, 3).mean(1)
            assert np.abs(mean[:, 0] - fi * 8 % 256).max() <= 4
            assert np.abs(mean[:, 1] - ep.index * 60 % 256).max() <= 4
            assert np.abs(mean[:, 2] - blue).max() <= 4


def test_av1_fixture_is_really_av1():
    ds = LeRobotDataset.open(LOCAL_FIXTURES / "lerobot_v30_av1_multicam")
    assert ds.features["observation.images.top"]["info"]["video.codec"] == "av1"
    assert ds.tasks and len(ds.tasks) == 3


@pytest.mark.skipif(not (LEROBOT_VENV / "bin/python").exists(),
                    reason=f"no lerobot venv at {LEROBOT_VENV} (build it: bash scripts/lerobot_compat_env.sh)")
def test_lerobot_library_reads_what_fplus_writes(tmp_path):
    from fplus.data.writer import LeRobotWriter

    w = LeRobotWriter(tmp_path / "ds", fps=10, features={
        "observation.images.image": {"dtype": "video", "shape": [48, 64, 3], "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": [4], "names": ["a", "b", "c", "d"]},
        "action": {"dtype": "float32", "shape": [3], "names": ["x", "y", "z"]}})
    for e, n in enumerate([7, 12, 5]):
        fi = np.arange(n)
        frames = np.zeros((n, 48, 64, 3), np.uint8)
        frames[..., 0] = (fi * 8 % 256)[:, None, None]
        frames[..., 1] = e * 60 % 256
        frames[..., 2] = 128
        state = np.zeros((n, 4), np.float32)
        state[:, 0], state[:, 1] = e, fi
        w.add_episode(f"task {e % 2}", {"observation.images.image": frames, "observation.state": state,
                                        "action": (fi[:, None] + np.arange(3) / 10).astype(np.float32)})
    root = w.finalize()
    out = subprocess.run([str(LEROBOT_VENV / "bin/python"), str(REPO / "scripts/check_lerobot_reads.py"), str(root),
                          "--all-frames", "--check-pattern"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    summary = json.loads(out.stdout)
    assert summary["num_episodes"] == 3 and summary["num_frames"] == 24 and summary["fps"] == 10


@pytest.mark.parametrize("root", ["shared", "lerobot_v30_av1_multicam", "lerobot_v30_images"])
def test_single_frame_access_equals_episode_decoding(root, libero_fixture):
    ds = LeRobotDataset.open(libero_fixture if root == "shared" else LOCAL_FIXTURES / root)
    order = np.random.default_rng(0).permutation(ds.num_frames)
    for key in ds.camera_keys:
        single = np.stack([ds.frame_at(key, int(i)) for i in order])
        np.testing.assert_array_equal(single, ds.frames(key, order))
