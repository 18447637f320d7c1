"""Intervals for the evaluation's counts."""
from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927; Newcombe 1998, method 3).

    Chosen over the normal (Wald) interval because it stays inside [0, 1] and does not collapse to
    a point at 0 or n successes, which is exactly where a small retrieval count lands."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1 (got {successes}/{trials})")
    n, p = trials, successes / trials
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 or n successes the bound equals 0 or 1 exactly in real arithmetic; clamp the rounding.
    return max(0.0, centre - half), min(1.0, centre + half)
