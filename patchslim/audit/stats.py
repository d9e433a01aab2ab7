"""Bootstrap intervals and the disparity test of an audit. Pure NumPy.

- :func:`mean_interval`: a mean (top-1 accuracy is the mean of 0/1 outcomes) with its percentile bootstrap
  interval (Efron & Tibshirani 1993, ch. 13).
- :func:`disparity`: the largest gap in accuracy drop between groups. Each image contributes its paired
  drop ``correct_before - correct_after`` (-1, 0 or 1); groups are resampled independently (a stratified
  bootstrap) and the gap between the worst and the best group is recomputed on every resample, which gives
  its 95 % interval. The worst and best groups are chosen *after* looking at the data, and with k groups
  there are k(k-1)/2 pairs that could have come out on top, so the flag ("hurt more than the others beyond
  the noise") asks for the interval at the Bonferroni-corrected level 1 - 0.05 / pairs to exclude zero.
  Groups with fewer than ``min_images`` images are left out of the test (too few to tell).

A mean of values taking few distinct values (accuracy, paired drops) is resampled exactly and cheaply as
a multinomial draw of the value counts, which has the same distribution as resampling the images.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

N_BOOT = 1000
LEVEL = 0.95
MIN_GROUP_IMAGES = 10


def rng_for(seed: int, *key: object) -> np.random.Generator:
    """A generator seeded by ``seed`` and a stable hash of ``key`` (the same numbers on every run)."""
    return np.random.default_rng([int(seed), zlib.crc32(repr(key).encode())])


def bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot]`` means of resamples (with replacement, same size) of ``values``.

    Raises:
        ValueError: no values.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    n = values.size
    if n == 0:
        raise ValueError("cannot bootstrap an empty sample")
    unique, counts = np.unique(values, return_counts=True)
    if unique.size <= 64:  # exact: a resample is a multinomial draw of the value counts
        draws = rng.multinomial(n, counts / n, size=n_boot)
        return draws @ unique / n
    out = np.empty(n_boot)
    chunk = max(1, 2_000_000 // n)
    for a in range(0, n_boot, chunk):
        b = min(a + chunk, n_boot)
        out[a:b] = values[rng.integers(0, n, size=(b - a, n))].mean(1)
    return out


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap samples."""
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(np.asarray(samples, dtype=np.float64), [tail, 1.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap interval (NaN when there is no data)."""

    value: float
    low: float
    high: float

    @staticmethod
    def empty() -> "Estimate":
        nan = float("nan")
        return Estimate(nan, nan, nan)


def mean_interval(values: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, key: object = (),
                  level: float = LEVEL) -> Estimate:
    """The mean of ``values`` with its percentile bootstrap interval."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Estimate.empty()
    low, high = percentile_interval(bootstrap_means(values, n_boot, rng_for(seed, key)), level)
    return Estimate(float(values.mean()), low, high)


@dataclass(frozen=True)
class Disparity:
    """The largest gap in accuracy drop between groups.

    Attributes:
        worst, best: the groups with the largest and the smallest mean drop ("" if fewer than 2 groups).
        worst_drop, best_drop: their mean drops (share of images, 0.05 = 5 points).
        gap: ``worst_drop - best_drop`` with its 95 % stratified bootstrap interval.
        adjusted_low: lower end of the gap's interval at the Bonferroni-corrected level.
        pairs: the number of group pairs the correction accounts for.
        flagged: the adjusted interval excludes zero: ``worst`` is hurt more beyond the noise.
        groups: groups tested.
        excluded: groups left out of the test (fewer than ``min_images`` images) with their sizes.
    """

    worst: str
    best: str
    worst_drop: float
    best_drop: float
    gap: Estimate
    adjusted_low: float
    pairs: int
    flagged: bool
    groups: int
    excluded: dict[str, int] = field(default_factory=dict)


def disparity(drops: Mapping[str, np.ndarray], n_boot: int = N_BOOT, seed: int = 0, key: object = (),
              level: float = LEVEL, min_images: int = MIN_GROUP_IMAGES) -> Disparity:
    """The worst-vs-best gap in mean per-image drop across groups, its interval, and the flag.

    Args:
        drops: group -> per-image paired drops (``correct_before - correct_after``).
        n_boot: bootstrap resamples.
        seed, key: seed the resampling (same inputs, same interval).
        level: the interval's confidence level.
        min_images: groups with fewer images are left out of the test.
    """
    sizes = {g: int(np.isfinite(np.asarray(v, dtype=np.float64)).sum()) for g, v in drops.items()}
    tested = {g: np.asarray(v, dtype=np.float64)[np.isfinite(np.asarray(v, dtype=np.float64))]
              for g, v in drops.items() if sizes[g] >= min_images}
    excluded = {g: n for g, n in sizes.items() if n < min_images}
    if len(tested) < 2:
        nan = float("nan")
        only = next(iter(tested), "")
        value = float(tested[only].mean()) if only else nan
        return Disparity(only, only, value, value, Estimate(nan, nan, nan), nan, 0, False, len(tested), excluded)
    means = {g: float(v.mean()) for g, v in tested.items()}
    worst = max(means, key=lambda g: (means[g], g))
    best = min(means, key=lambda g: (means[g], g))
    if worst == best:  # all equal: any two
        best = sorted(g for g in tested if g != worst)[0]
    rng = rng_for(seed, key)
    samples = bootstrap_means(tested[worst], n_boot, rng) - bootstrap_means(tested[best], n_boot, rng)
    low, high = percentile_interval(samples, level)
    pairs = len(tested) * (len(tested) - 1) // 2
    adjusted_low, _ = percentile_interval(samples, 1.0 - (1.0 - level) / pairs)
    gap = means[worst] - means[best]
    return Disparity(worst, best, means[worst], means[best], Estimate(gap, low, high), adjusted_low, pairs,
                     bool(adjusted_low > 0.0 and gap > 0.0), len(tested), excluded)


def disparity_sentence(d: Disparity, method: str, keep_ratio: float, by: str, budget: float | None = None) -> str:
    """The disparity in one plain sentence (gaps in percentage points); ``budget``: the compute budget the plan was
    found for, if it was."""
    amount = f"rho {keep_ratio:g}" if budget is None else f"budget {budget:g} (rho {keep_ratio:.3g})"
    where = f"{method} at {amount}, by {by}"
    if d.groups < 2:
        left = f" ({len(d.excluded)} groups with fewer images left out)" if d.excluded else ""
        return f"{where}: fewer than two groups with enough images to compare{left}."
    gap = 100 * d.gap.value
    interval = f"95 % interval {100 * d.gap.low:+.1f} to {100 * d.gap.high:+.1f} points"
    if d.flagged:
        return (f"{where}: '{d.worst}' is hurt more than the others beyond the noise: it loses "
                f"{100 * d.worst_drop:.1f} points of accuracy, '{d.best}' {100 * d.best_drop:.1f} "
                f"(gap {gap:.1f} points, {interval}; corrected for {d.pairs} pair(s) of groups).")
    return (f"{where}: no group is hurt more than the others beyond the noise (largest gap {gap:.1f} points, "
            f"'{d.worst}' vs '{d.best}', {interval}).")
