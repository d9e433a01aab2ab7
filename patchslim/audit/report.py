"""The audit's tables and its report: CSV, JSON and one self-contained HTML page with plotly charts.

Per method x rho x group (for every grouping, ``all`` and ``class`` included): images, top-1 before and
after with bootstrap 95 % intervals, the accuracy drop (paired, with its interval), the flip rate (share of
predictions slimming changed), the mean change of the probability of the unslimmed prediction, the mean
share of kept evidence (when measured), the GMACs per image and the rho reached. Per method x rho x
grouping: the disparity (:func:`patchslim.audit.stats.disparity`) with a plain-language sentence.

The HTML embeds plotly.js, so it opens offline. By default the library is embedded gzip-compressed
(~1.9 MB instead of 4.8 MB) and unpacked by the browser's ``DecompressionStream`` (every current browser);
``plotly="inline"`` embeds it as is. Every name that comes from the data is HTML-escaped.
"""

from __future__ import annotations

import base64
import csv
import gzip
import html
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from patchslim.audit.runner import AuditJob, job_settings, read_outcomes
from patchslim.audit.sources import builtin_grouping
from patchslim.audit.stats import (
    LEVEL,
    MIN_GROUP_IMAGES,
    N_BOOT,
    Estimate,
    disparity,
    disparity_sentence,
    mean_interval,
)
from patchslim.data import ALL_GROUP, Skipped


@dataclass(frozen=True)
class GroupRow:
    """One method at one rho on one group of one grouping (``by``).

    Shares are in [0, 1]; ``drop`` is ``top1_before - top1_after`` (paired over the same images).
    """

    method: str
    keep_ratio: float
    by: str
    group: str
    images: int
    top1_before: float
    top1_before_low: float
    top1_before_high: float
    top1_after: float
    top1_after_low: float
    top1_after_high: float
    drop: float
    drop_low: float
    drop_high: float
    flip_rate: float
    confidence_change: float
    kept_evidence: float
    gmacs: float
    keep_ratio_reached: float
    budget: float = float("nan")  # the compute budget the plan was found for (NaN: a plan at a given rho)


@dataclass(frozen=True)
class DisparityRow:
    """The largest gap in accuracy drop between the groups of one grouping, for one method at one rho.

    In Fairlearn's ``MetricFrame`` words: ``gap`` is the *difference* (max - min over the tested groups) of the
    per-group accuracy drop, ``worst_drop`` / ``best_drop`` are its extreme *by-group* values and
    ``overall_drop`` its *overall* value; ``top1_after_difference`` and ``top1_after_ratio`` (min / max) are the
    same for the top-1 after slimming. ``gap_low`` .. ``gap_high`` is its 95 % stratified bootstrap interval,
    ``adjusted_low`` the low end at the Bonferroni-corrected level, and ``flagged`` says that it excludes zero.
    """

    method: str
    keep_ratio: float
    by: str
    groups: int
    worst_group: str
    best_group: str
    worst_drop: float
    best_drop: float
    gap: float
    gap_low: float
    gap_high: float
    adjusted_low: float
    pairs: int
    flagged: bool
    excluded: str
    overall_drop: float
    top1_after_difference: float
    top1_after_ratio: float
    message: str
    budget: float = float("nan")


@dataclass
class AuditReport:
    """Everything an audit found.

    Attributes:
        model, weights: the model and where its weights came from.
        data: the data's description.
        images: items in the data; ``audited``: those decoded and run.
        baseline_top1: the unslimmed top-1 over all audited images, with its interval.
        baseline_gmacs: GMACs per image of the unslimmed model.
        groupings: the groupings reported (``all`` and ``class`` always).
        rows: :class:`GroupRow` s.
        disparities: :class:`DisparityRow` s (groupings with more than one group).
        skipped: everything left out, with reasons.
        throughput: images per second (decode, unslimmed forward, each plan) and the seconds behind them.
        settings: the job's settings (model, data fingerprint, shard and batch size, seed, plans...).
        command: the command line that made it (when known).
        written: when the report was written.
    """

    model: str
    weights: str
    data: str
    images: int
    audited: int
    baseline_top1: Estimate
    baseline_gmacs: float
    groupings: list[str]
    rows: list[GroupRow]
    disparities: list[DisparityRow]
    skipped: list[Skipped]
    throughput: dict[str, float]
    settings: dict
    command: str = ""
    written: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self.rows))

    @property
    def keep_ratios(self) -> list[float]:
        return sorted({r.keep_ratio for r in self.rows}, reverse=True)

    @property
    def by_budget(self) -> bool:
        """True when the plans were found for compute budgets."""
        return any(not math.isnan(r.budget) for r in self.rows)

    def flagged(self) -> list[DisparityRow]:
        return [d for d in self.disparities if d.flagged]

    def to_dict(self) -> dict:
        return _clean(dict(
            model=self.model, weights=self.weights, data=self.data, images=self.images, audited=self.audited,
            baseline_top1=asdict(self.baseline_top1), baseline_gmacs=self.baseline_gmacs,
            groupings=self.groupings, rows=[asdict(r) for r in self.rows],
            disparities=[asdict(d) for d in self.disparities], skipped=[asdict(s) for s in self.skipped],
            throughput=self.throughput, settings=self.settings, command=self.command, written=self.written,
            notes=self.notes,
        ))


