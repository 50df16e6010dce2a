"""Meta-World v3 single-task environments seen through the `corner` camera, and their scripted experts.

    with MetaWorldEnv("push-v3", image_size=96, max_steps=150) as env:   # one env (and GL context) at a time
        obs = env.reset(seed=3)                  # {"image": (H,W,3) uint8, "state": (4,) float32}
        obs, success, done = env.step(action)    # action: (4,) in [-1, 1]
        episode = run_expert_episode(env, 3)     # the scripted expert drives the env for one episode

`MetaWorldEnv` is the Meta-World simulator of closed-loop evaluation (a `fplus.sim.base.Simulator`, registered as
"metaworld"), and both the demo generator (`fplus.data.demo`: the scripted expert drives it through
`run_expert_episode`) and closed-loop evaluation (a learned policy drives it) step through it, so both see exactly
the same frames and states.

Imports. Importing this module imports neither mujoco nor metaworld and leaves `MUJOCO_GL` alone. Both are imported
on first use (an env, a task check, an expert), right after `fplus.sim.gl.import_mujoco` has chosen the GL backend:
`MUJOCO_GL` defaults to `egl`; if mujoco cannot be imported with EGL, `osmesa` is tried.

Rendering. Frames come from our own `mujoco.Renderer`, not Meta-World's gymnasium renderer, with the cheap
settings: no multisampling (`model.vis.quality.offsamples = 0`, set before the renderer is created), no shadows,
reflections or skybox (the sky behind the table is therefore black). On a 2-core CPU with software EGL this is
~12 ms per 96 px frame instead of ~80 ms with the defaults.

Orientation. The `corner` camera is defined with its "up" axis pointing down in the world, so MuJoCo renders it
upside down. Frames are rotated by 180 degrees (both axes flipped: a rotation about the optical axis, not a mirror
image), after which the table is at the bottom and the robot base on the right.

Pitfalls handled here:
- Black frames: with several envs/renderers alive, later frames have been seen to come back all black without any
  error (not reproduced with Mesa's software EGL, which this was developed on). Only one `MetaWorldEnv` may be
  open at a time (opening a second raises), `close()` frees the renderer before the simulation, and every
  rendered frame is checked: a black frame raises `SimulatorError` instead of being recorded.
- Seeding: Meta-World's envs freeze their object/goal layout after construction. `reset(seed)` draws a fresh layout
  from the env's own generator seeded with `seed` (including the rejection loops some tasks use to keep the goal
  away from the object), so the same (task, seed) always gives the same layout and, with the deterministic expert
  and physics, the same episode, whatever was run before. Meta-World has no public switch for this (see
  `_draw_layout`).
- Stale goal marker: Meta-World moves the goal site at reset without a forward pass, so the first frame of an episode
  would show the goal where the previous episode had it; `reset` runs `mj_forward` before rendering.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import numpy as np

from fplus.errors import SimulatorError
from fplus.sim.base import SimTask, Simulator
from fplus.sim.gl import import_mujoco

if TYPE_CHECKING:
    from fplus.settings import Settings

INSTALL_HINT = 'pip install -e ".[sim]"'

CAMERA = "corner"
"""The Meta-World camera every frame comes from (a view of the table from the front left)."""

STATE_NAMES = ["hand_x", "hand_y", "hand_z", "gripper"]
"""`state` = the first 4 Meta-World observation values: end-effector xyz (m) and the gripper opening."""

ACTION_NAMES = ["dx", "dy", "dz", "grip"]
"""`action` = Meta-World's 4-D action: end-effector displacement (scaled by 1/100 m) and gripper effort."""

DEFAULT_STEPS_AFTER_SUCCESS = 10
"""`run_expert_episode` stops this many steps after the first success: the end of an episode then shows the goal
reached and held, without long idle tails."""

BLACK_FRAME_MEAN = 4.0
"""A frame whose mean pixel value (0-255) is below this is black: a real corner-camera frame always shows the
lit table in its lower half (mean around 50 even with the black sky)."""

