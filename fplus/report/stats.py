"""Small statistics for the seed aggregates of the report (no scipy: it is not a dependency).

    t975(2)                    -> 4.3026527            (Student t, 0.975 quantile, df = 2)
    mean_ci([1.0, 2.0, 3.0])   -> {mean 2.0, sd 1.0, ci95 [2 - 4.3027 / sqrt 3, 2 + ...], n 3}
    wilson(15, 30)             -> [0.3315, 0.6685]     (the closed loop's per-run interval, rounded)

The 95% interval of a mean over n values is mean +- t_{0.975, n-1} * s / sqrt(n), s the sample standard deviation
(n - 1 in the denominator); with one value there is no interval (None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Z975 = 1.959963984540054
"""The standard normal 0.975 quantile."""
T975 = (12.7062047, 4.3026527, 3.1824463, 2.7764451, 2.5705818, 2.4469119, 2.3646243, 2.3060041, 2.2621572,
        2.2281389, 2.2009852, 2.1788128, 2.1603687, 2.1447867, 2.1314495, 2.1199053, 2.1098156, 2.1009220,
        2.0930241, 2.0859634, 2.0796138, 2.0738731, 2.0686576, 2.0638986, 2.0595386, 2.0555294, 2.0518305,
        2.0484071, 2.0452296, 2.0422725)
"""t_{0.975, df} for df = 1..30 (T975[df - 1]), to 7 decimals."""


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom: the table for df <= 30, beyond it the normal
    quantile with its Cornish-Fisher correction in 1/df (terms to 1/df^3; error under 2e-6 at df = 31)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1 (got {df})")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3


def mean_ci(values: Sequence[float], bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """{mean, sd, ci95, n} of `values` (n >= 1): the Student t 95% interval of the mean (None for n = 1; sd is None
    too), clipped to `bounds` when given (a success rate cannot leave [0, 1])."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return {"mean": mean, "sd": None, "ci95": None, "n": 1}
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(bounds[0], lo), min(bounds[1], hi)
    return {"mean": mean, "sd": sd, "ci95": [lo, hi], "n": n}


def wilson(successes: int, episodes: int, z: float = 1.96) -> list[float] | None:
    """The Wilson score 95% interval of a success rate (None without episodes): the interval the closed loop writes
    per run (fplus.eval.closed_loop.wilson_interval, z = 1.96; not imported: the report sits below eval)."""
    if episodes <= 0:
        return None
    p = successes / episodes
    centre = (p + z * z / (2 * episodes)) / (1 + z * z / episodes)
    half = z * math.sqrt(p * (1 - p) / episodes + z * z / (4 * episodes * episodes)) / (1 + z * z / episodes)
    return [max(0.0, centre - half), min(1.0, centre + half)]
