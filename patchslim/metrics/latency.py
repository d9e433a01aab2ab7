"""Wall-clock latency of a forward: warm-up, repeats, median and spread, and paired speed-ups.

These machines are noisy (other jobs, frequency scaling), so:

- every measurement starts with warm-up runs that are thrown away (allocator, thread pool, caches);
- the clock is read only after :func:`patchslim.device.synchronize`, so GPU kernels are finished;
- the summary is the median with the quartiles and min/max, never a mean;
- a speed-up is taken within one measurement, the baseline and the slimmed forward alternating run by
  run (ABAB...), and is the median of the per-pair ratios, so slow drift of the machine cancels;
- the *floor* (``compare_latency(..., floor=True)``) is the model's own modules run on the token counts each
  block saw in the slimmed run, with no slimming work (:meth:`patchslim.adapters.base.Adapter.floor`), timed in
  the same rotation. On a CPU at batch 1 small matrix products cannot reach the GMAC ratio, so the floor, not the
  ideal, is what a slimming engine can reach; ``vs_floor`` = floor time / slimmed time (median of the per-run
  ratios; 1.0: the engine adds nothing to the model's own blocks on those tokens).

Tests should assert the shape of these results, never wall-clock thresholds.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from patchslim.adapters.base import Adapter
from patchslim.device import synchronize
from patchslim.engine import run
from patchslim.plan import SlimPlan


@dataclass(frozen=True)
class Latency:
    """Timings of one forward (the whole batch), in milliseconds.

    Attributes:
        device: where it ran (``"cpu"``, ``"cuda:0"``...).
        batch_size: images per forward.
        warmup: runs thrown away before timing.
        samples_ms: one wall-clock time per timed run, in the order they ran.
    """

    device: str
    batch_size: int
    warmup: int
    samples_ms: tuple[float, ...]

    @property
    def repeats(self) -> int:
        return len(self.samples_ms)

    @property
    def median_ms(self) -> float:
        return float(statistics.median(self.samples_ms))

    @property
    def min_ms(self) -> float:
        return float(min(self.samples_ms))

    @property
    def max_ms(self) -> float:
        return float(max(self.samples_ms))

    @property
    def q1_ms(self) -> float:
        """First quartile (25th percentile, linear interpolation)."""
        return _quantile(self.samples_ms, 0.25)

    @property
    def q3_ms(self) -> float:
        """Third quartile (75th percentile)."""
        return _quantile(self.samples_ms, 0.75)

    @property
    def iqr_ms(self) -> float:
        """Interquartile range: the spread of the middle half of the runs."""
        return self.q3_ms - self.q1_ms

    @property
    def per_image_ms(self) -> float:
        """Median time per image (median / batch size)."""
        return self.median_ms / self.batch_size

    @property
    def images_per_second(self) -> float:
        return 1000.0 * self.batch_size / self.median_ms

    def to_dict(self) -> dict:
        return dict(device=self.device, batch_size=self.batch_size, warmup=self.warmup, repeats=self.repeats,
                    median_ms=self.median_ms, q1_ms=self.q1_ms, q3_ms=self.q3_ms, min_ms=self.min_ms,
                    max_ms=self.max_ms, per_image_ms=self.per_image_ms)


@dataclass(frozen=True)
class LatencyComparison:
    """The slimmed and the unslimmed forward timed in one interleaved measurement.

    Attributes:
        baseline: the unslimmed forward.
        slimmed: the slimmed forward.
        pair_ratios: baseline / slimmed time of each (baseline, slimmed) pair of runs.
    """

    baseline: Latency
    slimmed: Latency
    pair_ratios: tuple[float, ...]
    floor: Latency | None = None
    floor_reason: str = ""

    @property
    def speedup(self) -> float:
        """Median over the pairs of baseline time / slimmed time (> 1: slimming is faster)."""
        return float(statistics.median(self.pair_ratios))

    def efficiency(self, ideal_speedup: float) -> float:
        """Measured speed-up / ideal speed-up (e.g. the GMAC ratio): 1.0 turns every saved MAC into time."""
        return self.speedup / ideal_speedup

    @property
    def floor_speedup(self) -> float | None:
        """Median over the runs of baseline time / floor time: the speed-up of the model's own blocks on the
        slimmed token counts (None without a floor)."""
        if self.floor is None:
            return None
        return float(statistics.median(b / f for b, f in zip(self.baseline.samples_ms, self.floor.samples_ms)))

    @property
    def vs_floor(self) -> float | None:
        """Median over the runs of floor time / slimmed time: 1.0 means the slimmed forward is as fast as the
        model's own blocks on its token counts (None without a floor)."""
        if self.floor is None:
            return None
        return float(statistics.median(f / s for f, s in zip(self.floor.samples_ms, self.slimmed.samples_ms)))

    def to_dict(self) -> dict:
        out = dict(baseline=self.baseline.to_dict(), slimmed=self.slimmed.to_dict(), speedup=self.speedup)
        if self.floor is not None:
            out.update(floor=self.floor.to_dict(), floor_speedup=self.floor_speedup, vs_floor=self.vs_floor)
        elif self.floor_reason:
            out.update(floor_reason=self.floor_reason)
        return out