FAST_RENDER_FLAGS_OFF = ("mjRND_SHADOW", "mjRND_REFLECTION", "mjRND_SKYBOX")
"""Scene render flags switched off for speed (fog and haze are already off in Meta-World's scenes)."""

# Policy classes whose names do not follow `Sawyer<CamelCaseTaskName>Policy`.
_POLICY_NAME_EXCEPTIONS = {"peg-insert-side-v3": "SawyerPegInsertionSideV3Policy"}

TASK_DESCRIPTIONS: dict[str, str] = {
    "assembly-v3": "pick up the ring and put it onto the peg",
    "basketball-v3": "pick up the ball and drop it into the basket",
    "bin-picking-v3": "pick up the block from the left bin and place it in the right bin",
    "box-close-v3": "pick up the lid and put it on the box",
    "button-press-topdown-v3": "press the button down from above",
    "button-press-topdown-wall-v3": "press the button behind the wall down from above",
    "button-press-v3": "push the button in from the front",
    "button-press-wall-v3": "reach past the wall and push the button in from the front",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine to the goal",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial a quarter turn",
    "disassemble-v3": "pick the ring up off the peg",
    "door-close-v3": "push the open door closed",
    "door-lock-v3": "turn the door lock down to lock it",
    "door-open-v3": "pull the door open by its handle",
    "door-unlock-v3": "turn the door lock up to unlock it",
    "hand-insert-v3": "move the gripper into the hole in the table",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open by its handle",
    "faucet-open-v3": "turn the faucet handle to the left to open it",
    "faucet-close-v3": "turn the faucet handle to the right to close it",
    "hammer-v3": "pick up the hammer and hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal on the other side of the wall",
    "pick-out-of-hole-v3": "pick the peg out of the hole and lift it to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate forward into the goal",
    "plate-slide-side-v3": "slide the plate sideways into the goal",
    "plate-slide-back-v3": "slide the plate back out of the goal",
    "plate-slide-back-side-v3": "slide the plate sideways back out of the goal",
    "peg-insert-side-v3": "pick up the peg and insert it into the hole from the side",
    "peg-unplug-side-v3": "pull the peg out of the hole sideways",
    "soccer-v3": "push the ball into the goal",
    "stick-push-v3": "pick up the stick and use it to push the box to the goal",
    "stick-pull-v3": "pick up the stick and use it to pull the box to the goal",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "push-back-v3": "pull the puck back to the goal",
    "reach-v3": "move the gripper to the goal position",
    "reach-wall-v3": "reach over the wall to the goal position",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the edge of the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
"""Our one-sentence instruction for every Meta-World v3 task (used as the LeRobot task string)."""


class MetaWorldObs(TypedDict):
    """What a policy sees at one step."""

    image: np.ndarray  # (H, W, 3) uint8, corner camera, upright
    state: np.ndarray  # (4,) float32: hand xyz, gripper opening


@dataclass
class ExpertEpisode:
    """One recorded episode; row t holds the observation before action t."""

    task: str
    seed: int
    images: np.ndarray  # (T, H, W, 3) uint8, corner camera, upright
    state: np.ndarray  # (T, 4) float32
    action: np.ndarray  # (T, 4) float32, clipped to [-1, 1]
    success: bool  # info["success"] was reached at some step
    first_success_step: int | None  # 0-based index of the first step whose info["success"] was true

    @property
    def num_steps(self) -> int:
        return len(self.action)


@functools.cache
def _metaworld() -> SimpleNamespace:
    """Meta-World's expert policies and env classes, imported on first use (after the GL backend is chosen)."""
    MetaWorldEnv.check_available()
    import_mujoco()  # metaworld imports mujoco, which reads MUJOCO_GL once
    import metaworld.policies as policies
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS, ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

    return SimpleNamespace(policies=policies, envs=ALL_V3_ENVIRONMENTS,
                           goal_observable_envs=ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE)


def available_tasks() -> list[str]:
    """The Meta-World v3 task names that have a scripted expert, sorted."""
    return sorted(name for name in _metaworld().envs if _policy_class_name(name) is not None)


def _policy_class_name(task: str) -> str | None:
    name = _POLICY_NAME_EXCEPTIONS.get(task) or "Sawyer" + "".join(p.capitalize() for p in task.split("-")) + "Policy"
    return name if hasattr(_metaworld().policies, name) else None


def check_task(task: str) -> None:
    """Raise `SimulatorError` naming the valid tasks if `task` is not a Meta-World v3 task with an expert."""
    if task not in _metaworld().envs or _policy_class_name(task) is None:
        raise SimulatorError(f"unknown Meta-World task {task!r}; valid tasks: {', '.join(available_tasks())}")
    if task not in TASK_DESCRIPTIONS:
        raise SimulatorError(f"Meta-World task {task!r} has no entry in TASK_DESCRIPTIONS; add one")


def task_description(task: str) -> str:
    """Our instruction sentence for `task`, e.g. "push the puck to the goal"."""
    check_task(task)
    return TASK_DESCRIPTIONS[task]


def make_expert(task: str) -> Any:
    """The scripted expert of `task` (a `metaworld.policies` object with `get_action(obs (39,)) -> (4,)`)."""
    check_task(task)
    return getattr(_metaworld().policies, _policy_class_name(task))()


def upright(frame: np.ndarray) -> np.ndarray:
    """Rotate a raw corner-camera frame (H, W, 3) by 180 degrees so that it is upright; returns a contiguous copy."""
    return np.ascontiguousarray(frame[::-1, ::-1])


def is_black(frames: np.ndarray) -> np.ndarray:
    """Per-frame black test: (..., H, W, 3) uint8 -> (...,) bool, true where the mean pixel < BLACK_FRAME_MEAN."""
    return np.asarray(frames).mean(axis=(-3, -2, -1)) < BLACK_FRAME_MEAN


def _draw_layout(env: Any, seed: int) -> np.ndarray:
    """Reset a Meta-World env to the object/goal layout drawn from `seed`; returns the raw observation (39,).

    Meta-World 3.1.1 offers no public way to do this, so the private switch `_freeze_rand_vec` is flipped for this one
    reset, exactly as Meta-World's own goal-observable constructors (`env_dict._create_observable_goal_envs`) and
    `metaworld._make_tasks` flip it. The public alternatives give other layouts or cannot work: a new env per seed
    (`...GOAL_OBSERVABLE[name](seed=s)`) draws from numpy's global generator, not from `env.np_random`, so the layouts
    (and the demo's numbers) would move, and costs a MuJoCo model and a renderer per episode; `env.set_task(Task)`
    freezes a layout vector we would have to draw ourselves, from the private `_random_reset_space`, and it would hang
    the 21 tasks whose `reset_model` redraws until goal and object are apart (a frozen vector is redrawn forever).
    """
    env.seed(seed)  # public: seeds env.np_random, the generator the layout is then drawn from
    env.seeded_rand_vec = True  # public: draw from env.np_random instead of numpy's global generator
    env._freeze_rand_vec = False
    try:
        obs, _ = env.reset()
    finally:
        env._freeze_rand_vec = True
    return obs


_live_env: weakref.ref[MetaWorldEnv] | None = None


class MetaWorldEnv(Simulator):
    """One Meta-World v3 task with its goal observable, rendered at `image_size` px from the corner camera.

    Only one may be open at a time: `close()` it (or use `with`) before creating the next; frames of a renderer that
    outlived its context silently come back black, so this is enforced rather than left to chance.

    Args:
        task: a Meta-World v3 task name, e.g. "push-v3" (see `available_tasks()`).
        image_size: height = width of the frames in pixels.
        max_steps: the episode is `done` after this many steps (at most Meta-World's own limit, 500).
    """

    name: ClassVar[str] = "metaworld"
    cameras: ClassVar[tuple[str, ...]] = ("image",)  # the keys of `_observe`'s frames
    state_dim: ClassVar[int] = len(STATE_NAMES)  # `_observe`: the first values of the raw observation
    action_dim: ClassVar[int] = len(ACTION_NAMES)  # `step`: Meta-World's action

    @classmethod
    def check_available(cls) -> None:
        if importlib.util.find_spec("metaworld") is None:
            raise SimulatorError(f"Meta-World is not installed: {INSTALL_HINT}")

    @classmethod
    def resolve_tasks(cls, requested: list[str] | None, dataset_tasks: list[str], settings: Settings) -> list[SimTask]:
        """`requested` task names; None: the dataset's tasks that are Meta-World task sentences (`settings` unused)."""
        if requested is None:
            by_sentence = {v: k for k, v in TASK_DESCRIPTIONS.items()}
            requested = [by_sentence[t] for t in dataset_tasks if t in by_sentence]
            if not requested:
                raise SimulatorError(f"none of the dataset's tasks is a Meta-World task sentence: {dataset_tasks[:3]}; "
                                     "pass --tasks")
        for task in requested:
            check_task(task)
        return [SimTask(t, TASK_DESCRIPTIONS[t], t) for t in requested]

    @classmethod
    def default_max_steps(cls, settings: Settings) -> int:
        """DEMO_MAX_STEPS: the demo's episode length."""
        return settings.data.demo_max_steps

    @classmethod
    def make_env(cls, task: SimTask, image_sizes: Sequence[int], max_steps: int | None) -> MetaWorldEnv:
        if max_steps is None:
            raise SimulatorError("Meta-World needs max_steps (DEMO_MAX_STEPS)")
        return cls(task.spec, image_size=image_sizes[0], max_steps=max_steps)

    def __init__(self, task: str, *, image_size: int, max_steps: int):
        global _live_env
        check_task(task)
        previous = _live_env() if _live_env is not None else None
        if previous is not None and not previous.closed:
            raise SimulatorError(f"a MetaWorldEnv ({previous.task}) is still open; close it before creating another "
                                 "(a second live GL context can make frames come back black)")
        mujoco = import_mujoco()
        self.task = task
        self.image_size = image_size
        self.max_steps = max_steps
        self.closed = False
        # The construction seed only fixes the throwaway initial layout; every reset(seed) draws a new one.
        self._env = _metaworld().goal_observable_envs[f"{task}-goal-observable"](seed=0)
        model = self._env.model
        if max_steps < 1 or max_steps > self._env.max_path_length:
            self._env.close()
            raise SimulatorError(f"max_steps must be in 1..{self._env.max_path_length}, got {max_steps}")
        limit = min(model.vis.global_.offwidth, model.vis.global_.offheight)
        if image_size < 8 or image_size > limit:
            self._env.close()
            raise SimulatorError(f"image_size must be in 8..{limit} px, got {image_size}")
        model.vis.quality.offsamples = 0  # no multisampling; read when the renderer's GL buffers are created
        try:
            self._renderer = mujoco.Renderer(model, image_size, image_size)
        except Exception as e:  # noqa: BLE001  the EGL/OSMesa probe: the GL backends raise various types
            self._env.close()
            backend = os.environ.get("MUJOCO_GL")
            other = "osmesa" if backend == "egl" else "egl"
            raise SimulatorError(f"cannot create a MuJoCo renderer with MUJOCO_GL={backend}: {e}; try "
                                 f"MUJOCO_GL={other} (set it before starting Python; osmesa needs libosmesa6)") from e
        for flag in FAST_RENDER_FLAGS_OFF:
            self._renderer.scene.flags[getattr(mujoco.mjtRndFlag, flag)] = 0
        self._raw_obs: np.ndarray | None = None
        self._steps = 0
        _live_env = weakref.ref(self)

    @property
    def raw_obs(self) -> np.ndarray:
        """The full Meta-World observation (39,) float64: hand, gripper, objects, previous frame, goal (for experts)."""
        if self._raw_obs is None:
            raise SimulatorError("call reset(seed) before stepping or reading observations")
        return self._raw_obs

    @property
    def steps(self) -> int:
        """Steps taken since the last reset."""
        return self._steps

    def reset(self, seed: int) -> MetaWorldObs:
        """Start an episode whose object/goal layout is drawn from `seed` (same seed -> same layout)."""
        self._check_open()
        obs = _draw_layout(self._env, seed)
        # Meta-World moves the goal site after its last forward pass, so without this the first frame would show the
        # goal where the previous episode had it (data.site_xpos is stale until the next mj_forward).
        import_mujoco().mj_forward(self._env.model, self._env.data)
        self._raw_obs = obs
        self._steps = 0
        return self._observe()

    def step(self, action: np.ndarray) -> tuple[MetaWorldObs, bool, bool]:
        """Apply `action` (4,) (clipped to [-1, 1]); returns (observation, success, done).

        `success` is Meta-World's info["success"] after this step; `done` is true once `max_steps` steps are taken.
        """
        self._check_open()
        if self._raw_obs is None:
            raise SimulatorError("call reset(seed) before step()")
        if self._steps >= self.max_steps:
            raise SimulatorError(f"the episode is over ({self.max_steps} steps); call reset(seed)")
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(self.action_dim), -1.0, 1.0)
        obs, _, _, _, info = self._env.step(action)
        self._raw_obs = obs
        self._steps += 1
        return self._observe(), bool(info["success"]), self._steps >= self.max_steps

    def render(self) -> np.ndarray:
        """The current corner-camera frame, upright: (H, W, 3) uint8. Raises `SimulatorError` if it is black."""
        frame = upright(self.render_raw())
        if is_black(frame):
            raise SimulatorError(f"{self.task}: the rendered frame is black (mean pixel {frame.mean():.2f}); the GL "
                                 "context is probably stale (was another renderer created or closed meanwhile?)")
        return frame

    def render_raw(self) -> np.ndarray:
        """The corner camera's frame as MuJoCo renders it, upside down: (H, W, 3) uint8 (for checks)."""
        self._check_open()
        self._renderer.update_scene(self._env.data, camera=CAMERA)
        return self._renderer.render()

    def close(self) -> None:
        """Free the renderer (and its GL context), then the simulation. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self._renderer.close()
        self._env.close()

    def _observe(self) -> MetaWorldObs:
        return {"image": self.render(), "state": self.raw_obs[:self.state_dim].astype(np.float32)}

    def _check_open(self) -> None:
        if self.closed:
            raise SimulatorError(f"this MetaWorldEnv ({self.task}) is closed")


def expert_action(expert: Any, raw_obs: np.ndarray) -> np.ndarray:
    """The expert's action for a raw observation (39,), clipped to [-1, 1]: (4,) float32."""
    with warnings.catch_warnings():  # the experts warn about their own gains exceeding the action range
        warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
        action = expert.get_action(raw_obs)
    return np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)


def run_expert_episode(env: MetaWorldEnv, seed: int, *,
                       steps_after_success: int = DEFAULT_STEPS_AFTER_SUCCESS) -> ExpertEpisode:
    """Roll out the scripted expert of `env.task` for one episode in an open env (the demo generator's episodes).

    The episode ends `steps_after_success` steps after the first step with info["success"], or after
    `env.max_steps` steps. Row t of the result is the observation the expert saw and the action it took.
    """
    expert = make_expert(env.task)
    obs = env.reset(seed)
    images, states, actions = [], [], []
    first_success: int | None = None
    done = False
    while not done:
        action = expert_action(expert, env.raw_obs)
        images.append(obs["image"])
        states.append(obs["state"])
        actions.append(action)
        obs, success, done = env.step(action)
        t = len(actions) - 1
        if success and first_success is None:
            first_success = t
        if first_success is not None and t >= first_success + steps_after_success:
            break
    return ExpertEpisode(
        task=env.task, seed=seed, images=np.stack(images), state=np.stack(states), action=np.stack(actions),
        success=first_success is not None, first_success_step=first_success,
    )
