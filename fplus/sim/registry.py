"""The closed-loop simulators by name (`EVAL_SIM`, `fplus eval --sim`): one `fplus.sim.base.Simulator` class each.

    Sim = get_simulator("libero")                 # SimulatorError with "did you mean" and the valid names
    Sim.check_available()                         # before training: the package is installed (not imported)
    tasks = Sim.resolve_tasks(None, dataset_tasks, settings)
    with Sim.make_env(tasks[0], image_sizes, Sim.default_max_steps(settings)) as env:
        obs = env.reset(episode)
        obs, success, done = env.step(action)

Importing this module imports no simulator package and sets no environment variable (see `fplus.sim.gl`).
"""

from __future__ import annotations

import difflib

from fplus.errors import SimulatorError
from fplus.sim.base import SimTask, Simulator
from fplus.sim.libero import LiberoEnv
from fplus.sim.metaworld import MetaWorldEnv

__all__ = ["SIMULATORS", "SimTask", "Simulator", "get_simulator"]

SIMULATORS: dict[str, type[Simulator]] = {sim.name: sim for sim in (MetaWorldEnv, LiberoEnv)}


def get_simulator(name: str) -> type[Simulator]:
    """The simulator class registered as `name`."""
    if name in SIMULATORS:
        return SIMULATORS[name]
    close = difflib.get_close_matches(name, SIMULATORS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise SimulatorError(f"unknown closed-loop simulator {name!r}; {hint}valid: {', '.join(SIMULATORS)}")
