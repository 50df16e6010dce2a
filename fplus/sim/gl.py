"""The offscreen OpenGL backend of MuJoCo, chosen when a simulator first needs mujoco (never at import of fplus).

MuJoCo (and robosuite) read `MUJOCO_GL` once, when they are imported. `import_mujoco()` sets it to `egl` unless the
user chose a backend, imports mujoco, and if our own EGL default cannot be loaded retries with OSMesa. Every
simulator calls it before it imports its package (which imports mujoco), so importing `fplus.sim.*` leaves both the
environment and `sys.modules` alone.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

from fplus.errors import SimulatorError

DEFAULT_GL = "egl"
FALLBACK_GL = "osmesa"


def import_mujoco() -> ModuleType:
    """The mujoco module, imported with `MUJOCO_GL` (default egl, osmesa when EGL cannot be loaded)."""
    if "mujoco" in sys.modules:  # already imported (by us or the caller): its backend is fixed
        os.environ.setdefault("MUJOCO_GL", DEFAULT_GL)
        return sys.modules["mujoco"]
    defaulted = "MUJOCO_GL" not in os.environ
    os.environ.setdefault("MUJOCO_GL", DEFAULT_GL)
    try:
        import mujoco
    except (ImportError, RuntimeError, AttributeError) as egl_error:  # what a missing libEGL raises on import
        if not defaulted:  # the user's own choice: tell them, do not override it
            raise SimulatorError(f"cannot load MuJoCo with MUJOCO_GL={os.environ['MUJOCO_GL']}: {egl_error}; "
                                 f"try MUJOCO_GL={FALLBACK_GL} or {DEFAULT_GL}") from egl_error
        for name in [m for m in sys.modules if m == "mujoco" or m.startswith(("mujoco.", "OpenGL"))]:
            del sys.modules[name]
        os.environ["MUJOCO_GL"] = FALLBACK_GL
        os.environ["PYOPENGL_PLATFORM"] = FALLBACK_GL
        try:
            import mujoco
        except (ImportError, RuntimeError, AttributeError) as osmesa_error:
            raise SimulatorError(
                f"cannot load an offscreen OpenGL backend for MuJoCo: EGL failed ({egl_error}) and OSMesa failed "
                f"({osmesa_error}); install EGL (libegl1) or OSMesa (libosmesa6)") from osmesa_error
    return mujoco