def _clean(value: Any) -> Any:
    """JSON-safe: NaN -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _top1_before(y_true: np.ndarray, y_pred: np.ndarray, before: np.ndarray) -> float:
    return float(np.mean(before == y_true))


def _top1_after(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_pred == y_true))


def _drop(y_true: np.ndarray, y_pred: np.ndarray, before: np.ndarray) -> float:
    return float(np.mean(before == y_true) - np.mean(y_pred == y_true))


def metric_frame(labels: np.ndarray, pred_before: np.ndarray, pred_after: np.ndarray, groups: np.ndarray):
    """Fairlearn's ``MetricFrame`` of one plan on one grouping: ``top1_before``, ``top1_after`` and ``drop``
    (before - after, paired over the same images), by group and overall, with ``difference()`` (max - min)
    and ``ratio()`` (min / max).

    The report takes its point values from it. Its intervals stay :mod:`patchslim.audit.stats`'s: Fairlearn's
    bootstrap (``n_boot``) redraws the whole frame and recomputes every metric per draw, where the audit draws
    each group's outcome counts exactly (a multinomial, thousands of times faster on 10,000 images x 60 frames),
    stratified by group, and the flag needs the interval of the worst-vs-best gap at a Bonferroni-corrected
    level, which Fairlearn does not give.
    """
    from fairlearn.metrics import MetricFrame

    before = np.asarray(pred_before)
    return MetricFrame(metrics={"top1_before": _top1_before, "top1_after": _top1_after, "drop": _drop},
                       y_true=np.asarray(labels), y_pred=np.asarray(pred_after),
                       sensitive_features=np.asarray(groups, dtype=object),
                       sample_params={"top1_before": {"before": before}, "drop": {"before": before}})


def build_report(job: AuditJob, groupings: Sequence[str] = (), n_boot: int = N_BOOT, level: float = LEVEL,
                 min_group_images: int = MIN_GROUP_IMAGES, command: str = "",
                 failed: dict[int, str] | None = None) -> AuditReport:
    """The report of a finished job (its parts read back from ``job.out_dir``).

    Args:
        job: a job whose every part exists.
        groupings: besides ``all`` and ``class``: ``group`` (from the data), ``brightness``, ``family``.
        n_boot: bootstrap resamples per interval.
        level: the intervals' confidence level.
        min_group_images: groups smaller than this are left out of the disparity test.
        command: the command line, recorded in the report.
        failed: shard -> why its task failed (a Ray run whose retries ran out): those shards are left out and
            listed under "Skipped"; without it, every part must be there.

    Raises:
        PatchslimError: the job has not finished (and no ``failed`` shards were given), or an unknown grouping.
    """
    data = job.data
    out = read_outcomes(job, missing_ok=failed is not None)
    seed = job.seed
    names = list(data.class_names)
    group_of: dict[str, np.ndarray] = {"all": np.full(len(data), ALL_GROUP, dtype=object)}
    for g in groupings:
        if g == "group":
            group_of["group"] = data.groupings["group"]
        else:
            group_of[g] = builtin_grouping(g, data.labels, out.brightness, names)
    group_of["class"] = np.asarray([names[int(i)] for i in data.labels], dtype=object)
    ok = out.ok
    skipped = list(data.skipped)
    for i, message in sorted(out.errors.items()):
        skipped.append(Skipped(data.items[i], f"could not be decoded: {message}", "file"))
    for shard in out.missing:
        start, stop = job.shard_range(shard)
        why = (failed or {}).get(shard, "its task did not finish")
        skipped.append(Skipped(f"shard {shard} (items {start}-{stop - 1})", f"not audited: {why}; run the same "
                               "command again to retry it", "shard", stop - start))
    for by, groups in group_of.items():
        if by in ("all", "class"):
            continue
        for group in sorted(set(groups[~ok]) - set(groups[ok])):
            skipped.append(Skipped(f"{by} {group}", "group holds no usable images (none could be decoded)",
                                   "group", int((groups == group).sum())))
    before_all = out.correct[ok].astype(np.float64)
    rows: list[GroupRow] = []
    disparities: list[DisparityRow] = []
    labels = np.asarray(data.labels)
    for plan in job.plans:
        arrays = out.plans[plan.key]
        budget = float("nan") if plan.budget is None else float(plan.budget)
        drop_per_image = out.correct.astype(np.float64) - arrays["correct"].astype(np.float64)
        for by, groups in group_of.items():
            present = [g for g in dict.fromkeys(groups[ok])]
            if by == "class":
                present = [n for n in names if n in set(present)]
            else:
                present = sorted(present)
            full = metric_frame(labels[ok], out.pred[ok], arrays["pred"][ok], groups[ok]) if present else None
            drops = {}
            for group in present:
                mask = ok & (groups == group)
                before = out.correct[mask].astype(np.float64)
                after = arrays["correct"][mask].astype(np.float64)
                drop = drop_per_image[mask]
                drops[group] = drop
                b = mean_interval(before, n_boot, seed, ("before", by, group), level)
                a = mean_interval(after, n_boot, seed, ("after", plan.key, by, group), level)
                d = mean_interval(drop, n_boot, seed, ("drop", plan.key, by, group), level)
                values = full.by_group.loc[group]
                rows.append(GroupRow(
                    method=plan.method, keep_ratio=plan.keep_ratio, by=by, group=str(group), images=int(mask.sum()),
                    top1_before=float(values["top1_before"]), top1_before_low=b.low, top1_before_high=b.high,
                    top1_after=float(values["top1_after"]), top1_after_low=a.low, top1_after_high=a.high,
                    drop=float(values["drop"]), drop_low=d.low, drop_high=d.high,
                    flip_rate=float((arrays["pred"][mask] != out.pred[mask]).mean()) if mask.any() else float("nan"),
                    confidence_change=_nanmean(arrays["conf"][mask] - out.conf[mask]),
                    kept_evidence=_nanmean(arrays["evidence"][mask]),
                    gmacs=_nanmean(arrays["gmacs"][mask]), keep_ratio_reached=_nanmean(arrays["reached"][mask]),
                    budget=budget,
                ))
            if by == "all" or len(present) < 2:
                continue
            gap = disparity(drops, n_boot, seed, ("gap", plan.key, by), level, min_group_images)
            two = gap.groups >= 2
            frame = full
            if gap.excluded and two:  # the difference and ratio over the groups the test compared
                tested = ok & ~np.isin(groups, list(gap.excluded))
                frame = metric_frame(labels[tested], out.pred[tested], arrays["pred"][tested], groups[tested])
            difference, ratio = frame.difference(), frame.ratio()
            disparities.append(DisparityRow(
                method=plan.method, keep_ratio=plan.keep_ratio, by=by, groups=gap.groups, worst_group=str(gap.worst),
                best_group=str(gap.best), worst_drop=gap.worst_drop, best_drop=gap.best_drop,
                gap=float(difference["drop"]) if two else float("nan"),
                gap_low=gap.gap.low, gap_high=gap.gap.high, adjusted_low=gap.adjusted_low, pairs=gap.pairs,
                flagged=gap.flagged, excluded="; ".join(f"{g} ({n})" for g, n in sorted(gap.excluded.items())),
                overall_drop=float(full.overall["drop"]),
                top1_after_difference=float(difference["top1_after"]) if two else float("nan"),
                top1_after_ratio=float(ratio["top1_after"]) if two else float("nan"),
                message=disparity_sentence(gap, plan.method, plan.keep_ratio, by, plan.budget), budget=budget,
            ))
    audited = int(ok.sum())
    t = out.timing
    throughput = dict(
        audited_images=audited, decode_seconds=t["decode_seconds"], baseline_seconds=t["baseline_seconds"],
        decode_images_per_second=audited / t["decode_seconds"] if t["decode_seconds"] > 0 else float("nan"),
        baseline_images_per_second=audited / t["baseline_seconds"] if t["baseline_seconds"] > 0 else float("nan"),
    )
    for plan in job.plans:
        seconds = t.get(plan.key, 0.0)
        throughput[f"{plan.key}_images_per_second"] = audited / seconds if seconds > 0 else float("nan")
    notes = [f"Intervals: percentile bootstrap, {n_boot} resamples, {100 * level:g} %. Disparity: groups with "
             f"fewer than {min_group_images} images are left out of the test; the flag needs the gap's "
             "Bonferroni-corrected interval (over all pairs of groups) to exclude zero."]
    if not job.evidence:
        notes.append("Kept evidence was not measured (run with --evidence).")
    else:
        notes.append(f"Kept evidence: share of the top {100 * job.share:g} % patches by the unslimmed model's "
                     "attention rollout that some token still stands for after the last block (merged counts "
                     "as kept).")
    return AuditReport(
        model=job.model.name, weights=job.model.weights_name, data=data.name, images=len(data), audited=audited,
        baseline_top1=mean_interval(before_all, n_boot, seed, ("before", "all", ALL_GROUP), level),
        baseline_gmacs=out.baseline_gmacs, groupings=list(group_of), rows=rows, disparities=disparities,
        skipped=skipped, throughput=throughput, settings=job_settings(job), command=command,
        written=time.strftime("%Y-%m-%d %H:%M:%S %Z"), notes=notes,
    )


# --------------------------------------------------------------------------- CSV / JSON

def _csv(rows: Sequence[Any], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        record = asdict(row)
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in record.items()})
    return buffer.getvalue()


def groups_csv(report: AuditReport) -> str:
    """One line per method x rho x grouping x group."""
    return _csv(report.rows, [f.name for f in fields(GroupRow)])


def disparity_csv(report: AuditReport) -> str:
    """One line per method x rho x grouping."""
    return _csv(report.disparities, [f.name for f in fields(DisparityRow)])


def skipped_csv(report: AuditReport) -> str:
    """Everything left out, with the reason."""
    return _csv(report.skipped, [f.name for f in fields(Skipped)])


def report_json(report: AuditReport) -> str:
    return json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n"


# --------------------------------------------------------------------------- charts

def drop_figure(report: AuditReport, by: str):
    """Accuracy drop (points) vs rho, one panel per method, one line per group of ``by``, 95 % error bars."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    methods = report.methods
    cols = min(3, len(methods))
    nrows = -(-len(methods) // cols)
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=methods, shared_yaxes=True,
                        horizontal_spacing=0.06, vertical_spacing=0.14)
    rows = [r for r in report.rows if r.by == by]
    by_budget = report.by_budget
    groups = list(dict.fromkeys(r.group for r in rows))
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf"]
    for k, method in enumerate(methods):
        r, c = k // cols + 1, k % cols + 1
        for j, group in enumerate(groups):
            points = sorted((x for x in rows if x.method == method and x.group == group),
                            key=lambda x: x.budget if by_budget else x.keep_ratio)
            if not points:
                continue
            y = [100 * p.drop for p in points]
            fig.add_trace(go.Scatter(
                x=[p.budget if by_budget else p.keep_ratio for p in points], y=y, mode="lines+markers",
                name=html.escape(str(group)),
                legendgroup=str(group),
                showlegend=k == 0, line=dict(color=palette[j % len(palette)]),
                error_y=dict(type="data", symmetric=False, array=[100 * p.drop_high - v for p, v in zip(points, y)],
                             arrayminus=[v - 100 * p.drop_low for p, v in zip(points, y)], thickness=1),
                customdata=[[p.images, 100 * p.top1_before, 100 * p.top1_after, 100 * p.flip_rate] for p in points],
                hovertemplate=(f"{html.escape(str(group))}<br>{'budget' if by_budget else 'rho'} %{{x:g}}: "
                               "drop %{y:.1f} points<br>"
                               "top-1 %{customdata[1]:.1f} → %{customdata[2]:.1f} %<br>flips %{customdata[3]:.1f} %"
                               "<br>%{customdata[0]} images<extra></extra>"),
            ), row=r, col=c)
        fig.update_xaxes(autorange="reversed", title_text="compute budget" if by_budget else "keep ratio rho",
                         row=r, col=c)
    fig.update_yaxes(title_text="accuracy drop (points)", col=1)
    fig.add_hline(y=0, line=dict(color="#999999", dash="dot"))
    fig.update_layout(template="plotly_white", height=360 * nrows + 80,
                      title=f"Accuracy drop by {by} vs {'compute budget' if by_budget else 'keep ratio'} "
                            "(95 % intervals)",
                      legend=dict(title=by, orientation="v", yanchor="top", y=1, xanchor="left", x=1.02),
                      margin=dict(l=50, r=20, t=80, b=40))
    return fig


