"""Batch evaluation: top-1 accuracy of slimming methods across keep ratios (the survey's Table 2).

For every batch the unslimmed model runs once; every (method, rho) pair then runs on the same batch and is
scored by top-1 against the labels and by *agreement* with the unslimmed prediction (how often slimming left
the decision unchanged, which needs no labels). The keep ratio each plan actually reached is averaged too
(``grid`` rounds to a G x G grid, multi-stage plans compound, Bernoulli ``rl`` adapts per image).

The data is :class:`~patchslim.data.LabelledImages` from :func:`patchslim.data.load_labelled`, the data path
every command shares (the bundled canvas sets, class or grouped folders, CSV manifests, zips). Labels that
match no class and files left out are carried into the result; an image that fails to decode is left out of
the counts and listed too.

Everything returns dataclasses; :func:`write_outputs` writes CSV, JSON, a markdown table and a plotly plot.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from patchslim.data import LabelledImages
from patchslim.errors import DataError, PatchslimError, PlanError
from patchslim.figures import write_png
from patchslim.methods import get_method
from patchslim.plan import SlimPlan

DEFAULT_KEEP_RATIOS = (1.0, 0.9, 0.7, 0.5, 0.3)


# --------------------------------------------------------------------------- what to evaluate

@dataclass(frozen=True)
class Variant:
    """One method at one placement with its options, e.g. ``entropy@1`` (entropy acting before block 1).

    Attributes:
        label: the name in tables (``method`` or ``method@blocks``).
        method: registered method name.
        blocks: where it acts (None: the method's default).
        options: method options.
    """

    label: str
    method: str
    blocks: tuple[int, ...] | None = None
    options: dict = field(default_factory=dict)

    def plan(self, keep_ratio: float, seed: int = 0) -> SlimPlan:
        return SlimPlan.single(self.method, keep_ratio, self.blocks, seed=seed, **self.options)

    def plan_for_budget(self, model: Any, budget: float, seed: int = 0):
        """The :class:`~patchslim.budget.BudgetSolution` of this variant at ``budget`` of the unslimmed GMACs.

        Raises:
            BudgetError: a budget it cannot reach at this placement, or options that contradict a budget.
        """
        from patchslim.budget import plan_for_budget

        return plan_for_budget(model, self.method, budget, self.blocks, self.options, seed=seed)


def parse_variants(methods: str | Sequence[str], options: dict[str, str] | None = None) -> list[Variant]:
    """``"random,entropy@1,attention@3+6+9"`` plus options into variants.

    ``method@B`` sets where the method acts (several blocks joined by ``+`` or ``;``). An option ``KEY=VALUE``
    applies to every listed method that has an option KEY; ``METHOD.KEY=VALUE`` to that method only. ``stages``
    (``stages=2,3``, or ``METHOD.stages=...``) is a placement every method takes: the stages of a hierarchical
    model (Swin) it slims, in every block of each.

    Raises:
        UnknownMethodError: a method that is not registered (listing those that are).
        PlanError: a bad placement, or an option no listed method has.
    """
    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    if not names:
        raise PlanError("--methods must name at least one method")
    options = dict(options or {})
    variants: list[Variant] = []
    used: set[str] = set()
    for label in names:
        method, _, where = label.partition("@")
        slim = get_method(method)
        blocks = None
        if where:
            try:
                blocks = tuple(int(b) for b in re.split(r"[+;]", where) if b.strip())
            except ValueError:
                raise PlanError(f"{label!r}: blocks after '@' must be block indices joined by '+'") from None
            if not blocks:
                raise PlanError(f"{label!r}: no block after '@'")
        own = {spec.name for spec in slim.options} | {"stages"}
        chosen = {}
        for key, value in options.items():
            scope, dot, name = key.rpartition(".")
            if dot and scope == method and name in own:
                chosen[name] = value
                used.add(key)
            elif not dot and key in own:
                chosen[key] = value
                used.add(key)
        if "stages" in chosen:
            chosen["stages"] = _stage_indices(chosen["stages"], label)
        variants.append(Variant(label, method, blocks, chosen))
    unused = sorted(set(options) - used)
    if unused:
        raise PlanError(f"option {unused[0]!r} belongs to none of the methods {', '.join(names)}")
    if len({v.label for v in variants}) != len(variants):
        raise PlanError("--methods lists a method twice")
    return variants


def _stage_indices(value, label: str) -> tuple[int, ...]:
    """``"2,3"`` (or ``2;3``, a number, a sequence) -> ``(2, 3)``; the plan checks them against the model."""
    if isinstance(value, (int, tuple, list)):
        return (value,) if isinstance(value, int) else tuple(value)
    try:
        return tuple(int(s) for s in re.split(r"[,;+]", str(value)) if s.strip())
    except ValueError:
        raise PlanError(f"{label!r}: stages must be stage indices separated by commas (stages=2,3), "
                        f"got {value!r}") from None


def parse_keep_ratios(text: str | Sequence[float]) -> list[float]:
    """``"1.0,0.7,0.5"`` -> ``[1.0, 0.7, 0.5]``, each checked to be in (0, 1].

    Raises:
        PlanError: a value that is not a number in (0, 1].
    """
    parts = text.split(",") if isinstance(text, str) else list(text)
    ratios = []
    for part in parts:
        if isinstance(part, str) and not part.strip():
            continue
        try:
            value = float(part)
        except (TypeError, ValueError):
            raise PlanError(f"--keep must be numbers in (0, 1] separated by commas, got {part!r}") from None
        if not 0.0 < value <= 1.0 or math.isnan(value):
            raise PlanError(f"--keep values must be in (0, 1], got {value:g}")
        ratios.append(value)
    if not ratios:
        raise PlanError("--keep needs at least one keep ratio")
    return ratios


# --------------------------------------------------------------------------- results

@dataclass(frozen=True)
class AccuracyRow:
    """One method at one keep ratio.

    Attributes:
        method: the variant's label (``entropy@1``).
        base_method: the registered method.
        blocks: where it acted (``"default"`` or ``"1"``, ``"3+6+9"``; ``"stages 2+3"`` for a Swin's stages).
        keep_ratio: rho requested.
        keep_ratio_reached: non-prefix tokens after the last block / N, averaged over images.
        mean_keep_ratio: non-prefix tokens averaged over all blocks / N (what the compute follows).
        top1: top-1 accuracy.
        agreement: share of images whose prediction equals the unslimmed model's.
        n: images.
        correct, agree: the counts behind top1 and agreement.
        gmacs: analytic GMACs per image, when the cost model is available (else NaN).
        budget: for a plan found for a compute budget (:mod:`patchslim.budget`), the fraction of the unslimmed
            GMACs asked for; ``keep_ratio`` is then the rho the method needed (NaN for a plan at a given rho).
        budget_reached: ``gmacs`` / the unslimmed GMACs, for such a plan.
    """

    method: str
    base_method: str
    blocks: str
    keep_ratio: float
    keep_ratio_reached: float
    mean_keep_ratio: float
    top1: float
    agreement: float
    n: int
    correct: int
    agree: int
    gmacs: float = float("nan")
    budget: float = float("nan")
    budget_reached: float = float("nan")

    @property
    def column(self) -> float:
        """Where the row sits in a table: its budget when it has one, else its keep ratio."""
        return self.keep_ratio if math.isnan(self.budget) else self.budget


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured.

    Attributes:
        model, weights: the model and where its weights came from.
        data: the data's description.
        n: images evaluated (those of the data that decoded).
        baseline_top1: the unslimmed model's top-1.
        baseline_gmacs: the unslimmed model's GMACs per image (NaN when unknown).
        rows: one per (method, keep ratio), in the order asked.
        unknown_labels: folder or label -> images not evaluated because it matches none of the model's classes.
        unreadable: ``"item: reason"`` of every file left out (not decodable, not an image, a duplicate, an
            unsafe zip member, ...).
        seconds: wall time.
        settings: batch size, seed, device, options.
        refused: ``"label at budget F"`` -> why no plan of that variant meets that budget (not evaluated).
    """

    model: str
    weights: str
    data: str
    n: int
    baseline_top1: float
    rows: list[AccuracyRow]
    baseline_gmacs: float = float("nan")
    unknown_labels: dict[str, int] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def row(self, method: str, keep_ratio: float) -> AccuracyRow:
        for r in self.rows:
            if r.method == method and abs(r.keep_ratio - keep_ratio) < 1e-9:
                return r
        raise KeyError((method, keep_ratio))

    @property
    def by_budget(self) -> bool:
        """True when the rows are plans found for compute budgets (columns are budgets, not keep ratios)."""
        return any(not math.isnan(r.budget) for r in self.rows)

    @property
    def columns(self) -> list[float]:
        """The budgets (for a result by budget) or the keep ratios, in the order asked."""
        return list(dict.fromkeys(r.column for r in self.rows))

    def cell(self, method: str, column: float) -> AccuracyRow:
        """The row of ``method`` at a column (a budget or a keep ratio, see :attr:`columns`)."""
        for r in self.rows:
            if r.method == method and abs(r.column - column) < 1e-9:
                return r
        raise KeyError((method, column))

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self.rows))

    @property
    def keep_ratios(self) -> list[float]:
        return list(dict.fromkeys(r.keep_ratio for r in self.rows))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = [_clean(asdict(r)) for r in self.rows]
        return _clean(d)

    @staticmethod
    def from_dict(record: dict) -> "EvaluationResult":
        """Rebuilds a result from :meth:`to_dict` (or an ``accuracy.json`` file)."""
        fields = set(EvaluationResult.__dataclass_fields__)
        values = {k: v for k, v in record.items() if k in fields}
        nan = float("nan")
        values["rows"] = [AccuracyRow(**{k: (nan if v is None else v) for k, v in row.items()})
                          for row in record["rows"]]
        if values.get("baseline_gmacs") is None:
            values["baseline_gmacs"] = nan
        return EvaluationResult(**values)

    def csv_text(self) -> str:
        out = io.StringIO()
        columns = list(AccuracyRow.__dataclass_fields__)
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(r).items()})
        return out.getvalue()

    def markdown(self) -> str:
        """Pivot tables (top-1, agreement, rho reached; by budget: the rho each method needed and the budget
        reached) with the run's facts on top."""
        columns = self.columns
        by_budget = self.by_budget
        head = "| method | " + " | ".join(f"{'budget' if by_budget else 'rho'} {c:g}" for c in columns) + " |"
        rule = "|---|" + "---:|" * len(columns)

        def table(cell: Callable[[AccuracyRow], str]) -> list[str]:
            lines = [head, rule]
            for m in self.methods:
                cells = []
                for c in columns:
                    try:
                        cells.append(cell(self.cell(m, c)))
                    except KeyError:
                        cells.append("n/a" if by_budget else "")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            return lines

        lines = [
            f"Model `{self.model}` ({self.weights}); data: {self.data}; n = {self.n}.",
            f"Unslimmed top-1: **{100 * self.baseline_top1:.2f} %**"
            + (f"; {self.baseline_gmacs:.4f} GMACs per image." if not math.isnan(self.baseline_gmacs) else "."),
            "",
            ("Top-1 accuracy (%) at a compute budget (fraction of the unslimmed GMACs; each method's rho searched to "
             "cost that much):" if by_budget else "Top-1 accuracy (%) by requested keep ratio rho:"),
            "",
            *table(lambda r: f"{100 * r.top1:.2f}"),
            "",
            "Agreement with the unslimmed prediction (%):",
            "",
            *table(lambda r: f"{100 * r.agreement:.2f}"),
            "",
        ]
        if by_budget:
            lines += ["Keep ratio rho each method needed (reached after the last block in brackets):", "",
                      *table(lambda r: f"{r.keep_ratio:.3g} ({r.keep_ratio_reached:.3f})"), "",
                      "Fraction of the unslimmed GMACs reached:", "", *table(lambda r: f"{r.budget_reached:.4f}")]
        else:
            lines += ["Keep ratio reached after the last block (mean over blocks, which the compute follows, in "
                      "brackets):", "", *table(lambda r: f"{r.keep_ratio_reached:.3f} ({r.mean_keep_ratio:.3f})")]
        if any(not math.isnan(r.gmacs) for r in self.rows):
            lines += ["", "GMACs per image:", "", *table(lambda r: f"{r.gmacs:.4f}")]
        if self.refused:
            lines += ["", "Not evaluated (no plan of the method meets the budget):", ""]
            lines += [f"- {what}: {why}" for what, why in self.refused.items()]
        if self.unknown_labels:
            lines += ["", "Not evaluated (folders matching no class): "
                      + ", ".join(f"{k} ({v})" for k, v in sorted(self.unknown_labels.items()))]
        if self.unreadable:
            lines += ["", f"Files left out: {len(self.unreadable)} (listed with reasons in the JSON)"]
        return "\n".join(lines) + "\n"


