"""Table 1 analogue, measured instead of asserted: does the choice depend on the input, what does choosing
cost, what does it lose.

Per method at keep ratio rho (0.5) and its default placement, on a randomly initialized model (DeiT-S):

- input dependent / learned / merges: the method's own flags;
- selection overhead: wall time spent inside the method's calls (scoring, sorting, gathering, provenance
  bookkeeping), timed around every call by the engine's opt-in clock
  (:func:`patchslim.metrics.measure_selection_overhead`), in ms and in % of the slimmed forward, at each batch
  size. Time a method causes *outside* its calls (explicit attention in a block that would otherwise use
  fused attention) is not in this column; Table 3's efficiency shows it;
- attention computed for it: what the blocks it reads compute beyond the fused kernel (full ``[B, H, T, T]``
  probabilities, only the CLS rows, or just the keys), so that this cost, outside the selection time, is
  named beside it;
- own work <= 5 %: whether the selection time at the largest batch is at most 5 % of the slimmed forward (issue
  14's bound for the newer methods, read on DeiT-S at batch 32);
- selection GMACs: the multiply-adds the method reports for its selection, in % of the slimmed forward;
- accuracy loss at rho: top-1 lost against the unslimmed model, in percentage points, read from the
  accuracy table (``accuracy.csv``) when it exists, on the model that table was measured on.

The survey's asserted "Computational Overhead" is printed beside ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from patchslim.benchmarks import common
from patchslim.benchmarks.accuracy_table import NOT_MEASURED, load_accuracy


@dataclass
class Table1Config:
    """What Table 1 measures.

    Attributes:
        model: the model timed (random initialization).
        batch_sizes: images per forward.
        methods: method labels (None: every registered method).
        keep_ratio: rho per stage.
        repeats: timed runs per batch size (None: 15 for small forwards, 5 for large ones).
        warmup: untimed runs first (None: 2 / 1).
        device: where to run.
        accuracy: the accuracy table to read the loss from (missing: the column says so).
        stem: file name stem of the outputs.
    """

    model: str = "deit_small_patch16_224"
    batch_sizes: tuple[int, ...] = (1, 32)
    methods: tuple[str, ...] | None = None
    keep_ratio: float = 0.5
    repeats: int | None = None
    warmup: int | None = None
    device: str = "cpu"
    accuracy: str | Path = common.DEFAULT_OUT / "accuracy.csv"
    stem: str = "table1_overhead"

    def labels(self) -> list[str]:
        from patchslim.methods import method_names

        return list(self.methods) if self.methods else method_names()

    def jobs(self) -> list[tuple[str, int]]:
        return [(label, b) for label in self.labels() for b in self.batch_sizes]


# A method's own work (scoring, matching, PageRank) should stay within this share of its slimmed forward.
OWN_WORK_BOUND_PCT = 5.0


def attention_computed(model, plan) -> str:
    """What the forward computes for ``plan`` beyond fused attention, in words: ``full in 3 blocks`` (the
    ``[B, H, T, T]`` probabilities), ``CLS rows in 3 blocks`` (fused attention kept, the prefix rows beside it),
    ``keys in 6 blocks`` (keys averaged over heads, nothing explicit), or ``none``."""
    from patchslim.engine import attention_blocks

    actions = plan.resolve(model.spec.depth)
    full, rows = attention_blocks(plan, model.spec.depth, actions, has_prefix=model.spec.num_prefix_tokens > 0)
    keys = {a.attention_block for a in actions if a.method.needs_keys and a.attention_block is not None}
    parts = [f"{what} in {len(blocks)} block{'s' if len(blocks) > 1 else ''}"
             for what, blocks in (("full", full), ("CLS rows", rows), ("keys", keys - full - rows)) if blocks]
    return ", ".join(parts) or "none"


def run_table1(config: Table1Config, tick: common.Tick | None = None) -> common.BenchmarkResult:
    """Measures Table 1 (see the module docstring); ``tick(description)`` after every (method, batch)."""
    from patchslim import metrics
    from patchslim.engine import run
    from patchslim.methods import get_method
    from patchslim.models import load_model

    load_before = common.load_average()
    model = load_model(config.model, device=config.device, pretrained=False)
    labels = config.labels()
    variants = {v.label: v for v in common.variants(labels)}
    accuracy = load_accuracy(config.accuracy)
    by_label: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for label, batch in config.jobs():
        variant = variants[label]
        slim = get_method(variant.method)
        row = by_label.setdefault(label, dict(
            method=label, placement=common.placement(model, variant), input_dependent=slim.input_dependent,
            learned=slim.learned, merges=slim.merges, reads_attention=slim.needs_attention or slim.needs_keys,
            survey_overhead=common.SURVEY_OVERHEAD.get(variant.method, "(not in survey)"),
            model=config.model, keep_ratio=config.keep_ratio,
        ))
        plan, reason = common.variant_plan(model, variant, config.keep_ratio)
        if plan is None:
            skipped.setdefault(label, reason)
            row["note"] = reason
        else:
            images = common.random_images(model, batch)
            if "attention" not in row:
                row["attention"] = attention_computed(model, plan)
            if "selection_gmacs" not in row:
                report = metrics.count_macs(run(model, images[:1], plan))
                row["gmacs"] = report.gmacs
                row["selection_gmacs"] = report.selection / 1e9
                row["selection_gmacs_pct"] = 100 * report.selection / report.total
            small = batch * metrics.baseline_macs(model.spec).gmacs <= 50
            repeats = config.repeats or (15 if small else 5)
            warmup = config.warmup if config.warmup is not None else (2 if small else 1)
            overhead = metrics.measure_selection_overhead(model, images, plan, warmup=warmup, repeats=repeats)
            row[f"selection_ms_b{batch}"] = overhead.median_selection_ms
            row[f"forward_ms_b{batch}"] = overhead.median_forward_ms
            row[f"selection_pct_b{batch}"] = 100 * overhead.share
            row[f"repeats_b{batch}"] = repeats
        if tick:
            tick(f"table1 {label} b{batch}")

    rows = [by_label[label] for label in labels]
    loss_key = f"accuracy_loss_pp_rho{config.keep_ratio:g}"
    for row in rows:
        if accuracy is None:
            row[loss_key] = NOT_MEASURED
        else:
            row["accuracy_model"] = accuracy.model
            row[loss_key] = accuracy.loss_pp(row["method"], config.keep_ratio)

    columns = [("method", "method"), ("placement", "acts"), ("input_dependent", "input dependent"),
               ("learned", "learned"), ("survey_overhead", "survey: overhead")]
    for batch in config.batch_sizes:
        columns += [(f"selection_ms_b{batch}", f"selection ms (b{batch})"),
                    (f"selection_pct_b{batch}", f"% of slimmed forward (b{batch})")]
    largest = max(config.batch_sizes)
    for row in rows:
        share = row.get(f"selection_pct_b{largest}")
        row["own_work_within_5pct"] = None if share is None else share <= OWN_WORK_BOUND_PCT
    columns += [("own_work_within_5pct", f"own work <= {OWN_WORK_BOUND_PCT:g} % (b{largest})"),
                ("attention", "attention computed for it (not in its time)"),
                ("selection_gmacs_pct", "selection % of GMACs")]
    where = "" if accuracy is None else f", {accuracy.model}"
    columns += [(loss_key, f"top-1 loss (pp) at rho {config.keep_ratio:g}{where}")]
    body = (f"{config.model} (random initialization), rho = {config.keep_ratio:g} per stage, default placements; "
            "selection time = median over runs of the time spent inside the method's calls; % = median over runs "
            "of selection / slimmed forward.\n\n" + common.markdown_table(rows, columns, 2))
    notes = [f"skipped {label}: {reason}" for label, reason in skipped.items()]
    if accuracy is None:
        notes.append(f"top-1 loss: {NOT_MEASURED} ({Path(config.accuracy)} does not exist; `python -m "
                     "patchslim benchmark --which accuracy` writes it, then rerun this table)")
    else:
        base = "n/a" if accuracy.baseline_top1 is None else f"{100 * accuracy.baseline_top1:.2f} %"
        notes.append(f"top-1 loss read from {accuracy.path} ({accuracy.model}, unslimmed top-1 {base}); n/a where "
                     f"that table has no row for the method at rho {config.keep_ratio:g}")
    notes.append("time a method causes outside its own calls (explicit attention where fused attention would run) "
                 "is not counted here: the attention column names it, and Table 3's efficiency (measured / ideal "
                 "speed-up) shows its cost")
    return common.BenchmarkResult(
        name="table1", stem=config.stem,
        title="Table 1 analogue: adaptivity, selection overhead and accuracy loss, measured",
        rows=rows, body=body, notes=notes, load=(load_before, common.load_average()))
