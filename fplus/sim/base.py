"""What every closed-loop simulator provides, so that `fplus.eval.closed_loop` has a single rollout loop.

One class per simulator (`fplus.sim.metaworld.MetaWorldEnv`, `fplus.sim.libero.LiberoEnv`, registered by name in
`fplus.sim.registry`); the class is both the simulator's description and its env:

    Sim.name, Sim.cameras, Sim.state_dim, Sim.action_dim    what it gives and takes (cameras: observation keys,
                                                            main camera first)
    Sim.check_available()                                   SimulatorError with the install command (the package
                                                            is looked up, not imported)
    tasks = Sim.resolve_tasks(requested, dataset_tasks, settings)      -> list[SimTask]
    Sim.default_max_steps(settings)                         policy steps per episode unless told otherwise
    Sim.result_fields(settings)                             what the results file records of the settings
    with Sim.make_env(tasks[0], image_sizes, max_steps) as env:        one env per task
        obs = env.reset(episode)      Meta-World: `episode` seeds the object/goal layout;
                                      LIBERO: initial state `episode mod 50`, then the settle steps
        obs, success, done = env.step(action)

where obs holds "state" and one uint8 (H, W, 3) frame per camera of `Sim.cameras`. Nothing here imports a
simulator's package: that happens when an env is made (or a task list is read), after `fplus.sim.gl` has chosen
MuJoCo's GL backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np

if TYPE_CHECKING:
    from fplus.settings import Settings


@dataclass(frozen=True)
class SimTask:
    """One task to roll out: `name` keys the results, `instruction` is what the policy reads."""

    name: str
    instruction: str
    spec: Any  # the simulator's own task: a Meta-World task name, a `LiberoTask`


class Simulator(ABC):
    """A closed-loop simulator: class attributes and class methods describe it, an instance is one task's env."""

    name: ClassVar[str]
    cameras: ClassVar[tuple[str, ...]]
    state_dim: ClassVar[int]
    action_dim: ClassVar[int]

    @classmethod
    @abstractmethod
    def check_available(cls) -> None:
        """Raise `SimulatorError` with the install command when the package is missing, without importing it (so
        that `fplus matrix` and `fplus doctor` can fail before training instead of after)."""

    @classmethod
    @abstractmethod
    def resolve_tasks(cls, requested: list[str] | None, dataset_tasks: list[str], settings: Settings) -> list[SimTask]:
        """The tasks to evaluate: `requested` (None: the simulator's default given the dataset and settings)."""

    @classmethod
    @abstractmethod
    def default_max_steps(cls, settings: Settings) -> int:
        """Policy steps per episode when the caller sets none."""

    @classmethod
    @abstractmethod
    def make_env(cls, task: SimTask, image_sizes: Sequence[int], max_steps: int | None) -> Simulator:
        """An env of `task` rendering camera i of `cameras` at `image_sizes[i]` px; `max_steps` None: the
        simulator's default where it has one."""

    @classmethod
    def result_fields(cls, settings: Settings) -> dict[str, Any]:
        """The settings that choose what is evaluated beyond the tasks, recorded in the results file (LIBERO: its
        suite); none by default."""
        return {}

    @abstractmethod
    def reset(self, episode: int) -> dict[str, np.ndarray]:
        """Start episode `episode` (the same episode always starts from the same state)."""

    @abstractmethod
    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool, bool]:
        """Apply one action: (observation, success, done)."""

    @abstractmethod
    def close(self) -> None:
        """Free the simulation and its renderer. Safe to call twice."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