def _clean(value: Any) -> Any:
    """JSON-safe: NaN -> None, tuples -> lists."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def merge_results(results: Sequence[EvaluationResult], order: Sequence[str] | None = None) -> EvaluationResult:
    """One table from runs on the same model and data (e.g. methods evaluated in separate processes).

    Args:
        results: results of :func:`evaluate`; later ones replace rows of earlier ones for the same
            (method, keep ratio).
        order: method labels in the order the table should list them (others follow).

    Raises:
        PatchslimError: the runs differ in model, weights, data or images.
    """
    first = results[0]
    for other in results[1:]:
        for key in ("model", "weights", "data", "n"):
            if getattr(other, key) != getattr(first, key):
                raise PatchslimError(f"cannot merge results with different {key}: "
                                     f"{getattr(first, key)!r} vs {getattr(other, key)!r}")
        if abs(other.baseline_top1 - first.baseline_top1) > 1e-12:
            raise PatchslimError("cannot merge results whose unslimmed top-1 differs (different images?)")
    if len({r.by_budget for r in results if r.rows}) > 1:
        raise PatchslimError("cannot merge results by keep ratio with results by compute budget")
    rows: dict[tuple[str, float], AccuracyRow] = {}
    for result in results:
        for row in result.rows:
            rows[(row.method, row.column)] = row
    rank = {m: i for i, m in enumerate(order or ())}
    first_seen = {m: i for i, m in enumerate(dict.fromkeys(m for m, _ in rows))}
    methods = sorted(first_seen, key=lambda m: rank.get(m, len(rank) + first_seen[m]))
    columns = list(dict.fromkeys(c for result in results for c in result.columns))
    merged = [rows[(m, c)] for m in methods for c in columns if (m, c) in rows]
    refused: dict[str, str] = {}
    for result in results:
        refused.update(result.refused)
    return EvaluationResult(
        model=first.model, weights=first.weights, data=first.data, n=first.n, baseline_top1=first.baseline_top1,
        rows=merged, baseline_gmacs=first.baseline_gmacs, unknown_labels=first.unknown_labels,
        unreadable=first.unreadable, seconds=sum(r.seconds for r in results),
        settings=dict(first.settings, merged_from=len(results)), refused=refused,
    )


# --------------------------------------------------------------------------- evaluation

def _gmacs_function() -> Callable | None:
    try:
        from patchslim.metrics.flops import gmacs
    except Exception:  # the cost model is optional here
        return None
    return gmacs


def budget_plans(model: Any, variants: Sequence[Variant], budgets: Sequence[float], seed: int = 0
                 ) -> tuple[list[tuple[Variant, float, Any]], dict[str, str]]:
    """Every variant's plan at every compute budget (:func:`patchslim.budget.plan_for_budget`).

    Returns:
        ``[(variant, budget, BudgetSolution)]`` for the pairs that have a plan, and ``"label at budget F"`` ->
        the reason for those that do not (a budget the method cannot reach at its placement, options that make its
        count depend on the image), so that one unreachable pair does not stop a table.

    Raises:
        PlanError: a variant that does not fit the model at all (unknown options, blocks outside it).
    """
    from patchslim.errors import BudgetError

    solved, refused = [], {}
    for variant in variants:
        for budget in budgets:
            try:
                solved.append((variant, float(budget), variant.plan_for_budget(model, budget, seed)))
            except BudgetError as exc:
                refused[f"{variant.label} at budget {budget:g}"] = str(exc)
    return solved, refused


def evaluate(model: Any, data: LabelledImages, variants: Sequence[Variant], keep_ratios: Sequence[float] | None,
             batch_size: int = 256, seed: int = 0, progress: bool = True, workers: int = 0,
             budgets: Sequence[float] | None = None) -> EvaluationResult:
    """Top-1 and agreement of every variant at every keep ratio (or compute budget) on ``data``.

    Args:
        model: a :class:`~patchslim.models.LoadedModel`.
        data: from :func:`patchslim.data.load_labelled` (or :func:`patchslim.data.canvas_images`).
        variants: from :func:`parse_variants`.
        keep_ratios: rho values (requested); None or empty with ``budgets``.
        batch_size: images per forward.
        seed: the plans' seed (``random`` and sampled decisions).
        progress: show a tqdm bar (on stderr).
        workers: processes decoding image files (0: this one).
        budgets: fractions of the unslimmed GMACs instead of keep ratios: each variant runs the plan that costs
            that much (:func:`budget_plans`); pairs without such a plan are listed in ``result.refused``.

    Raises:
        PlanError: a plan that does not fit the model (checked before any image runs).
        BudgetError: budgets together with keep ratios, a budget outside (0, 1], or no variant meeting any budget.
        DataError: none of the images could be decoded.
    """
    from tqdm.auto import tqdm

    from patchslim.budget import parse_budgets
    from patchslim.engine import run
    from patchslim.errors import BudgetError

    if batch_size < 1:
        raise PatchslimError(f"--batch-size must be at least 1, got {batch_size}")
    plans = []
    refused: dict[str, str] = {}
    if budgets is not None:
        if keep_ratios:
            raise BudgetError("keep ratios and budgets are two ways to say how much to slim: give one of them")
        solved, refused = budget_plans(model, variants, parse_budgets(list(budgets), "budgets"), seed)
        if not solved:
            raise BudgetError("no method meets any of the budgets: " + "; ".join(refused.values()))
        plans = [(variant, solution.keep_ratio, solution.plan, budget) for variant, budget, solution in solved]
    for variant in variants if budgets is None else ():
        for ratio in keep_ratios:
            plans.append((variant, ratio, variant.plan(ratio, seed), float("nan")))
    for _, _, plan, _ in plans:
        for action in plan.resolve(model.spec.depth, model.spec):  # fail before any image runs
            action.method.check(dict(action.stage.options), action.stage.keep_ratio, model)
    gmacs_of = _gmacs_function()
    n = 0
    stats = {i: dict(correct=0, agree=0, reached=0.0, mean_ratio=0.0, gmacs=0.0) for i in range(len(plans))}
    base_correct, base_gmacs = 0, 0.0
    t0 = time.time()
    left_out = [f"{s.item}: {s.reason}" for s in data.skipped if s.kind not in ("label", "class", "group")]
    bar = tqdm(total=len(data) * (1 + len(plans)), disable=not progress, desc="evaluate", unit="img",
               unit_scale=True)
    for batch in data.batches(model, batch_size, workers):
        left_out += [f"{data.items[i]}: could not be decoded: {message}" for i, message in batch.errors.items()]
        bar.update(len(batch.errors) * (1 + len(plans)))
        b = int(batch.ok.sum())
        if not b:
            continue
        n += b
        images = batch.images.to(model.device)
        labels = batch.labels(data).to(model.device)
        base = run(model, images)
        base_pred = base.logits.argmax(-1)
        base_correct += int((base_pred == labels).sum())
        if gmacs_of is not None:
            base_gmacs += gmacs_of(base) * b
        bar.update(b)
        for i, (_, _, plan, _) in enumerate(plans):
            trace = run(model, images, plan)
            pred = trace.logits.argmax(-1)
            s = stats[i]
            s["correct"] += int((pred == labels).sum())
            s["agree"] += int((pred == base_pred).sum())
            s["reached"] += trace.keep_ratio * b
            s["mean_ratio"] += trace.mean_keep_ratio * b
            if gmacs_of is not None:
                s["gmacs"] += gmacs_of(trace) * b
            bar.update(b)
    bar.close()
    if not n:
        raise DataError(f"none of the {len(data)} images of {data.name} could be decoded (e.g. {left_out[-1]})")
    rows = []
    baseline_gmacs = base_gmacs / n if gmacs_of is not None else float("nan")
    for i, (variant, ratio, _, budget) in enumerate(plans):
        s = stats[i]
        gmacs = s["gmacs"] / n if gmacs_of is not None else float("nan")
        rows.append(AccuracyRow(
            method=variant.label, base_method=variant.method,
            blocks=("+".join(str(b) for b in variant.blocks) if variant.blocks is not None else
                    "stages " + "+".join(str(b) for b in variant.options["stages"]) if "stages" in variant.options
                    else "default"),
            keep_ratio=ratio, keep_ratio_reached=s["reached"] / n, mean_keep_ratio=s["mean_ratio"] / n,
            top1=s["correct"] / n, agreement=s["agree"] / n, n=n, correct=s["correct"], agree=s["agree"],
            gmacs=gmacs, budget=budget,
            budget_reached=gmacs / baseline_gmacs if not math.isnan(budget) else float("nan"),
        ))
    settings = dict(batch_size=batch_size, seed=seed, device=str(model.device), precision=model.precision,
                    variants=[asdict(v) for v in variants])
    if budgets is not None:
        settings.update(budgets=[float(b) for b in budgets], plans=[
            dict(method=variant.label, budget=budget, plan=plan.to_dict()) for variant, _, plan, budget in plans])
    return EvaluationResult(
        model=model.name, weights=model.weights_name, data=data.name, n=n, baseline_top1=base_correct / n,
        rows=rows, baseline_gmacs=baseline_gmacs,
        unknown_labels={s.item: s.count for s in data.skipped if s.kind == "label"}, unreadable=left_out,
        seconds=time.time() - t0, settings=settings, refused=refused,
    )


# --------------------------------------------------------------------------- outputs

def _line_style(method: str, methods: Sequence[str]) -> dict:
    """One colour per base method (a variant ``METHOD@B`` shares its method's colour), a dash per variant."""
    import plotly.colors

    palette = plotly.colors.qualitative.Dark24
    bases = list(dict.fromkeys(m.split("@")[0] for m in methods))
    base = method.split("@")[0]
    siblings = [m for m in methods if m.split("@")[0] == base]
    dashes = ("solid", "dot", "dash", "dashdot", "longdash")
    return dict(color=palette[bases.index(base) % len(palette)], dash=dashes[siblings.index(method) % len(dashes)])


def accuracy_figure(result: EvaluationResult):
    """A plotly figure: top-1 vs requested rho (or vs the compute budget, for a result by budget), one line per
    method, the unslimmed top-1 dashed."""
    import plotly.graph_objects as go

    by_budget = result.by_budget
    fig = go.Figure()
    for method in result.methods:
        rows = sorted((r for r in result.rows if r.method == method), key=lambda r: r.column)
        hover = (f"{method}<br>budget %{{x:g}}: rho %{{customdata[2]:.3g}} (reached %{{customdata[0]:.3f}})"
                 if by_budget else f"{method}<br>rho %{{x:g}} (reached %{{customdata[0]:.3f}})")
        fig.add_trace(go.Scatter(
            x=[r.column for r in rows], y=[100 * r.top1 for r in rows], mode="lines+markers", name=method,
            line=_line_style(method, result.methods),
            customdata=[[r.keep_ratio_reached, 100 * r.agreement, r.keep_ratio] for r in rows],
            hovertemplate=hover + "<br>top-1 %{y:.2f} %<br>agreement %{customdata[1]:.2f} %<extra></extra>",
        ))
    fig.add_hline(y=100 * result.baseline_top1, line_dash="dash", line_color="gray",
                  annotation_text=f"unslimmed {100 * result.baseline_top1:.1f} %")
    fig.update_layout(
        title=(f"Top-1 at equal cost: {result.model}, {result.data}" if by_budget
               else f"Top-1 vs keep ratio: {result.model}, {result.data}"),
        xaxis_title="compute budget (fraction of the unslimmed GMACs)" if by_budget else "keep ratio rho (requested)",
        yaxis_title="top-1 accuracy (%)",
        xaxis=dict(autorange="reversed"), template="plotly_white", width=900, height=560,
        legend=dict(title="method"),
    )
    return fig


def compute_figure(result: EvaluationResult):
    """A plotly figure: top-1 vs compute (GMACs per image when known, else the mean keep ratio over blocks).

    Methods that act later or gradually keep more tokens on average at the same final rho; this view
    compares them at equal cost rather than at equal requested rho.
    """
    import plotly.graph_objects as go

    use_gmacs = all(not math.isnan(r.gmacs) for r in result.rows) and result.rows
    fig = go.Figure()
    for method in result.methods:
        rows = sorted((r for r in result.rows if r.method == method), key=lambda r: r.column)
        fig.add_trace(go.Scatter(
            x=[r.gmacs if use_gmacs else r.mean_keep_ratio for r in rows], y=[100 * r.top1 for r in rows],
            mode="lines+markers", name=method, customdata=[[r.keep_ratio] for r in rows],
            line=_line_style(method, result.methods),
            hovertemplate=f"{method}<br>rho %{{customdata[0]:g}}<br>%{{x:.4g}}<br>top-1 %{{y:.2f}} %<extra></extra>",
        ))
    fig.add_hline(y=100 * result.baseline_top1, line_dash="dash", line_color="gray",
                  annotation_text=f"unslimmed {100 * result.baseline_top1:.1f} %")
    fig.update_layout(
        title=f"Top-1 vs compute: {result.model}, {result.data}",
        xaxis_title="GMACs per image" if use_gmacs else "mean keep ratio over blocks",
        yaxis_title="top-1 accuracy (%)", template="plotly_white", width=900, height=560,
        legend=dict(title="method"),
    )
    return fig


def _write_png(result: EvaluationResult, fig, path: Path) -> str | None:
    """PNG via kaleido (Chromium) if it works here, else drawn with matplotlib. Returns which one wrote it."""
    writer, _ = write_png(fig, path, lambda p: _matplotlib_png(result, p))
    return "matplotlib" if writer == "fallback" else writer


def _matplotlib_png(result: EvaluationResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5.6), dpi=120)
    for method in result.methods:
        rows = sorted((r for r in result.rows if r.method == method), key=lambda r: r.column)
        axes.plot([r.column for r in rows], [100 * r.top1 for r in rows], marker="o", label=method)
    axes.axhline(100 * result.baseline_top1, color="gray", linestyle="--", label="unslimmed")
    axes.invert_xaxis()
    by_budget = result.by_budget
    axes.set_xlabel("compute budget (fraction of the unslimmed GMACs)" if by_budget else "keep ratio rho (requested)")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title(f"Top-1 {'at equal cost' if by_budget else 'vs keep ratio'}: {result.model}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_outputs(result: EvaluationResult, out_dir: str | Path, stem: str = "accuracy", png: bool = True,
                  command: str | None = None, intro: str = "") -> dict[str, Path]:
    """Writes ``<stem>.csv``, ``.json``, ``.md``, ``.html`` and ``.png`` (top-1 vs rho, or vs the budget) and
    ``<stem>_vs_compute.html`` / ``.png`` (top-1 vs GMACs) into ``out_dir``; ``intro`` is markdown put before the
    tables.

    Returns:
        kind -> path of what was written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"{stem}.{kind}" for kind in ("csv", "json", "md", "html")}
    paths["csv"].write_text(result.csv_text())
    record = result.to_dict()
    if command:
        record["command"] = command
    record["written"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    paths["json"].write_text(json.dumps(record, indent=1) + "\n")
    title = "Accuracy at equal cost" if result.by_budget else "Accuracy vs keep ratio"
    header = f"# {title}\n\n" + (f"Command: `{command}`\n\n" if command else "")
    paths["md"].write_text(header + (intro + "\n" if intro else "") + result.markdown())
    fig = accuracy_figure(result)
    fig.write_html(str(paths["html"]), include_plotlyjs="cdn")
    compute = compute_figure(result)
    paths["compute_html"] = out / f"{stem}_vs_compute.html"
    compute.write_html(str(paths["compute_html"]), include_plotlyjs="cdn")
    if png:
        paths["png"] = out / f"{stem}.png"
        _write_png(result, fig, paths["png"])
        paths["compute_png"] = out / f"{stem}_vs_compute.png"
        if write_png(compute, paths["compute_png"])[0] is None:  # no Chromium for kaleido: the HTML is there
            del paths["compute_png"]
    return paths
