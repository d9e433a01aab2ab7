"""Accuracy at equal cost: every slimming method on the bundled model at the same compute budgets.

    python -m patchslim benchmark --which budgets                   # full 10,000-image canvas test set
    python -m patchslim benchmark --which budgets --data bundled    # the 500 shipped sample images

At a budget F (a fraction of the unslimmed GMACs) each method runs the plan that costs F within 2 %
(:func:`patchslim.budget.plan_for_budget`: its keep ratio, or its own knob, searched on the analytic count), at its
default placement. The table ranks the methods by top-1 at the middle budget (0.5 by default) and gives the rho
each one needed and the cost it reached; a method that cannot meet a budget at its placement is named with the
range it can reach. Writes ``budgets.{csv,json,md,html,png}`` and ``budgets_vs_compute.{html,png}``
(:func:`patchslim.evaluate.write_outputs`). Accuracy, not timing: it may run on a busy machine.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchslim.benchmarks import common

DEFAULT_BUDGETS = (0.7, 0.5, 0.35)
# The target: at half the unslimmed GMACs, the best training-free method loses at most this many points.
TARGET_BUDGET = 0.5
TARGET_LOSS_PP = 0.5


def default_methods() -> list[str]:
    """Every registered method, at its default placement."""
    from patchslim.methods import method_names

    return method_names()


@dataclass
class BudgetsConfig:
    """What the equal-cost table evaluates.

    Attributes:
        model: the model (its trained weights; ``pretrained=False`` for random ones, in tests).
        pretrained: load the trained weights.
        data: labelled images (``fashion-mnist``: all 10,000 canvas test images; ``bundled``: the 500 shipped).
        methods: method labels (None: every registered method).
        budgets: fractions of the unslimmed GMACs; the table is ranked at ``rank_budget``.
        rank_budget: the budget the ranking reads (default: ``TARGET_BUDGET`` if listed, else the middle one).
        limit: evaluate at most this many images (evenly spaced).
        batch_size: images per forward.
        progress: show the evaluation's own progress bar.
        stem: file name stem of the outputs.
    """

    model: str = "fashion-vit"
    pretrained: bool = True
    data: str = "fashion-mnist"
    methods: tuple[str, ...] | None = None
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    rank_budget: float | None = None
    limit: int | None = None
    batch_size: int = 500
    progress: bool = True
    stem: str = "budgets"

    def jobs(self) -> list[str]:
        return ["budgets"]  # one evaluation, with its own per-image progress bar

    @property
    def ranked_at(self) -> float:
        if self.rank_budget is not None:
            return self.rank_budget
        if TARGET_BUDGET in self.budgets:
            return TARGET_BUDGET
        return sorted(self.budgets)[len(self.budgets) // 2]


@dataclass
class BudgetsRun:
    """The evaluated table, before and after writing (the interface of
    :class:`~patchslim.benchmarks.common.BenchmarkResult`)."""

    name: str
    stem: str
    result: Any  # patchslim.evaluate.EvaluationResult
    ranked_at: float
    seconds: float | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def write(self, out: str | Path, command: str | None = None, png: bool = True) -> dict[str, Path]:
        """``write_outputs`` with the ranked table first; the markdown and JSON name ``command``."""
        from patchslim.evaluate import write_outputs

        self.files = write_outputs(self.result, out, stem=self.stem, png=png, command=command,
                                   intro=ranked_markdown(self.result, self.ranked_at))
        return self.files

    def summary(self) -> str:
        took = f"\nTook {common.duration(self.seconds)}.\n" if self.seconds is not None else ""
        return ranked_markdown(self.result, self.ranked_at) + "\n" + self.result.markdown() + took


def ranking(result, budget: float) -> list[dict]:
    """One dict per method, ranked by top-1 at ``budget`` (methods without a plan there last): ``method``,
    ``learned``, per budget ``top1``, ``keep_ratio`` and ``reached`` (None where refused), ``loss_pp`` at ``budget``."""
    from patchslim.methods import get_method

    rows = []
    for method in dict.fromkeys([*result.methods, *(w.split(" at budget ")[0] for w in result.refused)]):
        entry: dict[str, Any] = dict(method=method, learned=get_method(method.split("@")[0]).learned, cells={})
        for column in result.columns:
            try:
                row = result.cell(method, column)
            except KeyError:
                entry["cells"][column] = None
                continue
            entry["cells"][column] = dict(top1=row.top1, keep_ratio=row.keep_ratio,
                                          keep_ratio_reached=row.keep_ratio_reached, reached=row.budget_reached)
        at = entry["cells"].get(budget)
        entry["top1"] = None if at is None else at["top1"]
        entry["loss_pp"] = None if at is None else 100 * (result.baseline_top1 - at["top1"])
        rows.append(entry)
    rows.sort(key=lambda e: (e["top1"] is None, -(e["top1"] or 0.0)))
    return rows


def ranked_markdown(result, budget: float) -> str:
    """The ranking at ``budget`` as markdown, with the target's verdict and every refusal."""
    ranked = ranking(result, budget)
    columns = result.columns
    head = ("| rank | method | training-free | " + " | ".join(f"top-1 at {c:g}" for c in columns)
            + f" | loss at {budget:g} (points) | " + " | ".join(f"rho at {c:g}" for c in columns) + " |")
    lines = [f"Methods ranked by top-1 at a budget of {budget:g} of the unslimmed GMACs (unslimmed top-1 "
             f"{100 * result.baseline_top1:.2f} %). Each cell is the method's plan that costs the budget within 2 %; "
             "\"rho\" is the keep ratio it needed, with the rho reached after the last block in brackets; n/a: no "
             "plan of the method meets that budget at its default placement (why below).", "", head,
             "|---:|---|---|" + "---:|" * (2 * len(columns) + 1)]
    for rank, entry in enumerate(ranked, 1):
        top = [("n/a" if entry["cells"].get(c) is None else f"{100 * entry['cells'][c]['top1']:.2f}") for c in columns]
        rho = [("n/a" if entry["cells"].get(c) is None else
                f"{entry['cells'][c]['keep_ratio']:.3g} ({entry['cells'][c]['keep_ratio_reached']:.3f})")
               for c in columns]
        loss = "n/a" if entry["loss_pp"] is None else f"{entry['loss_pp']:.2f}"
        lines.append(f"| {rank if entry['top1'] is not None else '–'} | {entry['method']} | "
                     f"{'no (learned)' if entry['learned'] else 'yes'} | " + " | ".join(top) + f" | {loss} | "
                     + " | ".join(rho) + " |")
    free = [e for e in ranked if not e["learned"] and e["loss_pp"] is not None]
    if free and math.isclose(budget, TARGET_BUDGET):
        best = free[0]
        verdict = "met" if best["loss_pp"] <= TARGET_LOSS_PP else "not met"
        lines += ["", f"Target (at {TARGET_BUDGET:g} of the unslimmed GMACs the best training-free method loses at "
                      f"most {TARGET_LOSS_PP:g} point of top-1): **{verdict}**; the best training-free method here is "
                      f"`{best['method']}` at {100 * best['top1']:.2f} % ({best['loss_pp']:.2f} points lost)."]
    if result.refused:
        lines += ["", "Budgets a method cannot meet at its default placement:", ""]
        lines += [f"- {what}: {why}" for what, why in result.refused.items()]
    return "\n".join(lines) + "\n"


def run_budgets(config: BudgetsConfig, tick: common.Tick | None = None) -> BudgetsRun:
    """Evaluates every method at every budget on the data (see the module docstring)."""
    from patchslim.data import load_labelled
    from patchslim.evaluate import evaluate, parse_variants
    from patchslim.models import load_model

    model = common.portable_model(load_model(config.model, device="cpu", pretrained=config.pretrained))
    labels = list(config.methods) if config.methods else default_methods()
    data = load_labelled(config.data, model).subset(config.limit)
    result = evaluate(model, data, parse_variants(labels), None, batch_size=config.batch_size,
                      progress=config.progress, budgets=list(config.budgets))
    if tick:
        tick(f"budgets on {len(data)} images")
    result = dataclasses.replace(result, data=common.portable_text(result.data),
                                 unreadable=[common.portable_text(item) for item in result.unreadable])
    return BudgetsRun(name="budgets", stem=config.stem, result=result, ranked_at=config.ranked_at)
