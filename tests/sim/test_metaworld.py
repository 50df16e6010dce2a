"""Meta-World envs, rendering and scripted experts (small frames, one env open at a time, a few seconds in all)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("metaworld")

from fplus.errors import FplusError  # noqa: E402
from fplus.sim.metaworld import (  # noqa: E402
    CAMERA,
    TASK_DESCRIPTIONS,
    MetaWorldEnv,
    available_tasks,
    is_black,
    make_expert,
    run_expert_episode,
    upright,
)

SIZE = 64
MAX_STEPS = 100  # the reach expert succeeds after ~35-65 steps


@pytest.fixture(scope="module")
def reach() -> dict:
    """One reach-v3 env: expert episodes for seeds 0, 1, 0 and the reset frame of seed 0 with its raw render."""
    with MetaWorldEnv("reach-v3", image_size=SIZE, max_steps=MAX_STEPS) as env:
        episodes = [run_expert_episode(env, seed) for seed in (0, 1, 0)]
        obs = env.reset(seed=0)
        model, data = env._env.model, env._env.data
        cam = model.camera(CAMERA).id
        camera = {"pos": data.cam_xpos[cam].copy(), "xmat": data.cam_xmat[cam].reshape(3, 3).copy(),
                  "fovy": float(model.cam_fovy[cam]), "robot_base": data.body("right_arm_base_link").xpos.copy()}
        return {"episodes": episodes, "obs": obs, "raw": env.render_raw().copy(), "camera": camera}


def red_mask(frame: np.ndarray) -> np.ndarray:
    """Pixels of the (red) Sawyer arm: (H, W) bool."""
    r, g, b = (frame[..., i].astype(int) for i in range(3))
    return (r > 90) & (r > 2 * g) & (r > 2 * b)


def level_camera_projection(camera: dict, point: np.ndarray, size: int) -> tuple[float, float]:
    """(row, col) of a world point in the image of a level camera (no roll) at the corner camera's position and
    viewing direction: what an upright frame must look like, independent of how MuJoCo orients the camera."""
    forward = -camera["xmat"][:, 2]  # MuJoCo cameras look along their -z axis
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    rel = point - camera["pos"]
    depth = rel @ forward
    focal = (size / 2) / np.tan(np.radians(camera["fovy"]) / 2)
    return size / 2 - focal * (rel @ up) / depth, size / 2 + focal * (rel @ right) / depth


def test_frames_are_not_black(reach):
    episode = reach["episodes"][0]
    assert episode.images.shape == (episode.num_steps, SIZE, SIZE, 3) and episode.images.dtype == np.uint8
    assert not is_black(episode.images).any()
    assert episode.images.mean() > 20


def test_frames_are_upright(reach):
    frame, raw = reach["obs"]["image"], reach["raw"]
    # The frame is the camera's own render rotated by 180 degrees (a rotation, not a mirror image).
    np.testing.assert_array_equal(frame, raw[::-1, ::-1])
    np.testing.assert_array_equal(upright(raw), frame)

    # Vertical: the sky (black, the skybox is off) is at the top, the table and floor fill the bottom.
    def black_fraction(rows: np.ndarray) -> float:
        return float((rows.max(axis=-1) < 10).mean())

    band = SIZE // 8
    assert black_fraction(frame[:band]) > 0.5 and black_fraction(frame[-band:]) < 0.05
    assert black_fraction(raw[:band]) < 0.05  # the raw render is upside down: the test would catch a missing flip

    # Horizontal: a level camera there sees the robot base right of centre; so must the frame (a vertical-only
    # flip would put the red arm on the left).
    _, base_col = level_camera_projection(reach["camera"], reach["camera"]["robot_base"], SIZE)
    assert base_col > SIZE / 2
    assert np.nonzero(red_mask(frame))[1].mean() > SIZE / 2
    assert np.nonzero(red_mask(raw))[1].mean() < SIZE / 2
    # ...and the table centre below the horizon.
    table_row, _ = level_camera_projection(reach["camera"], np.array([0.0, 0.6, 0.0]), SIZE)
    assert table_row > SIZE / 2


def test_same_seed_gives_the_same_episode(reach):
    first, other, again = reach["episodes"]
    for key in ("images", "state", "action"):
        np.testing.assert_array_equal(getattr(first, key), getattr(again, key))
    assert first.success == again.success and first.first_success_step == again.first_success_step
    assert not np.array_equal(first.state[-1], other.state[-1])  # another seed, another goal


def test_expert_succeeds_and_episode_layout(reach):
    episode = reach["episodes"][0]
    assert episode.success and episode.first_success_step is not None
    assert episode.num_steps == episode.first_success_step + 11  # stops 10 steps after the first success
    assert episode.state.shape == (episode.num_steps, 4) and episode.state.dtype == np.float32
    assert episode.action.shape == (episode.num_steps, 4) and episode.action.dtype == np.float32
    assert np.abs(episode.action).max() <= 1.0
    np.testing.assert_array_equal(episode.state[0], reach["obs"]["state"])


def test_unknown_task_lists_valid_tasks():
    with pytest.raises(FplusError, match=r"unknown Meta-World task 'pick-plaice-v3'; valid tasks: .*pick-place-v3"):
        MetaWorldEnv("pick-plaice-v3", image_size=SIZE, max_steps=MAX_STEPS)
    with pytest.raises(FplusError, match=r"valid tasks: assembly-v3, .*reach-v3"):
        make_expert("reach-v2")


def test_every_task_has_an_expert_and_a_description():
    tasks = available_tasks()
    assert len(tasks) == 50 and "peg-insert-side-v3" in tasks
    for task in tasks:
        assert TASK_DESCRIPTIONS[task].strip()
        assert type(make_expert(task)).__name__.endswith("V3Policy")


def test_second_env_after_closing_the_first_is_not_black(reach, monkeypatch):
    with MetaWorldEnv("push-v3", image_size=SIZE, max_steps=MAX_STEPS) as first:
        obs = first.reset(seed=0)
        for _ in range(5):
            obs, _, _ = first.step(np.array([0.5, 0.0, 0.0, 0.0]))
        assert not is_black(obs["image"])
        with pytest.raises(FplusError, match="still open"):  # a second live GL context is refused
            MetaWorldEnv("reach-v3", image_size=SIZE, max_steps=MAX_STEPS)
    with pytest.raises(FplusError, match="closed"):
        first.reset(seed=0)

    with MetaWorldEnv("reach-v3", image_size=SIZE, max_steps=MAX_STEPS) as env:
        episode = run_expert_episode(env, 0)
        assert not is_black(episode.images).any()
        # A fresh env reproduces the episode recorded after other seeds in another env.
        np.testing.assert_array_equal(episode.images, reach["episodes"][0].images)
        # A black frame (what a stale GL context returns) is an error, never a recorded frame.
        monkeypatch.setattr(env, "render_raw", lambda: np.zeros((SIZE, SIZE, 3), np.uint8))
        with pytest.raises(FplusError, match="black"):
            env.reset(seed=0)


def test_make_demo_dataset(tmp_path):
    from fplus.data.demo import make_demo_dataset
    from fplus.data.lerobot import LeRobotDataset

    tasks = ["reach-v3", "button-press-topdown-v3"]
    report = make_demo_dataset(tmp_path / "demo", tasks=tasks, episodes_per_task=1, image_size=SIZE, seed=0,
                               max_steps=MAX_STEPS, progress=False)
    assert [t.task for t in report.tasks] == tasks
    assert all(t.successes == t.attempts == 1 and t.seeds == [0] for t in report.tasks)
    assert report.path == tmp_path / "demo" and report.seconds > 0
    assert report.table().row_count == 3  # two tasks and the total

    ds = LeRobotDataset.open(report.path)
    assert ds.num_episodes == 2 and ds.num_frames == report.frames
    assert ds.tasks == [TASK_DESCRIPTIONS[t] for t in tasks]
    info = ds.info["features"]
    assert info["observation.state"]["names"] == ["hand_x", "hand_y", "hand_z", "gripper"]
    assert info["action"]["names"] == ["dx", "dy", "dz", "grip"]
    frames = ds.episode_frames("observation.images.image", 1)
    assert frames.shape == (ds.episodes[1].length, SIZE, SIZE, 3)
    assert not is_black(frames).any()
    assert (frames[:, : SIZE // 8].max(axis=-1) < 30).mean() > 0.5  # still upright after video encoding

    with pytest.raises(FplusError, match="already exists"):
        make_demo_dataset(tmp_path / "demo", tasks=tasks, episodes_per_task=1, image_size=SIZE, seed=0,
                          max_steps=MAX_STEPS, progress=False)
