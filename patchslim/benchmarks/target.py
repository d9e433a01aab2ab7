"""The performance target of the costs issue, checked: slimming must turn saved FLOPs into saved time.

On DeiT-S at batch 32 on this CPU, pruning to rho 0.5 at the input, and EViT-style at blocks 3, 6, 9
(0-based; EViT's 4th, 7th and 10th layers), must reach

- efficiency = measured speed-up / ideal speed-up (the GMAC ratio) >= 0.9, and
- selection overhead (time inside the method's calls: scoring, sorting, gathering, provenance) < 5 % of
  the slimmed forward.

Per method label: one interleaved latency comparison (as in Table 3, with more pairs) and one selection
overhead measurement (as in Table 1), each a median over runs.

The comparison also times the floor (the model's own timm blocks on the token counts each block saw in the
slimmed run, in the same rotation; :func:`patchslim.metrics.compare_latency` with ``floor=True``) and checks the
speed issue's target beside the older one: pruning within 5 % of the floor (floor time / slimmed time >= 0.95),
merging (a method that ``merges``) within 10 % (>= 0.90).
"""

from __future__ import annotations

from dataclasses import dataclass

from patchslim.benchmarks import common

DEFAULT_METHODS = ("random@0", "uniform@0", "grid@0", "entropy@0", "lowrank@0", "evit@3+6+9", "attention@3+6+9")
MIN_EFFICIENCY = 0.9
MAX_SELECTION_SHARE = 0.05
MIN_VS_FLOOR = {False: 0.95, True: 0.90}  # pruning, merging: floor time / slimmed time


@dataclass
class TargetConfig:
    """What the target check measures.

    Attributes:
        model: the model (random initialization).
        batch: images per forward.
        methods: method labels.
        keep_ratio: rho per stage.
        repeats: timed (unslimmed, slimmed) pairs for the speed-up.
        overhead_repeats: timed runs for the selection overhead.
        warmup: untimed pairs / runs first.
        device: where to run.
        stem: file name stem of the outputs.
    """

    model: str = "deit_small_patch16_224"
    batch: int = 32
    methods: tuple[str, ...] = DEFAULT_METHODS
    keep_ratio: float = 0.5
    repeats: int = 9
    overhead_repeats: int = 5
    warmup: int = 2
    device: str = "cpu"
    stem: str = "target"

    def jobs(self) -> list[str]:
        return list(self.methods)


def run_target(config: TargetConfig, tick: common.Tick | None = None) -> common.BenchmarkResult:
    """Measures the target (see the module docstring); ``tick(description)`` after every method."""
    from patchslim import metrics
    from patchslim.engine import run
    from patchslim.methods import get_method
    from patchslim.models import load_model

    load_before = common.load_average()
    model = load_model(config.model, device=config.device, pretrained=False)
    images = common.random_images(model, config.batch)
    variants = {v.label: v for v in common.variants(list(config.methods))}
    rows, skipped = [], {}
    for label in config.jobs():
        variant = variants[label]
        plan, reason = common.variant_plan(model, variant, config.keep_ratio)
        if plan is None:
            skipped[label] = reason
        else:
            macs = metrics.compare_macs(run(model, images, plan))
            timing = metrics.compare_latency(model, images, plan, warmup=config.warmup, repeats=config.repeats,
                                             floor=True)
            overhead = metrics.measure_selection_overhead(model, images, plan, warmup=1,
                                                          repeats=config.overhead_repeats)
            efficiency = timing.efficiency(macs.ideal_speedup)
            floor_goal = MIN_VS_FLOOR[bool(get_method(variant.method).merges)]
            rows.append(dict(
                model=config.model, batch=config.batch, method=label, placement=common.placement(model, variant),
                keep_ratio=config.keep_ratio, gmacs=macs.gmacs, baseline_gmacs=macs.baseline_gmacs,
                baseline_ms=timing.baseline.median_ms, slimmed_ms=timing.slimmed.median_ms,
                speedup=timing.speedup, ideal_speedup=macs.ideal_speedup, efficiency=efficiency,
                selection_ms=overhead.median_selection_ms, slimmed_forward_ms=overhead.median_forward_ms,
                selection_pct=100 * overhead.share,
                efficiency_met=efficiency >= MIN_EFFICIENCY, overhead_met=overhead.share < MAX_SELECTION_SHARE,
                met=efficiency >= MIN_EFFICIENCY and overhead.share < MAX_SELECTION_SHARE,
                floor_ms=None if timing.floor is None else timing.floor.median_ms,
                floor_speedup=timing.floor_speedup, vs_floor=timing.vs_floor, vs_floor_goal=floor_goal,
                floor_met=None if timing.vs_floor is None else timing.vs_floor >= floor_goal,
                repeats=config.repeats, overhead_repeats=config.overhead_repeats,
            ))
        if tick:
            tick(f"target {label}")

    columns = [("method", "method"), ("placement", "acts"), ("gmacs", "GMACs"), ("baseline_ms", "unslimmed ms"),
               ("slimmed_ms", "slimmed ms"), ("speedup", "speed-up"), ("ideal_speedup", "ideal (GMAC ratio)"),
               ("efficiency", "efficiency"), ("selection_ms", "selection ms"),
               ("selection_pct", "selection % of slimmed forward"), ("met", "target met"),
               ("floor_speedup", "floor speed-up"), ("vs_floor", "vs floor"), ("vs_floor_goal", "goal"),
               ("floor_met", "floor target met")]
    body = (f"{config.model} (random initialization), batch {config.batch}, rho = {config.keep_ratio:g} per stage. "
            f"Target: efficiency >= {MIN_EFFICIENCY:g} and selection < {100 * MAX_SELECTION_SHARE:g} % of the slimmed "
            f"forward. Speed-up: median of {config.repeats} interleaved pairs; selection: median of "
            f"{config.overhead_repeats} runs. Floor: the model's own timm blocks on the token counts each block saw "
            "in the slimmed run, timed in the same rotation; vs floor = floor time / slimmed time, goal >= "
            f"{MIN_VS_FLOOR[False]:g} for pruning and >= {MIN_VS_FLOOR[True]:g} for merging.\n\n"
            + common.markdown_table(rows, columns, 3))
    notes = [f"skipped {label}: {reason}" for label, reason in skipped.items()]
    return common.BenchmarkResult(
        name="target", stem=config.stem, title="Performance target: saved FLOPs turned into saved time",
        rows=rows, body=body, notes=notes, load=(load_before, common.load_average()))
