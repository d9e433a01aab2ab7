"""Table 3 analogue: latency with and without slimming, the measured speed-up beside the ideal one.

For each model, batch size and method (at keep ratio rho, its default placement unless the label says
``method@blocks``), on a randomly initialized model (weights do not change the time): the unslimmed and the
slimmed forward run alternately (:func:`patchslim.metrics.compare_latency`, ABBA order), and

- speed-up = median over the (unslimmed, slimmed) pairs of the time ratio;
- ideal speed-up = unslimmed GMACs / slimmed GMACs (:func:`patchslim.metrics.compare_macs` on the Trace of
  the very batch that is timed, the selection's own multiply-adds included);
- efficiency = speed-up / ideal: 1.0 means every multiply-add saved became time saved;
- floor speed-up = unslimmed time / floor time, where the floor is the model's own timm blocks run on the token
  counts each block saw in the slimmed run (read from its Trace: per block, attention and MLP apart for a method
  acting inside a block), timed in the same rotation (:func:`patchslim.metrics.compare_latency` with
  ``floor=True``). Small matrix products on a CPU do not reach the GMAC ratio, least of all at batch 1, so the
  floor is what a slimming engine can reach on this machine;
- vs floor = floor time / slimmed time (median of the per-run ratios): 1.0 means the slimmed forward costs no
  more than the model's own blocks on its tokens; 0.95 means 5 % above the floor. Swin has no floor (its
  adapter says why, in the notes).
"""

from __future__ import annotations

from dataclasses import dataclass

from patchslim.benchmarks import common

DEFAULT_MODELS = ("vit_base_patch16_224", "deit_small_patch16_224", "deit_tiny_patch16_224",
                  "swin_tiny_patch4_window7_224")


@dataclass
class Table3Config:
    """What Table 3 measures.

    Attributes:
        models: model names (random initialization).
        batch_sizes: images per forward.
        methods: method labels (None: every registered method at its default placement).
        keep_ratio: rho per stage.
        repeats: timed (unslimmed, slimmed) pairs; None chooses by workload (see :func:`repeats_for`).
        warmup: untimed pairs first; None chooses by workload.
        device: where to run.
        stem: file name stem of the outputs.
    """

    models: tuple[str, ...] = DEFAULT_MODELS
    batch_sizes: tuple[int, ...] = (1, 32)
    methods: tuple[str, ...] | None = None
    keep_ratio: float = 0.5
    repeats: int | None = None
    warmup: int | None = None
    device: str = "cpu"
    stem: str = "table3_latency"

    def labels(self) -> list[str]:
        from patchslim.methods import method_names

        return list(self.methods) if self.methods else method_names()

    def jobs(self) -> list[tuple[str, int, str]]:
        return [(m, b, label) for m in self.models for b in self.batch_sizes for label in self.labels()]


def repeats_for(batch_gmacs: float, repeats: int | None = None, warmup: int | None = None) -> tuple[int, int]:
    """(warm-up pairs, timed pairs) for an unslimmed forward of ``batch_gmacs`` GMACs (whole batch): fewer
    for forwards that take seconds on a 2-core CPU, so the table finishes in minutes."""
    if batch_gmacs > 300:  # ViT-B/16 at batch 32: ~5 s per unslimmed forward here
        auto = (1, 3)
    elif batch_gmacs > 50:  # DeiT-S at batch 32
        auto = (1, 5)
    else:
        auto = (3, 15)
    return (auto[0] if warmup is None else warmup), (auto[1] if repeats is None else repeats)


