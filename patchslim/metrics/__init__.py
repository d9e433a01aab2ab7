"""Costs and effects of a slimmed forward, as plain functions of a Trace (or two).

Used alike by the CLI, the benchmarks and the app::

    from patchslim import metrics
    base, slim = patchslim.run(model, x), patchslim.run(model, x, plan)
    metrics.count_macs(slim).gmacs                 # analytic GMACs per image, per-block breakdown inside
    metrics.compare_macs(slim).reduction           # vs the unslimmed model
    metrics.prediction_change(base, slim).summary()
    metrics.compare_latency(model, x, plan).speedup   # timed, interleaved with the unslimmed forward
    metrics.compare_latency(model, x, plan, floor=True).vs_floor   # against the model's own blocks on its counts
    report, _ = metrics.measure_memory(model, x, plan) # activation peak: estimate + measured where possible
"""

from patchslim.metrics.flops import (  # noqa: F401
    BlockMacs,
    FlopsComparison,
    MacsReport,
    baseline_macs,
    block_macs,
    compare_macs,
    count_macs,
    gmacs,
    macs_for_tokens,
    measured_macs,
)
from patchslim.metrics.latency import (  # noqa: F401
    Latency,
    LatencyComparison,
    SelectionOverhead,
    compare_latency,
    floor_counts,
    floor_forward,
    measure_latency,
    measure_selection_overhead,
    time_function,
)
from patchslim.metrics.memory import (  # noqa: F401
    ActivationEstimate,
    MemoryComparison,
    MemoryReport,
    compare_memory,
    estimate_activation_memory,
    measure_memory,
)
from patchslim.metrics.predictions import PredictionChange, prediction_change  # noqa: F401
