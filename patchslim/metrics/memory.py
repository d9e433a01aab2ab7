"""Activation memory of a forward: an analytic estimate from the Trace, and a measured peak.

Weights do not shrink when tokens do, so memory here means the *activations* a forward allocates on top
of the weights and the input batch; the weights are reported beside them.

- **Estimate** (any device, a pure function of a Trace). Per block, the largest set of tensors alive at
  once in the engine's forward, per image, in elements (D width, D_i = heads * head_dim, F the MLP hidden
  width, H heads, T_a / T_m the tokens of the block's attention / MLP):

  - attention half, fused attention: residual + normed input + q, k, v (one tensor) + attention output
    + its reshaped copy = ``T_a (2 D + 5 D_i)``; fused attention keeps no ``T^2`` tensor; where a method
    reads CLS attention alone (EViT; ``attention`` with ``score=cls``), plus ``2 H P T_a`` for the prefix rows;
  - attention half, explicit attention (kept for maps, or read whole by a method): the larger of
    ``T_a (2 D + 3 D_i) + 2 H T_a^2`` (logits and probabilities during the softmax) and
    ``T_a (2 D + 5 D_i) + H T_a^2``;
  - MLP half: residual + normed input + hidden before and after GELU = ``T_m (2 D + 2 F)``, plus the
    probabilities (``H T_a^2``) or keys (their q, k, v tensor) a method acting before the next block will
    read;
  - attention maps the Trace keeps (``attention_blocks``), ``H T_a^2`` each, stay alive from their block on.

  The peak is the largest block, times batch size and bytes per element. It leaves out what a method
  allocates while it selects (ToMe's matching, provenance matrices). On DeiT-S (fp32, CPU) it agrees with
  the measured peak to within a few percent for pruning.
- **Measured**. On CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before the forward.
  On the CPU, torch keeps no peak statistic; we read the CPU allocator's own allocation and free events
  through ``torch.profiler`` (``profile_memory=True``) and take the peak of the bytes live among the
  allocations made during the forward. That is a real measurement of torch's tensors (not of the process:
  ``ru_maxrss`` never goes down and ``tracemalloc`` does not see torch), but the profiler slows the forward,
  so it is never combined with a latency measurement. Where neither is possible, ``measured_bytes`` is
  None and ``measured_how`` says why.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from patchslim.device import bytes_per_element, peak_memory_allocated, reset_peak_memory, supports_peak_memory
from patchslim.engine import attention_blocks
from patchslim.quantize import weights_bytes
from patchslim.trace import Trace

MB = 2 ** 20


@dataclass(frozen=True)
class ActivationEstimate:
    """Analytic peak activation memory of a forward (see the module docstring).

    Attributes:
        batch_size: images in the forward.
        bytes_per_element: 4 for fp32, 2 under bf16/fp16 autocast.
        per_block_bytes: per block, the larger of its attention and MLP halves plus the attention maps
            kept by earlier blocks, batch included.
        kept_attention_bytes: the attention maps kept, alive at the end.
    """

    batch_size: int
    bytes_per_element: int
    per_block_bytes: tuple[int, ...]
    kept_attention_bytes: int

    @property
    def peak_bytes(self) -> int:
        """The largest block (with the maps kept before it), or all kept maps at the end if larger."""
        return max(max(self.per_block_bytes, default=0), self.kept_attention_bytes)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / MB


def estimate_activation_memory(trace: Trace, bytes_per_element: int | None = None) -> ActivationEstimate:
    """The analytic activation peak of the forward a Trace records.

    Args:
        trace: from :func:`patchslim.run`.
        bytes_per_element: default from the precision the model ran in (fp32: 4), when known; else 4.
    """
    spec = trace.spec
    if bytes_per_element is None:
        bytes_per_element = 4
    actions = trace.plan.resolve(spec.depth, spec)  # with the spec: a Swin's plan may name stages
    explicit, prefix_rows = attention_blocks(trace.plan, spec.depth, actions, has_prefix=spec.num_prefix_tokens > 0)
    kept = trace.plan.attention_wanted(spec.depth)
    read_next_probs, read_next_keys = set(), set()
    for action in actions:
        if action.point == "pre" and action.attention_block is not None:
            (read_next_probs if action.method.needs_attention else read_next_keys).add(action.attention_block)
    prefix = spec.num_prefix_tokens
    scale = trace.batch_size * bytes_per_element
    per_block = []
    kept_elements = 0
    for block in trace.blocks:
        t_a, t_m, index = block.tokens_attention, block.tokens_mlp, block.index
        if spec.blocks:  # hierarchical (Swin): the block's own widths; attention squares per window
            shape = spec.blocks[index]
            width, inner, hidden, heads = shape.width, shape.num_heads * shape.head_dim, shape.mlp_hidden, shape.num_heads
        else:
            width, inner, hidden, heads = spec.embed_dim, spec.num_heads * spec.head_dim, spec.mlp_hidden, spec.num_heads
        square = heads * t_a * t_a // max(1, block.windows)
        # a windowed block that kept a subset holds its whole input too, to put the rest back in place
        parked = spec.block_tokens(index) * width if spec.blocks and t_a < spec.block_tokens(index) else 0
        if index in explicit:
            attention = max(t_a * (2 * width + 3 * inner) + 2 * square, t_a * (2 * width + 5 * inner) + square)
        else:  # fused; where a method reads CLS attention only, plus the prefix rows' logits and probabilities
            attention = t_a * (2 * width + 5 * inner) + (2 * heads * prefix * t_a if index in prefix_rows else 0)
        mlp = t_m * (2 * width + 2 * hidden)
        held = heads * prefix * t_a if index in prefix_rows else square
        mlp += (held if index in read_next_probs and index not in kept else 0)
        mlp += (3 * t_a * inner if index in read_next_keys else 0)
        per_block.append((max(attention, mlp) + parked + kept_elements) * scale)
        if index in kept:  # the kept map is the probabilities tensor counted above, alive from now on
            kept_elements += spec.block_tokens(index) if spec.blocks else square  # Swin keeps a one-row map
    return ActivationEstimate(trace.batch_size, bytes_per_element, tuple(per_block), kept_elements * scale)


def explicit_attention_blocks(trace: Trace) -> set[int]:
    """Blocks where the engine computed the full attention probabilities (kept, or read whole by a method);
    blocks whose readers want CLS attention alone keep fused attention (see ``engine.attention_blocks``)."""
    spec = trace.spec
    return attention_blocks(trace.plan, spec.depth, trace.plan.resolve(spec.depth, spec),
                            has_prefix=spec.num_prefix_tokens > 0)[0]


@dataclass(frozen=True)
class MemoryReport:
    """Activation memory of one forward (the whole batch).

    Attributes:
        device: where it ran.
        batch_size: images in the forward.
        estimate: the analytic estimate from the Trace.
        measured_bytes: measured peak of activations, or None when it cannot be had.
        measured_how: how it was measured, or why not.
        weights_bytes: the model's weights as stored (parameters and buffers; int8 layers at one byte per weight;
            unchanged by slimming).
    """

    device: str
    batch_size: int
    estimate: ActivationEstimate
    measured_bytes: int | None
    measured_how: str
    weights_bytes: int

    @property
    def activation_bytes(self) -> int:
        """The measured peak when there is one, else the estimate."""
        return self.measured_bytes if self.measured_bytes is not None else self.estimate.peak_bytes

    @property
    def activation_mb(self) -> float:
        return self.activation_bytes / MB

    @property
    def is_measured(self) -> bool:
        return self.measured_bytes is not None

    @property
    def estimated_mb(self) -> float:
        return self.estimate.peak_mb

    @property
    def measured_mb(self) -> float | None:
        return None if self.measured_bytes is None else self.measured_bytes / MB

    @property
    def weights_mb(self) -> float:
        return self.weights_bytes / MB

    def to_dict(self) -> dict:
        return dict(device=self.device, batch_size=self.batch_size, activation_mb=self.activation_mb,
                    estimated_mb=self.estimated_mb, measured_mb=self.measured_mb, measured_how=self.measured_how,
                    weights_mb=self.weights_mb)


def measure_memory(model, images: Any, plan=None, *, measure: bool = True,
                   quiet: bool = False) -> tuple[MemoryReport, Trace]:
    """Runs ``plan`` once and reports its activation memory, estimated and (where possible) measured.

    Args:
        model: a :class:`~patchslim.models.LoadedModel`.
        images: PIL image(s) or a ``[B, C, H, W]`` tensor (preprocessed before the measurement starts).
        plan: the plan (None: unslimmed).
        measure: False skips the measured figure (the estimate alone, at the cost of one plain forward).
        quiet: silence the profiler's native log lines on stderr while it runs (for command lines; it
            redirects the process's stderr briefly, so leave it off in servers).

    Returns:
        The report and the Trace of the forward.
    """
    from patchslim.engine import run

    batch = model.preprocess(images)
    device = model.device
    weights = weights_bytes(model.model)  # as stored: int8 layers at one byte per weight
    measured, how = None, "not measured (measure=False)"
    if not measure:
        trace = run(model, batch, plan)
    elif supports_peak_memory(device):
        before = reset_peak_memory(device)
        trace = run(model, batch, plan)
        measured, how = peak_memory_allocated(device) - before, "torch.cuda.max_memory_allocated"
    elif device.type == "cpu":
        trace, measured, how = _profile_cpu_peak(lambda: run(model, batch, plan), quiet)
    else:
        trace = run(model, batch, plan)
        how = f"no peak-memory statistics on {device.type}; estimate only"
    estimate = estimate_activation_memory(trace, bytes_per_element(model.precision))
    report = MemoryReport(str(device), batch.shape[0], estimate, measured, how, int(weights))
    return report, trace


@dataclass(frozen=True)
class MemoryComparison:
    """Activation memory slimmed vs unslimmed (same device, batch and way of measuring).

    Attributes:
        slimmed, baseline: the two reports.
    """

    slimmed: MemoryReport
    baseline: MemoryReport

    @property
    def reduction(self) -> float:
        """Share of activation memory saved (measured when both are measured, else estimated)."""
        if self.slimmed.is_measured and self.baseline.is_measured:
            return 1.0 - self.slimmed.activation_bytes / self.baseline.activation_bytes
        return self.estimated_reduction

    @property
    def estimated_reduction(self) -> float:
        return 1.0 - self.slimmed.estimate.peak_bytes / self.baseline.estimate.peak_bytes


def compare_memory(slimmed: MemoryReport, baseline: MemoryReport) -> MemoryComparison:
    """Pairs two reports for their reduction."""
    return MemoryComparison(slimmed, baseline)


def _profile_cpu_peak(fn, quiet: bool) -> tuple[Any, int | None, str]:
    """Runs ``fn`` under the torch profiler and returns (its result, peak live bytes, how)."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError as exc:  # pragma: no cover - depends on the torch build
        return fn(), None, f"torch profiler unavailable ({exc}); estimate only"
    with _stderr_silenced(quiet):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
    try:
        events = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
                events.append((event.start_time_ns, int(event.extra_fields.alloc_size)))
            stack.extend(event.children)
    except Exception as exc:  # private profiler API: degrade to the estimate, say why
        return result, None, f"could not read the profiler's allocation events ({type(exc).__name__}); estimate only"
    if not events:
        return result, None, "the profiler recorded no CPU allocations; estimate only"
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return result, peak, "torch.profiler CPU allocator events (peak live bytes during the forward)"


@contextlib.contextmanager
def _stderr_silenced(enabled: bool):
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