def run_table3(config: Table3Config, tick: common.Tick | None = None) -> common.BenchmarkResult:
    """Measures Table 3 (see the module docstring); ``tick(description)`` after every (model, batch, method)."""
    from patchslim import metrics
    from patchslim.engine import run
    from patchslim.models import load_model

    load_before = common.load_average()
    variants = {v.label: v for v in common.variants(config.labels())}
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    loaded: dict[str, object] = {}
    for model_name, batch, label in config.jobs():
        if model_name not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[model_name] = load_model(model_name, device=config.device, pretrained=False)
        model = loaded[model_name]
        variant = variants[label]
        plan, reason = common.variant_plan(model, variant, config.keep_ratio)
        if plan is None:
            skipped[f"{label} on {model_name}"] = reason
        else:
            images = common.random_images(model, batch)
            trace = run(model, images, plan)  # the GMACs of the batch that is timed; also a warm-up
            macs = metrics.compare_macs(trace)
            warmup, repeats = repeats_for(macs.baseline_gmacs * batch, config.repeats, config.warmup)
            timing = metrics.compare_latency(model, images, plan, warmup=warmup, repeats=repeats, floor=True)
            if timing.floor_reason:
                skipped.setdefault(f"floor on {model_name}", timing.floor_reason)
            base, slim = timing.baseline, timing.slimmed
            rows.append(dict(
                model=model_name, batch=batch, method=label, placement=common.placement(model, variant),
                keep_ratio=config.keep_ratio, keep_ratio_reached=trace.keep_ratio,
                mean_keep_ratio=trace.mean_keep_ratio, baseline_gmacs=macs.baseline_gmacs, gmacs=macs.gmacs,
                flops_reduction_pct=100 * macs.reduction,
                baseline_ms=base.median_ms, slimmed_ms=slim.median_ms,
                baseline_iqr_ms=base.iqr_ms, slimmed_iqr_ms=slim.iqr_ms,
                baseline_ms_per_image=base.per_image_ms, slimmed_ms_per_image=slim.per_image_ms,
                latency_reduction_pct=100 * (1 - slim.median_ms / base.median_ms),
                speedup=timing.speedup, ideal_speedup=macs.ideal_speedup,
                efficiency=timing.efficiency(macs.ideal_speedup),
                floor_ms=None if timing.floor is None else timing.floor.median_ms,
                floor_speedup=timing.floor_speedup, vs_floor=timing.vs_floor,
                warmup=warmup, repeats=repeats, device=str(model.device),
            ))
        if tick:
            tick(f"table3 {model_name} b{batch} {label}")

    columns = [("method", "method"), ("placement", "acts"), ("mean_keep_ratio", "mean rho"),
               ("baseline_ms", "unslimmed ms"), ("slimmed_ms", "slimmed ms"), ("latency_reduction_pct", "latency -%"),
               ("speedup", "speed-up"), ("ideal_speedup", "ideal (GMAC ratio)"), ("efficiency", "efficiency"),
               ("floor_ms", "floor ms"), ("floor_speedup", "floor speed-up"), ("vs_floor", "vs floor"),
               ("slimmed_iqr_ms", "IQR ms"), ("repeats", "runs")]
    body = [f"Keep ratio rho = {config.keep_ratio:g} per stage, each method at its default placement unless "
            "its label says `@blocks`; random initialization; times are medians of the whole batch. `mean rho` "
            "is the share of patch tokens averaged over all blocks (what the compute follows).", ""]
    for model_name in config.models:
        for batch in config.batch_sizes:
            part = [r for r in rows if r["model"] == model_name and r["batch"] == batch]
            if part:
                body += [f"## {model_name}, batch {batch} (unslimmed {part[0]['baseline_gmacs']:.2f} GMACs per "
                         f"image, {part[0]['baseline_ms']:.1f} ms per batch)", "", common.markdown_table(part, columns)]
    notes = [f"skipped {what}: {reason}" for what, reason in skipped.items()]
    notes.append("speed-up = median over interleaved (unslimmed, slimmed, floor) runs of the time ratio; ideal = "
                 "unslimmed GMACs / slimmed GMACs (selection included); efficiency = speed-up / ideal; floor = the "
                 "model's own timm blocks on the token counts each block saw in the slimmed run; floor speed-up = "
                 "unslimmed / floor time; vs floor = floor time / slimmed time (1.0: no cost above the floor)")
    return common.BenchmarkResult(
        name="table3", stem=config.stem, title="Table 3 analogue: latency with and without patch slimming",
        rows=rows, body="\n".join(body), notes=notes, load=(load_before, common.load_average()))
