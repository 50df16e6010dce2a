"""Index windows of a training sample (DESIGN 3), vectorised over a batch of frames.

For a frame at global index t in an episode whose frames are the rows [start, stop):
    action chunk  a[t .. t+H-1]   indices clamped to stop-1, `action_pad` True where the chunk ran past the end
    world history z[t-T+1 .. t]   indices clamped to start (the first frame repeats)
    world future  z[t+1 .. t+K]   indices clamped to stop-1, `future_valid` False past the end
All indices are global row indices into the dataset's frame table (and into the latent cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Windows:
    """Index windows for B frames.

    Attributes:
        action: (B, H) int64 rows of the action chunk.
        action_pad: (B, H) bool, True where the step lies past the episode end (masked in the loss).
        history: (B, T) int64 rows of the world history, oldest first, the last one is t itself.
        future: (B, K) int64 rows of the future latents.
        future_valid: (B, K) bool, False where the step lies past the episode end.
    """

    action: np.ndarray
    action_pad: np.ndarray
    history: np.ndarray
    future: np.ndarray
    future_valid: np.ndarray


def sample_windows(t: np.ndarray, start: np.ndarray, stop: np.ndarray, horizon: int, history: int,
                   future: int) -> Windows:
    """Windows for frames t (B,) with their episodes' row bounds start (B,) and stop (B,) (exclusive).

    Args:
        horizon: H, actions per chunk (>= 1). history: T (>= 1). future: K (>= 0).
    """
    t = np.asarray(t, dtype=np.int64)[:, None]
    start = np.asarray(start, dtype=np.int64)[:, None]
    last = np.asarray(stop, dtype=np.int64)[:, None] - 1
    if np.any(t < start) or np.any(t > last):
        raise ValueError("every frame t must lie inside its episode [start, stop)")
    ahead = t + np.arange(horizon)
    fut = t + 1 + np.arange(future)
    return Windows(
        action=np.minimum(ahead, last),
        action_pad=ahead > last,
        history=causal_window(t[:, 0], start[:, 0], history),
        future=np.minimum(fut, last),
        future_valid=fut <= last,
    )


def causal_window(t: np.ndarray, start: np.ndarray, length: int) -> np.ndarray:
    """Rows [t-length+1 .. t] for each t (B,), clamped at the episode start (B,): (B, length), oldest first."""
    t = np.asarray(t, dtype=np.int64)[:, None]
    return np.maximum(t - length + 1 + np.arange(length), np.asarray(start, dtype=np.int64)[:, None])


def episode_bounds(episode_of_frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row bounds of each frame's episode from the (N,) episode_index column (episodes stored contiguously).

    Returns:
        start (N,), stop (N,) int64: the frame's episode occupies rows [start, stop).
    """
    e = np.asarray(episode_of_frame)
    n = len(e)
    change = np.nonzero(np.diff(e))[0] + 1
    starts = np.concatenate(([0], change))
    stops = np.concatenate((change, [n]))
    if len(np.unique(e[starts])) != len(starts):
        raise ValueError("episodes are not stored contiguously")
    lengths = stops - starts
    return np.repeat(starts, lengths).astype(np.int64), np.repeat(stops, lengths).astype(np.int64)
