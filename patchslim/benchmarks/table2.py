"""Table 2 analogue, cost columns: FLOPs and memory reduction beside the accuracy table's top-1.

For every (method label, keep ratio) of the accuracy table (or the labels and ratios given), on the same
model: GMACs and their reduction (analytic, selection included) and the reduction of activation memory at
batch 1 and at a larger batch (:func:`patchslim.metrics.measure_memory`: on CPU the peak of live bytes from
the allocator's events through the torch profiler, on CUDA the peak allocated; the analytic estimate
beside it), joined with the table's top-1 and its loss. Labels follow the accuracy table (``entropy@0`` =
entropy acting at the input).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from patchslim.benchmarks import common
from patchslim.benchmarks.accuracy_table import NOT_MEASURED, load_accuracy

DEFAULT_RATIOS = (1.0, 0.9, 0.7, 0.5, 0.3)


@dataclass
class Table2Config:
    """What Table 2's cost columns measure.

    Attributes:
        model: the model (None: the accuracy table's, else the bundled ``fashion-vit``).
        methods: method labels (None: the accuracy table's, else every registered method).
        keep_ratios: keep ratios (None: the accuracy table's, else 1.0, 0.9, 0.7, 0.5, 0.3).
        batch: the larger batch size for memory (batch 1 is always measured).
        pretrained: load the model's trained weights when there are (memory and GMACs do not depend on them;
            a missing checkpoint falls back to random initialization).
        accuracy: the accuracy table to join.
        stem: file name stem of the outputs.
    """

    model: str | None = None
    methods: tuple[str, ...] | None = None
    keep_ratios: tuple[float, ...] | None = None
    batch: int = 32
    pretrained: bool = True
    accuracy: str | Path = common.DEFAULT_OUT / "accuracy.csv"
    stem: str = "table2_costs"

    def resolved(self) -> tuple[str, list[str], list[float]]:
        """(model, labels, keep ratios) after reading the accuracy table for what is not given."""
        from patchslim.methods import method_names

        accuracy = load_accuracy(self.accuracy)
        model = self.model or (accuracy.model if accuracy else "fashion-vit")
        same = accuracy is not None and accuracy.model == model
        labels = list(self.methods) if self.methods else (accuracy.labels if same else method_names())
        ratios = list(self.keep_ratios) if self.keep_ratios else (accuracy.keep_ratios if same
                                                                  else list(DEFAULT_RATIOS))
        return model, labels, sorted(set(ratios), reverse=True)

    def jobs(self) -> list[tuple[str, float]]:
        _, labels, ratios = self.resolved()
        return [(label, rho) for label in labels for rho in ratios]


def run_table2(config: Table2Config, tick: common.Tick | None = None) -> common.BenchmarkResult:
    """Measures Table 2's cost columns (see the module docstring); ``tick`` after every (method, rho)."""
    from patchslim import metrics
    from patchslim.errors import PatchslimError
    from patchslim.models import load_model

    load_before = common.load_average()
    model_name, labels, ratios = config.resolved()
    accuracy = load_accuracy(config.accuracy)
    joined = accuracy is not None and accuracy.model == model_name
    model = None
    if config.pretrained:
        try:
            model = load_model(model_name, device="cpu")
        except PatchslimError:
            model = None
    if model is None:
        model = load_model(model_name, device="cpu", pretrained=False)
    variants = {v.label: v for v in common.variants(labels)}
    batches = sorted({1, max(1, config.batch)})
    images = _images(model, batches[-1])
    base_memory = {b: metrics.measure_memory(model, images[:b], None, quiet=True)[0] for b in batches}
    base_gmacs = metrics.baseline_macs(model.spec).gmacs
    rows, skipped = [], {}
    for label, rho in config.jobs():
        plan, reason = common.variant_plan(model, variants[label], rho)
        if plan is None:
            skipped.setdefault(label, reason)
            if tick:
                tick(f"table2 {label} rho {rho:g}")
            continue
        row = dict(model=model_name, method=label, placement=common.placement(model, variants[label]), keep_ratio=rho)
        try:
            for b in batches:
                report, trace = metrics.measure_memory(model, images[:b], plan, quiet=True)
                change = metrics.compare_memory(report, base_memory[b])
                if b == 1:
                    macs = metrics.count_macs(trace)
                    row.update(keep_ratio_reached=trace.keep_ratio, mean_keep_ratio=trace.mean_keep_ratio,
                               gmacs=macs.gmacs, baseline_gmacs=base_gmacs,
                               flops_reduction_pct=100 * (1 - macs.gmacs / base_gmacs))
                row[f"memory_mb_b{b}"] = report.activation_mb
                row[f"baseline_memory_mb_b{b}"] = base_memory[b].activation_mb
                row[f"memory_reduction_pct_b{b}"] = 100 * change.reduction
                row[f"estimated_memory_reduction_pct_b{b}"] = 100 * change.estimated_reduction
        except PatchslimError as exc:
            skipped.setdefault(f"{label} at rho {rho:g}", str(exc).split(". ")[0])
        else:
            if accuracy is not None:
                row["top1_pct"] = accuracy.top1_pct(label, rho) if joined else NOT_MEASURED
                row["top1_loss_pp"] = accuracy.loss_pp(label, rho) if joined else NOT_MEASURED
            else:
                row["top1_pct"] = row["top1_loss_pp"] = NOT_MEASURED
            rows.append(row)
        if tick:
            tick(f"table2 {label} rho {rho:g}")

    columns = [("method", "method"), ("placement", "acts"), ("keep_ratio", "rho"), ("mean_keep_ratio", "mean rho"),
               ("top1_pct", "top-1 %"), ("top1_loss_pp", "loss (pp)"), ("gmacs", "GMACs"),
               ("flops_reduction_pct", "FLOPs red. %")]
    for b in batches:
        columns += [(f"memory_reduction_pct_b{b}", f"memory red. % (b{b})")]
    columns += [(f"estimated_memory_reduction_pct_b{batches[-1]}", f"est. memory red. % (b{batches[-1]})")]
    first = base_memory[batches[0]]
    body = (f"{model_name} ({model.weights_source}); unslimmed {base_gmacs:.4f} GMACs per image; activation peak "
            + ", ".join(f"{base_memory[b].activation_mb:.2f} MB at batch {b}" for b in batches)
            + f" ({first.measured_how}); weights {first.weights_mb:.2f} MB (unchanged by slimming, not in the "
            "memory columns).\n\n" + common.markdown_table(rows, columns, 2))
    notes = [f"skipped {what}: {reason}" for what, reason in skipped.items()]
    if accuracy is None:
        notes.append(f"top-1: {NOT_MEASURED} ({Path(config.accuracy)} does not exist; `python -m "
                     "patchslim benchmark --which accuracy` writes it, then rerun this table)")
    elif not joined:
        notes.append(f"top-1: the accuracy table is on {accuracy.model}, not {model_name}")
    else:
        base = "n/a" if accuracy.baseline_top1 is None else f"{100 * accuracy.baseline_top1:.2f} %"
        notes.append(f"top-1 from {accuracy.path} (unslimmed {base})")
    notes.append("memory = peak activation bytes of the forward (the peak over blocks, measured): a method that "
                 "slims after the first blocks keeps the unslimmed peak of those blocks, so its memory reduction "
                 "is small even when its FLOPs reduction is large")
    return common.BenchmarkResult(
        name="table2", stem=config.stem, title="Table 2 analogue: FLOPs and memory reduction beside top-1",
        rows=rows, body=body, notes=notes, load=(load_before, common.load_average()))


def _images(model, batch: int):
    """Real images when the bundled sample fits the model (memory does not depend on content), else noise."""
    from patchslim import bundled

    if bundled.is_bundled(model.name):
        try:
            sample, _ = bundled.load_bundled_sample()
            if len(sample) >= batch:
                return bundled.to_model_input(sample[:batch])
        except Exception:  # a missing or unreadable sample: noise has the same shape
            pass
    return common.random_images(model, batch)