def figures(report: AuditReport) -> dict[str, Any]:
    """``by`` -> :func:`drop_figure` for every grouping but ``all`` (``all`` when it is the only one)."""
    groupings = [g for g in report.groupings if g != "all"] or ["all"]
    return {by: drop_figure(report, by) for by in groupings}


FLAG_MARK = "▲"


def _group_order(report: AuditReport, by: str) -> list[str]:
    groups = list(dict.fromkeys(r.group for r in report.rows if r.by == by))
    return groups if by == "class" else sorted(groups)


def matrix_figure(report: AuditReport, groupings: Sequence[str], scale: float | None = None,
                  title: str = "Accuracy drop (points) by group"):
    """The audit at a glance: accuracy drop in points, one row per method x rho, one column per group, one panel
    per grouping (``overall`` first), coloured red for a loss and blue for a gain on one scale; the most hurt
    group of each flagged combination is boxed and marked ▲.

    Args:
        report: the audit.
        groupings: the panels after ``overall`` (e.g. ``["brightness", "family"]`` or ``["class"]``).
        scale: the colour scale's half-range in points (default: the largest drop shown); give the same to
            several figures to make their colours comparable.
        title: the figure's title.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    keys = list(dict.fromkeys((r.method, r.keep_ratio) for r in report.rows))
    budgets = {(r.method, r.keep_ratio): r.budget for r in report.rows}
    labels = [f"{m}  ρ {r:g}" if math.isnan(budgets[m, r]) else f"{m}  budget {budgets[m, r]:g} (ρ {r:.3g})"
              for m, r in keys]
    panels = ["all", *[g for g in groupings if g != "all"]]
    columns = {by: _group_order(report, by) for by in panels}
    cell = {(r.method, r.keep_ratio, r.by, r.group): r for r in report.rows}
    flagged = {(d.method, d.keep_ratio, d.by): d for d in report.disparities if d.flagged}
    shown = [abs(100 * r.drop) for r in report.rows if r.by in panels and math.isfinite(r.drop)]
    half = scale or max(shown + [1.0])
    widths = [max(len(columns[by]), 1) for by in panels]
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True, column_widths=widths,
                        horizontal_spacing=min(0.04, 0.3 / max(len(panels), 1)),
                        subplot_titles=["overall" if by == "all" else f"by {by}" for by in panels])
    boxes: list[tuple[int, int, int]] = []  # (panel, column, row) of each flagged cell
    for c, by in enumerate(panels, start=1):
        groups = columns[by]
        z, text, custom = [], [], []
        for i, (method, rho) in enumerate(keys):
            z_row, text_row, custom_row = [], [], []
            worst = flagged.get((method, rho, by))
            for j, group in enumerate(groups):
                row = cell.get((method, rho, by, group))
                value = 100 * row.drop if row is not None and math.isfinite(row.drop) else None
                mark = worst is not None and worst.worst_group == group
                z_row.append(value)
                text_row.append("" if value is None else f"{value:.1f}" + (f" {FLAG_MARK}" if mark else ""))
                custom_row.append([row.images, 100 * row.top1_before, 100 * row.top1_after, 100 * row.drop_low,
                                   100 * row.drop_high] if row is not None else [0, 0, 0, 0, 0])
                if mark:
                    boxes.append((c, j, i))
            z.append(z_row)
            text.append(text_row)
            custom.append(custom_row)
        names = ["all images" if by == "all" else html.escape(str(g)) for g in groups]
        fig.add_trace(go.Heatmap(
            z=z, x=names, y=labels, text=text, texttemplate="%{text}", customdata=custom,
            colorscale="RdBu_r", zmin=-half, zmax=half, zmid=0, xgap=2, ygap=2, showscale=c == len(panels),
            colorbar=dict(title=dict(text="drop<br>(points)"), thickness=12, len=0.9),
            hovertemplate=("%{y}, %{x}<br>drop %{z:.1f} points (95 % %{customdata[3]:.1f} to %{customdata[4]:.1f})"
                           "<br>top-1 %{customdata[1]:.1f} → %{customdata[2]:.1f} %<br>%{customdata[0]} images"
                           "<extra></extra>"),
        ), row=1, col=c)
        fig.update_xaxes(side="top", tickangle=0 if len(groups) <= 4 else -35, row=1, col=c)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    boundaries = [i for i in range(1, len(keys)) if keys[i][0] != keys[i - 1][0]]
    for c in range(1, len(panels) + 1):
        for b in boundaries:  # a rule between methods
            fig.add_shape(type="line", x0=-0.5, x1=len(columns[panels[c - 1]]) - 0.5, y0=b - 0.5, y1=b - 0.5,
                          row=1, col=c, line=dict(color="#666666", width=1.5))
    for c, j, i in boxes:  # after the rules, so that they do not cut a box
        fig.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=i - 0.5, y1=i + 0.5, row=1, col=c,
                      line=dict(color="#111111", width=2.5))
    fig.update_annotations(yshift=28, font=dict(size=14))  # panel titles above the top tick labels
    fig.update_layout(template="plotly_white", height=26 * len(keys) + 150,
                      title=dict(text=title, x=0, xanchor="left", y=0.995, yanchor="top"),
                      margin=dict(l=10, r=10, t=100, b=10), font=dict(size=12))
    return fig


def matrix_figures(report: AuditReport) -> dict[str, Any]:
    """The report's first pictures (:func:`matrix_figure`): ``"groups"`` (the groupings besides class, when
    there are any) and ``"class"``, on one colour scale."""
    rows = [abs(100 * r.drop) for r in report.rows if math.isfinite(r.drop)]
    scale = max(rows + [1.0])
    groupings = [g for g in report.groupings if g not in ("all", "class")]
    out = {}
    if groupings:
        out["groups"] = matrix_figure(report, groupings, scale,
                                      f"Accuracy drop (points) by group: {', '.join(groupings)}")
    if "class" in report.groupings:
        out["class"] = matrix_figure(report, ["class"], scale, "Accuracy drop (points) by class")
    return out


@dataclass(frozen=True)
class MethodFindings:
    """One method's disparity findings, for a collapsed summary.

    Attributes:
        method: the method's label.
        flagged, total: flagged rho x grouping combinations, of all tested.
        headline: one sentence: the flagged combination with the largest difference, or that none is flagged.
        disparities: the method's rows, flagged first, then by grouping and rho.
    """

    method: str
    flagged: int
    total: int
    headline: str
    disparities: list[DisparityRow]


def method_findings(report: AuditReport) -> list[MethodFindings]:
    """The disparity findings grouped by method, in the report's method order."""
    out = []
    for method in report.methods:
        rows = [d for d in report.disparities if d.method == method]
        if not rows:
            continue
        flagged = [d for d in rows if d.flagged]
        if flagged:
            top = max(flagged, key=lambda d: d.gap)
            amount = f"ρ {top.keep_ratio:g}" if math.isnan(top.budget) else f"budget {top.budget:g}"
            headline = (f"largest flagged difference: by {top.by} at {amount}, '{top.worst_group}' loses "
                        f"{100 * top.worst_drop:.1f} points, '{top.best_group}' {100 * top.best_drop:.1f}")
        else:
            headline = "no group is hurt more than the others beyond the noise"
        order = sorted(rows, key=lambda d: (not d.flagged, d.by, -d.keep_ratio))
        out.append(MethodFindings(method, len(flagged), len(rows), headline, order))
    return out