def time_function(fn: Callable[[], Any], device: torch.device | str = "cpu", warmup: int = 2,
                  repeats: int = 10, batch_size: int = 1) -> Latency:
    """Times ``fn()`` after ``warmup`` untimed calls, synchronizing the device around each call.

    Raises:
        ValueError: ``repeats`` < 1 or ``warmup`` < 0.
    """
    _check_counts(warmup, repeats)
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        samples.append(_timed(fn, device))
    return Latency(str(device), batch_size, warmup, tuple(samples))


def measure_latency(model, images: Any, plan: SlimPlan | None = None, *, warmup: int = 2,
                    repeats: int = 10) -> Latency:
    """Latency of ``patchslim.run(model, images, plan)`` (the whole batch).

    Args:
        model: a :class:`~patchslim.models.LoadedModel`.
        images: PIL image(s) or a ``[B, C, H, W]`` tensor; preprocessed once, outside the clock.
        plan: the plan (None: unslimmed).
        warmup: untimed runs first.
        repeats: timed runs.
    """
    batch = model.preprocess(images)
    return time_function(lambda: run(model, batch, plan), model.device, warmup, repeats, batch.shape[0])


def compare_latency(model, images: Any, plan: SlimPlan, baseline_plan: SlimPlan | None = None, *,
                    warmup: int = 2, repeats: int = 10, floor: bool = False,
                    baseline_model=None) -> LatencyComparison:
    """Times the unslimmed (``baseline_plan``) and the slimmed forward alternately, in one measurement.

    The order within a pair alternates (AB, BA, AB...) so neither side always runs on a warmer cache. With
    ``floor``, the floor forward (:func:`floor_forward`) joins the rotation (A B F, F B A, ...); where the model's
    adapter offers none, ``floor_reason`` says why and the rest is measured as without it.
    ``baseline_model``: the baseline runs on this model instead of ``model`` (e.g. fp32 against an int8 ``model``:
    both take the same preprocessed batch).
    """
    _check_counts(warmup, repeats)
    batch = model.preprocess(images)
    device = model.device
    reference = model if baseline_model is None else baseline_model

    def base() -> Any:
        return run(reference, batch, baseline_plan)

    def slim() -> Any:
        return run(model, batch, plan)

    runs = [base, slim]
    reason = ""
    if floor:
        try:
            runs.append(floor_forward(model, batch, run(model, batch, plan)))
        except NotImplementedError as exc:
            reason = str(exc)
    for _ in range(warmup):
        for fn in runs:
            fn()
    synchronize(device)
    samples: list[list[float]] = [[] for _ in runs]
    for i in range(repeats):
        order = range(len(runs)) if i % 2 == 0 else reversed(range(len(runs)))
        for k in order:
            samples[k].append(_timed(runs[k], device))
    n = batch.shape[0]
    base_ms, slim_ms = samples[0], samples[1]
    return LatencyComparison(
        baseline=Latency(str(device), n, warmup, tuple(base_ms)),
        slimmed=Latency(str(device), n, warmup, tuple(slim_ms)),
        pair_ratios=tuple(b / s for b, s in zip(base_ms, slim_ms)),
        floor=Latency(str(device), n, warmup, tuple(samples[2])) if len(runs) > 2 else None,
        floor_reason=reason,
    )


