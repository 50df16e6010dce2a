"""Segment an episode into CoC phases from its recorded actions (and, when given, the hand position in the state).

Gripper episodes (the gripper command closes at least once; command > `grip_threshold` = closed, which fits both
Meta-World, grip in [-1, 1] with > 0 closing, and LIBERO, -1 open / +1 close):

    approach  frames before the gripper closes
    grasp     from the close command until the hand moves again (at least `min_run` frames)
    move      the rest of the closed interval: the hand carries the object
    release   from the open command until the hand moves again; after the last release, to the episode end
    (several closed intervals repeat approach / grasp / move / release; an episode that starts closed has no
    approach or grasp; one that ends closed has no release)

Closed runs shorter than `min_run` frames are ignored and open gaps shorter than `min_run` between two closed
runs are filled, so a flickering command does not make phantom grasps.

Episodes without a gripper event (reach, push, press, open):

    approach  from the start to the contact point (or to `settle` when there is none)
    contact   from the contact point: the frame where the motion direction turns most (the angle between the mean
              velocity of the `w` frames before and after, w = max(2, active // 6)), if it turns by more than 45 deg
    settle    the trailing frames where the hand is still (at least `min_run` of them)

Motion: the per-frame velocity is the forward difference of the state's position dims when a state is given,
else the action's translation dims (the first three non-gripper dims). A frame is still when its speed is at most
`still_fraction` x the 90th percentile of the episode's speeds. Everything is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from fplus.errors import ConfigError, DataError

PhaseName = Literal["approach", "grasp", "move", "release", "contact", "settle"]
CONTACT_MIN_ANGLE_DEG = 45.0


@dataclass(frozen=True)
class Phase:
    """Frames [start, stop) of one phase; `direction` is the dominant motion direction (e.g. "down") or ""."""

    name: PhaseName
    start: int
    stop: int
    direction: str = ""

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class MotionSpec:
    """How to read an episode's motion.

    gripper_dim: action dim of the gripper command (negative counts from the end; -1 = last); None: no gripper.
    grip_threshold: a command above it means "closed".
    position_dims: state dims of the hand position (None: the first min(3, D) dims of the state).
    min_run: shortest gripper run (and settle run) in frames that counts.
    still_fraction: still = speed <= still_fraction x the 90th percentile speed of the episode.
    """

    gripper_dim: int | None = -1
    grip_threshold: float = 0.0
    position_dims: tuple[int, ...] | None = None
    min_run: int = 2
    still_fraction: float = 0.2


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of every True run of a boolean vector."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def closed_intervals(grip: np.ndarray, threshold: float, min_run: int) -> list[tuple[int, int]]:
    """[start, stop) intervals where the gripper command is closed, debounced (see the module docstring)."""
    runs = _runs(np.asarray(grip) > threshold)
    merged: list[tuple[int, int]] = []
    for start, stop in runs:
        if merged and start - merged[-1][1] < min_run:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return [(a, b) for a, b in merged if b - a >= min_run]


def _direction(velocity: np.ndarray) -> str:
    """Dominant direction of a (n, 3) velocity block: "up"/"down" for z, "along +x" etc. otherwise."""
    if velocity.shape[1] < 2 or len(velocity) == 0:
        return ""
    total = velocity.sum(0)
    if not np.any(total):
        return ""
    axis = int(np.argmax(np.abs(total)))
    sign = total[axis] > 0
    if axis == 2:
        return "up" if sign else "down"
    return f"along {'+' if sign else '-'}{'xyz'[axis]}"


def _translation_dims(action_dim: int, gripper_dim: int | None) -> list[int]:
    skip = None if gripper_dim is None else gripper_dim % action_dim
    return [d for d in range(action_dim) if d != skip][:3]


def episode_velocity(action: np.ndarray, state: np.ndarray | None, spec: MotionSpec) -> np.ndarray:
    """(T, k) per-frame hand velocity: forward difference of the state position, else the action's translation."""
    if state is not None:
        dims = list(spec.position_dims) if spec.position_dims is not None else list(range(min(3, state.shape[1])))
        if not dims or max(dims) >= state.shape[1] or min(dims) < -state.shape[1]:
            raise ConfigError(f"position dims {dims} do not fit a state of {state.shape[1]} dims")
        pos = state[:, dims].astype(np.float64)
        velocity = np.zeros_like(pos)
        velocity[:-1] = np.diff(pos, axis=0)
        return velocity
    dims = _translation_dims(action.shape[1], spec.gripper_dim)
    if not dims:
        return np.zeros((len(action), 1))
    return action[:, dims].astype(np.float64)


