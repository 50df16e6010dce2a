"""One observation message of a client, checked and mapped to the run's inputs (torch-free).

A message is a msgpack map (fplus.deploy.protocol). The data keys are settings (ServeSettings), with defaults that
read openpi's LIBERO example as it is:

    SERVE_IMAGE_KEY        observation/image        uint8 (H, W, 3): the run's main camera (IMAGE_KEY)
    SERVE_WRIST_IMAGE_KEY  observation/wrist_image  uint8 (H, W, 3): its wrist camera, when the run has WRIST_IMAGE_KEY
    SERVE_STATE_KEY        observation/state        (S,) real numbers: the proprio state, when the run has STATE_KEY
    SERVE_PROMPT_KEY       prompt                   the task instruction, a non-empty string

H, W are the frame size of the run's dataset; S its state size. Other keys are ignored. Control keys (fixed names):

    reset            True: this observation starts a new episode (the world-latent history restarts)
    observe_only     True: only add this frame to the episode's history, predict nothing (only the main camera is
                     read); so that a run with a world memory sees every control step's frame while the client
                     asks for a chunk every few steps
    action_prefix    (P, A) real numbers, raw action units: the actions of the previous chunk still to be executed
                     (real-time chunking); needs `inference_delay`
    inference_delay  int d, 0 <= d <= P: control steps that pass while this chunk is computed
    execution_horizon  optional int s with d <= H - s <= P: actions the client executes of each chunk (default
                     H - P: the whole prefix overlaps the new chunk); see fplus.deploy.chunking

Every problem is an ObservationError whose message is one line naming the key and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fplus.errors import DataError

RESET = "reset"
OBSERVE_ONLY = "observe_only"
ACTION_PREFIX = "action_prefix"
INFERENCE_DELAY = "inference_delay"
EXECUTION_HORIZON = "execution_horizon"


class ObservationError(DataError):
    """An observation the server cannot use (missing key, wrong shape or dtype, non-finite, too large)."""


@dataclass(frozen=True)
class ObservationSpec:
    """What the run needs from an observation, under the client's key names.

    image_keys: client keys of the cameras, main first; image_shape: (H, W, 3) of every camera.
    state_key / state_dim: None when the run reads no state. action_dim, horizon: of the run's chunks.
    """

    image_keys: tuple[str, ...]
    image_shape: tuple[int, int, int]
    state_key: str | None
    state_dim: int | None
    prompt_key: str
    action_dim: int
    horizon: int

    def describe(self) -> dict[str, Any]:
        """The observation layout for the metadata a client receives on connect."""
        return {"images": {k: list(self.image_shape) for k in self.image_keys},
                "state": None if self.state_key is None else {self.state_key: [self.state_dim]},
                "prompt": self.prompt_key,
                "control": [RESET, OBSERVE_ONLY, ACTION_PREFIX, INFERENCE_DELAY, EXECUTION_HORIZON]}


@dataclass
class Observation:
    """A checked observation: images (H, W, 3) uint8 per camera (main first, owned copies), state (S,) float32 or
    None, prompt (None for observe_only), the control flags, prefix (P, A) float32 or None, delay (int or None),
    horizon (the execution horizon s, or None: the policy's default)."""

    images: list[np.ndarray]
    state: np.ndarray | None
    prompt: str | None
    reset: bool = False
    observe_only: bool = False
    prefix: np.ndarray | None = None
    delay: int | None = None
    horizon: int | None = None


def _flag(msg: dict, key: str) -> bool:
    value = msg.get(key, False)
    if not isinstance(value, bool | np.bool_):
        raise ObservationError(f"`{key}` must be true or false, got {_what(value)}")
    return bool(value)


def _what(value: Any) -> str:
    """A short description of a received value: its type, and shape and dtype for an array."""
    if isinstance(value, np.ndarray):
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return f"a {type(value).__name__}"


def _real_array(msg: dict, key: str, shape: tuple[int | None, ...], what: str) -> np.ndarray:
    """msg[key] as a finite float32 array of `shape` (None: any size on that axis)."""
    value = msg[key]
    if isinstance(value, list | tuple):  # a plain msgpack list of numbers is fine too
        try:
            value = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise ObservationError(f"`{key}` must be {what}, got a list that is not numbers") from None
    want = "(" + ", ".join("n" if s is None else str(s) for s in shape) + (",)" if len(shape) == 1 else ")")
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
        raise ObservationError(f"`{key}` must be {what}: a real-valued array of shape {want}, got {_what(value)}")
    if value.ndim != len(shape) or any(s is not None and n != s for n, s in zip(value.shape, shape, strict=True)):
        raise ObservationError(f"`{key}` must have shape {want} ({what}), got {tuple(value.shape)}")
    out = value.astype(np.float32)  # a copy, native byte order
    if not np.isfinite(out).all():
        bad = np.argwhere(~np.isfinite(out))[0].tolist()
        raise ObservationError(f"`{key}` has non-finite values (first at index {bad}: {out[tuple(bad)]})")
    return out


def _image(msg: dict, key: str, shape: tuple[int, int, int]) -> np.ndarray:
    if key not in msg:
        raise ObservationError(f"the observation has no `{key}` (a uint8 image of shape {shape}); its keys: "
                               f"{', '.join(map(str, msg)) or 'none'} (map yours with SERVE_IMAGE_KEY / "
                               "SERVE_WRIST_IMAGE_KEY)")
    value = msg[key]
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8:
        raise ObservationError(f"`{key}` must be a uint8 image of shape {shape}, got {_what(value)}")
    if tuple(value.shape) != shape:
        hint = " (channels first? send H, W, 3)" if value.ndim == 3 and value.shape[0] == 3 else ""
        raise ObservationError(f"`{key}` has shape {tuple(value.shape)}; the run was trained on frames of shape "
                               f"{shape}{hint}: resize on the client (openpi_client.image_tools.resize_with_pad)")
    return np.array(value, copy=True)


def parse_observation(msg: Any, spec: ObservationSpec, supports_prefix: bool) -> Observation:
    """Check a decoded message against `spec` and return its inputs; ObservationError on any problem.

    `supports_prefix`: whether the policy takes an action prefix (else an observation carrying one is refused)."""
    if not isinstance(msg, dict):
        raise ObservationError(f"an observation must be a map of keys to values, got {_what(msg)}")
    reset, observe_only = _flag(msg, RESET), _flag(msg, OBSERVE_ONLY)
    if observe_only:
        return Observation([_image(msg, spec.image_keys[0], spec.image_shape)], None, None, reset, True)
    images = [_image(msg, k, spec.image_shape) for k in spec.image_keys]
    state = None
    if spec.state_key is not None:
        if spec.state_key not in msg:
            raise ObservationError(f"the observation has no `{spec.state_key}` (the proprio state, {spec.state_dim} "
                                   f"numbers); its keys: {', '.join(map(str, msg))} (map yours with SERVE_STATE_KEY)")
        state = _real_array(msg, spec.state_key, (spec.state_dim,), "the proprio state")
    prompt = msg.get(spec.prompt_key)
    if prompt is None:
        raise ObservationError(f"the observation has no `{spec.prompt_key}` (the task instruction); its keys: "
                               f"{', '.join(map(str, msg))} (map yours with SERVE_PROMPT_KEY)")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ObservationError(f"`{spec.prompt_key}` must be a non-empty string (the task instruction), got "
                               f"{_what(prompt)}")
    prefix = delay = horizon = None
    if ACTION_PREFIX in msg or INFERENCE_DELAY in msg or EXECUTION_HORIZON in msg:
        if not supports_prefix:
            raise ObservationError(f"this policy takes no `{ACTION_PREFIX}` / `{INFERENCE_DELAY}` (real-time "
                                   "chunking is not available in this fplus): send observations without them")
        if ACTION_PREFIX not in msg or INFERENCE_DELAY not in msg:
            raise ObservationError(f"`{ACTION_PREFIX}` and `{INFERENCE_DELAY}` go together: send both or neither")
        prefix = _real_array(msg, ACTION_PREFIX, (None, spec.action_dim), "the actions still to execute, raw")
        if not 1 <= len(prefix) <= spec.horizon:
            raise ObservationError(f"`{ACTION_PREFIX}` has {len(prefix)} actions; it must have 1 to {spec.horizon} "
                                   "(the run's chunk length)")
        delay = _integer(msg, INFERENCE_DELAY, 0, len(prefix), "the prefix length")
        if EXECUTION_HORIZON in msg:
            horizon = _integer(msg, EXECUTION_HORIZON, spec.horizon - len(prefix), spec.horizon - delay,
                               "H - P .. H - d: the prefix must cover the overlap H - s")
    return Observation(images, state, prompt, reset, False, prefix, delay, horizon)


def _integer(msg: dict, key: str, low: int, high: int, why: str) -> int:
    value = msg[key]
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise ObservationError(f"`{key}` must be an integer from {low} to {high} ({why}), got {_what(value)}")
    if not low <= value <= high:
        raise ObservationError(f"`{key}` must be an integer from {low} to {high} ({why}), got {value}")
    return int(value)