def floor_counts(trace) -> list[tuple[int, int]]:
    """Per block, (tokens its attention ran on, tokens its MLP ran on), prefix included, per image: what the
    floor forward runs on, read from a slimmed run's Trace."""
    return [(b.tokens_attention, b.tokens_mlp) for b in trace.blocks]


def floor_forward(model, images: torch.Tensor, trace) -> Callable[[], torch.Tensor]:
    """A function running the model's own modules on ``trace``'s token counts (``model.adapter.floor``), in
    inference mode and the model's precision, as :func:`patchslim.run` runs.

    Raises:
        NotImplementedError: the model's adapter has no floor forward (the reason in the message).
    """
    from patchslim.device import autocast

    adapter = model.adapter
    if type(adapter).floor is Adapter.floor:
        raise NotImplementedError(adapter.floor_reason)
    counts = floor_counts(trace)

    def forward() -> torch.Tensor:
        with torch.inference_mode(), autocast(model.device, model.precision):
            return adapter.floor(images, counts)

    return forward


@dataclass(frozen=True)
class SelectionOverhead:
    """Time the slimming methods spent choosing tokens (inside ``reduce``), against the whole forward.

    Measured per run with a clock around every method call (scoring, sorting, gathering, provenance);
    the blocks a method needs explicit attention for are *not* counted here (they show in the
    efficiency instead).

    Attributes:
        selection_ms: per timed run, the selection time summed over the plan's actions.
        forward_ms: per timed run, the whole slimmed forward (selection included).
        batch_size: images per forward.
        by_action: median milliseconds per action, keyed ``"method@block"``.
    """

    selection_ms: tuple[float, ...]
    forward_ms: tuple[float, ...]
    batch_size: int
    by_action: dict[str, float]

    @property
    def median_selection_ms(self) -> float:
        return float(statistics.median(self.selection_ms))

    @property
    def median_forward_ms(self) -> float:
        return float(statistics.median(self.forward_ms))

    @property
    def share(self) -> float:
        """Median over runs of selection / forward time, in [0, 1]."""
        return float(statistics.median(s / f for s, f in zip(self.selection_ms, self.forward_ms)))


def measure_selection_overhead(model, images: Any, plan: SlimPlan, *, warmup: int = 2,
                               repeats: int = 10) -> SelectionOverhead:
    """Times the method calls of a slimmed forward and the forward itself, run by run."""
    _check_counts(warmup, repeats)
    batch = model.preprocess(images)
    device = model.device
    for _ in range(warmup):
        run(model, batch, plan)
    synchronize(device)
    selection, forward, per_action = [], [], {}
    for _ in range(repeats):
        clock: list[tuple[str, int, float]] = []
        forward.append(_timed(lambda: run(model, batch, plan, clock=clock), device))
        selection.append(1000.0 * sum(seconds for _, _, seconds in clock))
        for method, block, seconds in clock:
            per_action.setdefault(f"{method}@{block}", []).append(1000.0 * seconds)
    return SelectionOverhead(tuple(selection), tuple(forward), batch.shape[0],
                             {k: float(statistics.median(v)) for k, v in per_action.items()})


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return 1000.0 * (time.perf_counter() - start)


def _quantile(values: tuple[float, ...], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def _check_counts(warmup: int, repeats: int) -> None:
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