# --------------------------------------------------------------------------- HTML

def _fmt(value: Any, kind: str = "") -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else ""
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if kind == "pct":
            return f"{100 * value:.1f}"
        if kind == "pts":
            return f"{100 * value:+.1f}"
        if kind == "ratio":
            return f"{value:.3f}"
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(rows: Sequence[Any], columns: Sequence[tuple[str, str, str]], css: str = "") -> str:
    """An HTML table; columns are ``(attribute, header, kind)``."""
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in columns)
    body = []
    for row in rows:
        cells = "".join(f"<td>{_fmt(getattr(row, a), kind)}</td>" for a, _, kind in columns)
        flagged = getattr(row, "flagged", False)
        body.append(f"<tr class='flag'>{cells}</tr>" if flagged else f"<tr>{cells}</tr>")
    return f"<table class='{css}'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


GROUP_COLUMNS = (
    ("method", "method", ""), ("keep_ratio", "ρ", ""), ("group", "group", ""), ("images", "images", ""),
    ("top1_before", "top-1 before %", "pct"), ("top1_before_low", "low", "pct"), ("top1_before_high", "high", "pct"),
    ("top1_after", "top-1 after %", "pct"), ("top1_after_low", "low", "pct"), ("top1_after_high", "high", "pct"),
    ("drop", "drop (points)", "pts"), ("drop_low", "low", "pts"), ("drop_high", "high", "pts"),
    ("flip_rate", "flips %", "pct"), ("confidence_change", "confidence change", "pts"),
    ("kept_evidence", "kept evidence %", "pct"), ("gmacs", "GMACs", ""), ("keep_ratio_reached", "ρ reached", ""),
)
DISPARITY_COLUMNS = (
    ("method", "method", ""), ("keep_ratio", "ρ", ""), ("by", "grouping", ""), ("groups", "groups", ""),
    ("overall_drop", "overall drop", "pts"), ("worst_group", "most hurt", ""), ("worst_drop", "its drop", "pts"),
    ("best_group", "least hurt", ""), ("best_drop", "its drop", "pts"), ("gap", "difference (max − min)", "pts"),
    ("gap_low", "95 % low", "pts"), ("gap_high", "95 % high", "pts"), ("adjusted_low", "corrected low", "pts"),
    ("flagged", "flagged", ""), ("top1_after_ratio", "top-1 after ratio (min / max)", "ratio"),
    ("excluded", "left out (too few images)", ""),
)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;
padding:0 16px}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:0.85em;margin:8px 0 16px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right}th{background:#f4f4f4;position:sticky;top:0}
td:nth-child(-n+3){text-align:left}tr.flag td{background:#fde8e8}
.flags li{margin:4px 0}.flagged{color:#a40000}.ok{color:#1d6b2f}.facts td{text-align:left}
details{margin:8px 0}.note{color:#555;font-size:0.9em}.chart{margin:12px 0}
.lead{font-size:1.05em;margin:4px 0 12px}.method>summary{cursor:pointer;padding:4px 0}
.method>summary b{display:inline-block;min-width:7em}.method ul{margin:4px 0 10px}
.badge{display:inline-block;min-width:6.5em;padding:1px 8px;border-radius:10px;font-size:0.85em;margin-right:8px;
text-align:center}.badge.flagged{background:#fde8e8}.badge.ok{background:#e6f4ea}
"""


def _plotly_loader(mode: str) -> str:
    """The script tags that make ``Plotly`` available offline, then call ``renderCharts()``."""
    from plotly.offline import get_plotlyjs

    source = get_plotlyjs()
    if mode == "inline":
        return f"<script type='text/javascript'>{source}</script>\n<script>renderCharts();</script>"
    if mode != "compressed":
        raise ValueError(f"plotly must be 'inline' or 'compressed', got {mode!r}")
    packed = base64.b64encode(gzip.compress(source.encode("utf-8"), 9, mtime=0)).decode("ascii")
    return (
        "<script>\n(async () => {\n  const box = document.getElementById('charts-status');\n"
        "  try {\n    if (typeof DecompressionStream === 'undefined') throw new Error('no DecompressionStream');\n"
        f"    const packed = '{packed}';\n"
        "    const bytes = Uint8Array.from(atob(packed), c => c.charCodeAt(0));\n"
        "    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('gzip'));\n"
        "    const code = await new Response(stream).text();\n    (0, eval)(code);\n    renderCharts();\n"
        "    box.remove();\n  } catch (err) {\n"
        "    box.textContent = 'This browser could not unpack the embedded charts (' + err.message + '); the "
        "tables below hold every number.';\n  }\n})();\n</script>"
    )


def _findings_html(report: AuditReport) -> str:
    """The disparity sentences grouped by method, each method collapsed to one line."""
    parts = []
    for f in method_findings(report):
        badge = (f"<span class='badge flagged'>{f.flagged} of {f.total} flagged</span>" if f.flagged else
                 f"<span class='badge ok'>0 of {f.total} flagged</span>")
        items = "".join(f"<li class='{'flagged' if d.flagged else 'ok'}'>{html.escape(d.message)}</li>"
                        for d in f.disparities)
        parts.append(f"<details class='method'><summary>{badge}<b>{html.escape(f.method)}</b> "
                     f"{html.escape(f.headline)}</summary><ul class='flags'>{items}</ul></details>")
    return "".join(parts)


def html_report(report: AuditReport, plotly: str = "compressed") -> str:
    """One self-contained HTML page: the drop matrix first, then the findings by method (collapsed), the
    disparity table, the drop-vs-rho charts, the tables, skipped items, facts and settings."""
    matrices = matrix_figures(report)
    figs = {**{f"matrix-{k}": fig for k, fig in matrices.items()},
            **{f"chart-{i}": fig for i, fig in enumerate(figures(report).values())}}
    specs = {key: json.loads(fig.to_json()) for key, fig in figs.items()}
    flagged = report.flagged()
    summary = (f"<b>{len(flagged)} of {len(report.disparities)}</b> method × ρ × grouping combinations hurt one "
               "group more than the others beyond the noise." if flagged else
               f"In none of the {len(report.disparities)} method × ρ × grouping combinations is a group hurt more "
               "than the others beyond the noise." if report.disparities else
               "There is one group and one class only: nothing to compare.")
    lead = (f"{html.escape(report.model)} on {html.escape(report.data)}: {report.audited} images audited, unslimmed "
            f"top-1 {100 * report.baseline_top1.value:.1f} %. "
            f"<span class='{'flagged' if flagged else 'ok'}'>{summary}</span>")
    tp = report.throughput
    facts = [
        ("Model", f"{report.model} ({report.weights})"), ("Data", report.data),
        ("Images", f"{report.audited} audited of {report.images} "
                   f"({len(report.skipped)} entries in “Skipped” below)"),
        ("Unslimmed top-1", f"{100 * report.baseline_top1.value:.2f} % (95 % interval "
                            f"{100 * report.baseline_top1.low:.2f} – {100 * report.baseline_top1.high:.2f})"),
        ("Unslimmed GMACs / image", f"{report.baseline_gmacs:.4g}"),
        ("Throughput", f"{tp.get('baseline_images_per_second', float('nan')):.0f} images/s unslimmed forward, "
                       f"{tp.get('decode_images_per_second', float('nan')):.0f} images/s decoding"),
        ("Groupings", ", ".join(report.groupings)), ("Written", report.written),
    ]
    if report.command:
        facts.append(("Command", report.command))
    facts_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    matrix_divs = "".join(f"<div class='chart' id='{key}'></div>" for key in specs if key.startswith("matrix-"))
    chart_divs = "".join(f"<div class='chart' id='{key}'></div>" for key in specs if key.startswith("chart-"))
    budget_column = (("budget", "budget", ""),) if report.by_budget else ()
    group_columns = GROUP_COLUMNS[:1] + budget_column + GROUP_COLUMNS[1:]
    disparity_columns = DISPARITY_COLUMNS[:1] + budget_column + DISPARITY_COLUMNS[1:]
    group_tables = []
    for by in report.groupings:
        rows = [r for r in report.rows if r.by == by]
        title = {"all": "All images", "class": "Per class"}.get(by, f"Per group: {by}")
        group_tables.append(f"<h3>{html.escape(title)}</h3>" + _table(rows, group_columns))
    skipped_rows = "".join(
        f"<tr><td>{html.escape(s.kind)}</td><td>{html.escape(s.item)}</td><td>{s.count}</td>"
        f"<td>{html.escape(s.reason)}</td></tr>" for s in report.skipped
    )
    skipped_html = (f"<p>{len(report.skipped)} entries ({sum(s.count for s in report.skipped)} files) were left "
                    "out:</p><table><thead><tr><th>kind</th><th>item</th><th>files</th><th>reason</th></tr></thead>"
                    f"<tbody>{skipped_rows}</tbody></table>" if report.skipped else "<p>Nothing was skipped.</p>")
    settings = html.escape(json.dumps(_clean(report.settings), indent=1))
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in report.notes)
    charts_json = json.dumps(specs).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>patchslim audit: {html.escape(report.model)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body>
<h1>Audit of patch slimming: {html.escape(report.model)}</h1>
<p class="lead">{lead}</p>
<p id="charts-status" class="note">Loading the charts…</p>
{matrix_divs}
<p class="note">Each cell: the accuracy drop in percentage points (top-1 before minus after slimming, on the same
images) of one group, for one method at one keep ratio ρ; red is a loss, blue a gain. {FLAG_MARK} and a box mark the
most hurt group where the gap to the least hurt one is beyond the noise (flagged). Hover a cell for its interval.</p>
<h2>Which group pays? By method</h2>
{_findings_html(report)}
{notes}
<h2>Disparity</h2>
<p class="note">In the words of Fairlearn's <code>MetricFrame</code>: the by-group values of the accuracy drop, its
overall value, its difference (max − min over the groups tested) with a 95 % interval, and the ratio (min / max) of
the top-1 after slimming.</p>
{_table(report.disparities, disparity_columns)}
<h2>Accuracy drop by group vs {'compute budget' if report.by_budget else 'keep ratio'}</h2>
{chart_divs}
<h2>Tables</h2>
<p class="note">Top-1 before and after slimming with their 95 % intervals (low, high), the paired accuracy drop in
percentage points, the share of predictions slimming changed (flips), the mean change of the probability of the
unslimmed prediction (points), the mean share of kept evidence, GMACs per image and the keep ratio reached.</p>
{''.join(group_tables)}
<h2>Skipped</h2>
{skipped_html}
<h2>About this audit</h2>
<table class="facts">{facts_html}</table>
<details><summary>The job's settings</summary><pre>{settings}</pre></details>
<script>
const CHARTS = {charts_json};
function renderCharts() {{
  for (const [id, spec] of Object.entries(CHARTS)) {{
    Plotly.newPlot(id, spec.data, spec.layout, {{responsive: true, displaylogo: false}});
  }}
}}
</script>
{_plotly_loader(plotly)}
</body></html>
"""


def write_report(report: AuditReport, out_dir: str | Path, plotly: str = "compressed") -> dict[str, Path]:
    """Writes ``audit_groups.csv``, ``audit_disparity.csv``, ``audit_skipped.csv``, ``audit.json`` and
    ``audit.html`` into ``out_dir``.

    Returns:
        kind -> path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(groups_csv=out / "audit_groups.csv", disparity_csv=out / "audit_disparity.csv",
                 skipped_csv=out / "audit_skipped.csv", json=out / "audit.json", html=out / "audit.html")
    texts = dict(groups_csv=groups_csv(report), disparity_csv=disparity_csv(report), skipped_csv=skipped_csv(report),
                 json=report_json(report), html=html_report(report, plotly))
    for kind, text in texts.items():  # atomically: torchrun ranks that finish together may both write
        tmp = paths[kind].with_name(f".{paths[kind].name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, paths[kind])
    return paths


def markdown_summary(report: AuditReport) -> str:
    """A short text summary for the terminal: the facts, overall rows, and the disparity sentences."""
    lines = [f"Model {report.model} ({report.weights}); data: {report.data}.",
             f"{report.audited} of {report.images} images audited; unslimmed top-1 "
             f"{100 * report.baseline_top1.value:.2f} % [{100 * report.baseline_top1.low:.2f}, "
             f"{100 * report.baseline_top1.high:.2f}]; {len(report.skipped)} skipped entries.", "",
             "| method | " + ("budget | " if report.by_budget else "") + "rho | top-1 after % | drop (points) "
             "[95 %] | flips % | GMACs |",
             "|---|" + ("---:|" if report.by_budget else "") + "---:|---:|---:|---:|---:|"]
    for r in report.rows:
        if r.by == "all":
            budget = f"{r.budget:g} | " if report.by_budget else ""
            rho = f"{r.keep_ratio:.3g}" if report.by_budget else f"{r.keep_ratio:g}"
            lines.append(f"| {r.method} | {budget}{rho} | {100 * r.top1_after:.2f} | {100 * r.drop:.2f} "
                         f"[{100 * r.drop_low:.2f}, {100 * r.drop_high:.2f}] | {100 * r.flip_rate:.1f} | "
                         f"{r.gmacs:.4g} |")
    lines.append("")
    flagged = report.flagged()
    lines.append(f"Disparity: {len(flagged)} of {len(report.disparities)} method x rho x grouping combinations "
                 "flagged (every sentence: audit_disparity.csv and audit.html).")
    lines += [f"- {f.method}: {f.flagged} of {f.total} flagged; {f.headline}." for f in method_findings(report)]
    return "\n".join(lines) + "\n"