def still_mask(velocity: np.ndarray, still_fraction: float) -> np.ndarray:
    """(T,) True where the hand is (nearly) still, relative to the episode's own speeds."""
    speed = np.linalg.norm(velocity, axis=1)
    reference = float(np.percentile(speed, 90)) if len(speed) else 0.0
    if reference <= 0:
        return np.ones(len(speed), dtype=bool)
    return speed <= still_fraction * reference


def _first_moving(still: np.ndarray, start: int, stop: int) -> int:
    """First frame in [start, stop) where the hand moves, else stop."""
    moving = np.flatnonzero(~still[start:stop])
    return start + int(moving[0]) if len(moving) else stop


def segment_episode(action: np.ndarray, state: np.ndarray | None, spec: MotionSpec) -> list[Phase]:
    """The phases of one episode (see the module docstring); they tile [0, T) in order.

    Args:
        action: (T, A) actions. state: (T, S) proprio state or None.
    """
    action = np.asarray(action, dtype=np.float64)
    if action.ndim != 2 or len(action) == 0:
        raise DataError(f"an episode's actions must be (T, A) with T >= 1, got shape {action.shape}")
    if state is not None:
        state = np.asarray(state, dtype=np.float64)
        if state.ndim != 2 or len(state) != len(action):
            raise DataError(f"state shape {state.shape} does not match actions {action.shape}")
    n = len(action)
    if spec.gripper_dim is not None and not -action.shape[1] <= spec.gripper_dim < action.shape[1]:
        raise ConfigError(f"gripper dim {spec.gripper_dim} is outside the action's {action.shape[1]} dims")
    velocity = episode_velocity(action, state, spec)
    still = still_mask(velocity, spec.still_fraction)
    intervals = [] if spec.gripper_dim is None else closed_intervals(
        action[:, spec.gripper_dim], spec.grip_threshold, spec.min_run)
    phases = _gripper_phases(intervals, still, n, spec.min_run) if intervals else _motion_phases(velocity, still,
                                                                                               spec.min_run)
    return [Phase(p.name, p.start, p.stop, _direction(velocity[p.start:p.stop])) for p in phases]


def _gripper_phases(intervals: list[tuple[int, int]], still: np.ndarray, n: int, min_run: int) -> list[Phase]:
    phases: list[Phase] = []
    cursor = 0  # the first frame not yet in a phase
    for i, (start, stop) in enumerate(intervals):
        if start > cursor:
            phases.append(Phase("approach", cursor, start))
        if start == 0:
            phases.append(Phase("move", 0, stop))  # holding from the first frame: nothing to approach or grasp
        else:
            grasp_end = _first_moving(still, min(start + min_run, stop), stop)
            phases.append(Phase("grasp", start, grasp_end))
            if grasp_end < stop:
                phases.append(Phase("move", grasp_end, stop))
        if stop >= n:
            cursor = n
            break
        last = i == len(intervals) - 1
        release_end = n if last else _first_moving(still, min(stop + min_run, intervals[i + 1][0]), intervals[i + 1][0])
        phases.append(Phase("release", stop, release_end))
        cursor = release_end
    return phases


def _motion_phases(velocity: np.ndarray, still: np.ndarray, min_run: int) -> list[Phase]:
    n = len(velocity)
    moving = np.flatnonzero(~still)
    active_end = int(moving[-1]) + 1 if len(moving) else 0
    if n - active_end < min_run:
        active_end = n
    if active_end == 0:
        return [Phase("settle", 0, n)] if n >= min_run else [Phase("approach", 0, n)]
    contact = contact_point(velocity[:active_end])
    phases = [Phase("approach", 0, contact or active_end)]
    if contact:
        phases.append(Phase("contact", contact, active_end))
    if active_end < n:
        phases.append(Phase("settle", active_end, n))
    return phases


def contact_point(velocity: np.ndarray) -> int | None:
    """The frame where the motion direction turns most (by more than 45 deg), or None (see the module docstring)."""
    n = len(velocity)
    w = max(2, n // 6)
    best, best_cos = None, float(np.cos(np.deg2rad(CONTACT_MIN_ANGLE_DEG)))
    for t in range(w, n - w + 1):
        before, after = velocity[t - w:t].mean(0), velocity[t:t + w].mean(0)
        nb, na = np.linalg.norm(before), np.linalg.norm(after)
        if nb == 0 or na == 0:
            continue
        cos = float(before @ after / (nb * na))
        if cos < best_cos - 1e-12:
            best, best_cos = t, cos
    return best
