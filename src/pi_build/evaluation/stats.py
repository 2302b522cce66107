"""The confidence intervals of success rates (sample summaries: ``runtime.timing.summarize``)."""

from __future__ import annotations

import math

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a success rate (95% by default).

    Unlike the plain p +- z*sqrt(p(1-p)/n), it stays inside [0, 1] and does not collapse to a
    single point at 0 or n successes, which matters for the small trial counts of LIBERO tasks
    (50 per task, often 90-100% success). No trials: the whole range, [0, 1].
    """
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must lie in [0, trials]; got {successes} of {trials}")
    if trials == 0:
        return 0.0, 1.0
    n, p = trials, successes / trials
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 (or n) successes the bound is exactly 0 (or 1); the formula leaves a rounding error there.
    low = 0.0 if successes == 0 else centre - half_width
    high = 1.0 if successes == trials else centre + half_width
    return low, high
