"""How much the world latents vary between frames (numpy only): a check for degenerate latents.

A frozen encoder can map every frame to nearly the same vector. The audited raw demo latents had a per-dimension
std of 0.027 against a norm of 5.65 (ratio ~0.005) and a cosine of 0.999 between random frames of
different tasks: in that space "predict any latent" already scores cos ~1, so a cosine target on the raw latents is
trivial. fplus standardises the latents per dimension with the training split's statistics before the Prophet sees
them (so training still works), but the raw numbers say what the encoder gives.

`latent_spread` reports the spread; `degenerate` is ratio < DEGENERATE_RATIO = 0.05, ten times the audited case's
ratio (healthy latents have a spread of the order of their mean or larger: zero-mean features have ratio >> 1).
"""

from __future__ import annotations

import numpy as np

from fplus.errors import DataError

DEGENERATE_RATIO = 0.05
"""between_frame_std / mean_norm below this: the frames' latents are nearly one vector (see the module docstring)."""


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cos(a_i, b_i); NaN where a row is zero."""
    num = np.einsum("ij,ij->i", a, b)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _mean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def latent_spread(latents: np.ndarray, episode_of: np.ndarray | None = None, sample: int = 20000,
                  seed: int = 0) -> dict:
    """The between-frame spread of world latents (N frames, D dimensions), in float64.

    Args:
        latents: (N, D), any float dtype (a float16 memory map is fine: only the sampled rows are read).
        episode_of: (N,) episode index of every frame, for `cos_consecutive`; None skips it.
        sample: at most this many rows (a seeded random subset when N is larger) for the statistics and the
            random pairs, and at most this many consecutive pairs.
        seed: of the subsets.
    Returns:
        {mean_norm: norm of the per-dimension mean vector, between_frame_std: sqrt(mean over dimensions of the
        variance over frames), ratio: between_frame_std / mean_norm, cos_random_pairs: mean cosine between two
        different frames (every pair when there are at most `sample`, else `sample` random pairs),
        cos_consecutive: mean cosine between frames t and t+1 of the same episode (None without episode_of),
        degenerate: ratio < DEGENERATE_RATIO, frames: N, sampled: rows used}.
    """
    if latents.ndim != 2 or latents.shape[0] == 0:
        raise DataError(f"latents must be a non-empty (frames, dims) array, got shape {latents.shape}")
    if sample < 2:
        raise DataError(f"sample must be at least 2, got {sample}")
    n = latents.shape[0]
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, sample, replace=False)) if n > sample else np.arange(n)
    x = np.asarray(latents[rows], dtype=np.float64)

    mean_norm = float(np.linalg.norm(x.mean(axis=0)))
    between = float(np.sqrt(x.var(axis=0).mean()))
    ratio = between / mean_norm if mean_norm > 0 else (float("inf") if between > 0 else 0.0)

    m = len(x)
    if m < 2:
        cos_random = float("nan")
    elif m * (m - 1) // 2 <= sample:  # every pair, exactly
        i, j = np.triu_indices(m, k=1)
        cos_random = _mean(_cosines(x[i], x[j]))
    else:
        i = rng.integers(0, m, sample)
        j = (i + rng.integers(1, m, sample)) % m  # never i itself
        cos_random = _mean(_cosines(x[i], x[j]))

    cos_consecutive = None
    if episode_of is not None:
        episode_of = np.asarray(episode_of)
        if episode_of.shape != (n,):
            raise DataError(f"episode_of has shape {episode_of.shape}, expected ({n},) (one episode per frame)")
        t = np.flatnonzero(episode_of[:-1] == episode_of[1:])
        if t.size > sample:
            t = np.sort(rng.choice(t, sample, replace=False))
        if t.size:
            a = np.asarray(latents[t], dtype=np.float64)
            b = np.asarray(latents[t + 1], dtype=np.float64)
            cos_consecutive = _mean(_cosines(a, b))
        else:
            cos_consecutive = float("nan")

    return {"mean_norm": mean_norm, "between_frame_std": between, "ratio": ratio, "cos_random_pairs": cos_random,
            "cos_consecutive": cos_consecutive, "degenerate": bool(ratio < DEGENERATE_RATIO), "frames": n,
            "sampled": m}
