"""The simulator registry: names, dims, install checks, import without side effects, Meta-World's seeded layouts."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from fplus.errors import SimulatorError
from fplus.sim import libero as L
from fplus.sim.libero import LiberoEnv
from fplus.sim.metaworld import MetaWorldEnv
from fplus.sim.registry import SIMULATORS, get_simulator


def test_the_registry_names_one_class_per_simulator_with_its_dims():
    assert SIMULATORS == {"metaworld": MetaWorldEnv, "libero": LiberoEnv}
    assert get_simulator("metaworld") is MetaWorldEnv and get_simulator("libero") is LiberoEnv
    assert (MetaWorldEnv.cameras, MetaWorldEnv.state_dim, MetaWorldEnv.action_dim) == (("image",), 4, 4)
    assert (LiberoEnv.cameras, LiberoEnv.state_dim, LiberoEnv.action_dim) == (("image", "wrist_image"), 8, 7)


def test_an_unknown_simulator_suggests_the_closest_name():
    with pytest.raises(SimulatorError, match=r"^unknown closed-loop simulator 'metawrld'; did you mean 'metaworld'\? "
                                             r"valid: metaworld, libero$"):
        get_simulator("metawrld")
    with pytest.raises(SimulatorError, match=r"^unknown closed-loop simulator 'robocasa'; valid: metaworld, libero$"):
        get_simulator("robocasa")


def test_missing_packages_fail_with_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "metaworld" else
                        real_find_spec(name, *a))
    with pytest.raises(SimulatorError, match=r'^Meta-World is not installed: pip install -e "\.\[sim\]"$'):
        get_simulator("metaworld").check_available()
    monkeypatch.setattr(L, "installed_distribution", lambda: None)
    with pytest.raises(SimulatorError, match=r'^LIBERO is not installed \(optional extra\): pip install -e "\.\[lib'):
        get_simulator("libero").check_available()


def test_default_episode_lengths_come_from_the_settings():
    from types import SimpleNamespace

    settings = SimpleNamespace(data=SimpleNamespace(demo_max_steps=123), eval=SimpleNamespace(suite="libero_goal"))
    assert MetaWorldEnv.default_max_steps(settings) == 123
    assert LiberoEnv.default_max_steps(settings) == 300
    assert (MetaWorldEnv.result_fields(settings), LiberoEnv.result_fields(settings)) == ({}, {"suite": "libero_goal"})
    with pytest.raises(SimulatorError, match="unknown LIBERO suite 'libero_9'; valid: libero_spatial"):
        LiberoEnv.default_max_steps(SimpleNamespace(eval=SimpleNamespace(suite="libero_9")))


def test_importing_the_simulators_sets_no_gl_backend_and_imports_no_simulator():
    """In a fresh interpreter (a real process boundary: this one may have imported mujoco already)."""
    code = ("import fplus.sim.registry, fplus.sim.metaworld, fplus.sim.libero, sys, os; "
            "print(os.environ.get('MUJOCO_GL'), os.environ.get('PYOPENGL_PLATFORM'), "
            "[m for m in ('mujoco', 'metaworld', 'robosuite', 'libero', 'OpenGL') if m in sys.modules])")
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None", "[]"]


# Object and goal positions (raw observation [4:7] and [36:39]) after reset(seed), recorded with metaworld 3.1.1 from
# the implementation before the simulator classes (commit 9e5c116, reset flipping `_freeze_rand_vec` inline): the
# demo dataset and every closed-loop number depend on these layouts staying put.
LAYOUTS = {
    "reach-v3": {
        3: [-0.00418974, 0.61597389, 0.02, -0.0772656, 0.83912282, 0.17918505],
        0: [0.02132716, 0.67294966, 0.02, 0.08701448, 0.88158536, 0.05068463],
        1: [0.06554052, 0.64091991, 0.02, -0.09448818, 0.87535131, 0.18453583],
        1000: [-0.04369088, 0.67536816, 0.02, 0.07274442, 0.88053722, 0.11209317],
    },
    "push-v3": {
        3: [-0.00418974, 0.61597389, 0.01940468, -0.0772656, 0.83912282, 0.01940468],
        0: [0.02132716, 0.67294966, 0.01940468, 0.08701448, 0.88158536, 0.01940468],
        1: [0.06554052, 0.64091991, 0.01940468, -0.09448818, 0.87535131, 0.01940468],
        1000: [-0.04369088, 0.67536816, 0.01940468, 0.07274442, 0.88053722, 0.01940468],
    },
    "drawer-open-v3": {
        3: [-0.08287017, 0.73, 0.09, 0.01643241, 0.54, 0.09],
        0: [0.02739234, 0.73, 0.09, -0.09669447, 0.54, 0.09],
        1: [0.00236432, 0.73, 0.09, 0.08972989, 0.54, 0.09],
        1000: [0.00427715, 0.73, 0.09, -0.05935041, 0.54, 0.09],
    },
    "button-press-topdown-v3": {
        3: [0.01643241, 0.8094125, 0.30846152, 0.01643241, 0.80933323, 0.21499997],
        0: [-0.09669447, 0.88132666, 0.30846152, -0.09669447, 0.88124739, 0.21499997],
        1: [0.08972989, 0.83118278, 0.30846152, 0.08972989, 0.83110351, 0.21499997],
        1000: [-0.05935041, 0.85287554, 0.30846152, -0.05935041, 0.85279627, 0.21499997],
    },
}


@pytest.mark.parametrize("task", list(LAYOUTS))
def test_metaworld_layouts_of_a_seed_are_the_recorded_ones(task):
    pytest.importorskip("metaworld")
    with MetaWorldEnv(task, image_size=8, max_steps=10) as env:
        for seed in (3, 0, 1, 1000, 0):  # seed 0 twice: a layout does not depend on what ran before
            env.reset(seed)
            got = np.concatenate([env.raw_obs[4:7], env.raw_obs[36:39]])
            np.testing.assert_allclose(got, LAYOUTS[task][seed], rtol=0, atol=2e-8, err_msg=f"{task} seed {seed}")
