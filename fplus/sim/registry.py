"""The closed-loop simulators behind one interface, so that `fplus.eval.closed_loop` has a single rollout loop.

Every env is a context manager with
    reset(episode: int) -> obs        Meta-World: `episode` seeds the object/goal layout;
                                      LIBERO: initial state `episode mod 50`, then the settle steps
    step(action) -> (obs, success, done)
where obs holds "state" and one uint8 (H, W, 3) frame per camera of `SimSpec.cameras`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fplus.errors import FplusError
from fplus.sim.libero import ACTION_DIM as LIBERO_ACTION_DIM
from fplus.sim.libero import STATE_DIM as LIBERO_STATE_DIM

SIMULATORS = ("metaworld", "libero")


@dataclass(frozen=True)
class SimSpec:
    """What a simulator gives and takes: its camera observation keys (main camera first), state and action sizes."""

    name: str
    cameras: tuple[str, ...]
    state_dim: int
    action_dim: int


SPECS = {
    "metaworld": SimSpec("metaworld", ("image",), state_dim=4, action_dim=4),
    "libero": SimSpec("libero", ("image", "wrist_image"), state_dim=LIBERO_STATE_DIM, action_dim=LIBERO_ACTION_DIM),
}


@dataclass(frozen=True)
class SimTask:
    """One task to roll out: `name` keys the results, `instruction` is what the policy reads."""

    name: str
    instruction: str
    spec: Any  # the simulator's own task: a Meta-World task name, a `LiberoTask`


def sim_spec(sim: str) -> SimSpec:
    if sim not in SPECS:
        raise FplusError(f"unknown closed-loop simulator {sim!r}; valid: {', '.join(SIMULATORS)}")
    return SPECS[sim]


def check_available(sim: str) -> None:
    """Raise `FplusError` with the install command when the simulator's package is missing (checked without
    importing it, so that `fplus matrix` and `fplus doctor` can fail before training instead of after)."""
    import importlib.util

    sim_spec(sim)
    if sim == "metaworld":
        if importlib.util.find_spec("metaworld") is None:
            raise FplusError('Meta-World is not installed: pip install -e ".[sim]"')
        return
    from fplus.sim.libero import require_libero

    require_libero()


def resolve_tasks(sim: str, requested: list[str] | None, dataset_tasks: list[str], suite: str) -> list[SimTask]:
    """The tasks to evaluate.

    Meta-World: `requested` task names, default the dataset's tasks that are Meta-World task sentences.
    LIBERO: tasks of `suite` by index or name, default the whole suite (the benchmark's protocol).
    """
    sim_spec(sim)
    if sim == "metaworld":
        from fplus.sim.metaworld import TASK_DESCRIPTIONS, check_task

        if requested is None:
            by_sentence = {v: k for k, v in TASK_DESCRIPTIONS.items()}
            requested = [by_sentence[t] for t in dataset_tasks if t in by_sentence]
            if not requested:
                raise FplusError(f"none of the dataset's tasks is a Meta-World task sentence: {dataset_tasks[:3]}; "
                                 "pass --tasks")
        for task in requested:
            check_task(task)
        return [SimTask(t, TASK_DESCRIPTIONS[t], t) for t in requested]
    from fplus.sim.libero import load_suite, select_tasks

    return [SimTask(t.name, t.language, t) for t in select_tasks(load_suite(suite), requested)]


def open_env(sim: str, task: SimTask, image_sizes: tuple[int, ...], max_steps: int | None):
    """An env of `task` rendering each camera at its size; `max_steps` None: the simulator's default."""
    if sim == "metaworld":
        from fplus.sim.metaworld import MetaWorldEnv

        if max_steps is None:
            raise FplusError("Meta-World needs max_steps (DEMO_MAX_STEPS)")
        return MetaWorldEnv(task.spec, image_size=image_sizes[0], max_steps=max_steps)
    from fplus.sim.libero import LiberoEnv

    return LiberoEnv(task.spec, image_size=image_sizes, max_steps=max_steps)


def default_max_steps(sim: str, settings) -> int:
    """Meta-World: DEMO_MAX_STEPS (the demo's episode length); LIBERO: its suite's limit (DESIGN 7)."""
    if sim == "metaworld":
        return settings.data.demo_max_steps
    from fplus.sim.libero import MAX_STEPS

    return MAX_STEPS[settings.eval.suite]
