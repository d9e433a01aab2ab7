"""Figure 1 analogue: FLOPs reduction against the keep ratio rho, one line per method.

GMACs are analytic (:func:`patchslim.metrics.count_macs`) from the token counts of a real forward of one
image of a randomly initialized model (at a target rho the counts of these methods do not depend on the
weights), the selection's own multiply-adds included. Each method acts at its default placement with keep
ratio rho per stage, so a multi-stage method (EViT at 3 blocks) or a per-block one (ToMe) reaches a
different reduction at the same rho than pruning once at the input: the figure shows how much.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from patchslim.benchmarks import common

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class Figure1Config:
    """What Figure 1 computes.

    Attributes:
        model: the model name (random initialization).
        methods: method labels (None: every registered method).
        keep_ratios: the x axis.
        stem: file name stem of the outputs.
    """

    model: str = "deit_small_patch16_224"
    methods: tuple[str, ...] | None = None
    keep_ratios: tuple[float, ...] = DEFAULT_RATIOS
    stem: str = "figure1_flops"

    def labels(self) -> list[str]:
        from patchslim.methods import method_names

        return list(self.methods) if self.methods else method_names()

    def jobs(self) -> list[tuple[str, float]]:
        return [(label, rho) for label in self.labels() for rho in sorted(self.keep_ratios)]


def run_figure1(config: Figure1Config, tick: common.Tick | None = None) -> common.BenchmarkResult:
    """Computes Figure 1 (see the module docstring); ``tick(description)`` after every (method, rho)."""
    from patchslim import metrics
    from patchslim.engine import run
    from patchslim.models import load_model

    load_before = common.load_average()
    model = load_model(config.model, device="cpu", pretrained=False)
    labels = config.labels()
    variants = {v.label: v for v in common.variants(labels)}
    ratios = sorted(config.keep_ratios)
    image = common.random_images(model, 1)
    baseline = metrics.baseline_macs(model.spec).gmacs
    rows, skipped = [], {}
    for label, rho in config.jobs():
        variant = variants[label]
        plan, reason = common.variant_plan(model, variant, rho)
        if plan is None:
            skipped.setdefault(label, reason)
        else:
            trace = run(model, image, plan)
            report = metrics.count_macs(trace)
            rows.append(dict(model=config.model, method=label, placement=common.placement(model, variant),
                             keep_ratio=rho, keep_ratio_reached=trace.keep_ratio,
                             mean_keep_ratio=trace.mean_keep_ratio, gmacs=report.gmacs, baseline_gmacs=baseline,
                             selection_gmacs=report.selection / 1e9,
                             flops_reduction_pct=100 * (1 - report.gmacs / baseline)))
        if tick:
            tick(f"figure1 {label} rho {rho:g}")

    shown = [label for label in labels if any(r["method"] == label for r in rows)]
    header = [("method", "method"), ("placement", "acts")] + [(f"r{rho:g}", f"rho {rho:g}") for rho in ratios[::-1]]
    pivot = []
    for label in shown:
        part = [r for r in rows if r["method"] == label]
        line = {"method": label, "placement": part[0]["placement"]}
        # one decimal, and no "-0.0" where only the selection's own multiply-adds are left at rho = 1
        line.update({f"r{r['keep_ratio']:g}": round(r["flops_reduction_pct"], 1) + 0.0 for r in part})
        pivot.append(line)
    body = (f"FLOPs (GMACs) reduction in % against the unslimmed {config.model} ({baseline:.2f} GMACs per image), "
            "keep ratio rho per stage, each method at its default placement; selection multiply-adds included.\n\n"
            + common.markdown_table(pivot, header, 1))
    notes = [f"skipped {label}: {reason}" for label, reason in skipped.items()]
    notes.append("the dotted line 1 - rho is what pruning at the input would save if every multiply-add "
                 "scaled with the token count; attention's N^2 term makes input pruning save slightly more, "
                 "the patch embedding (always on all N patches) slightly less")
    result = common.BenchmarkResult(
        name="figure1", stem=config.stem, title="Figure 1 analogue: FLOPs reduction vs keep ratio",
        rows=rows, body=body, notes=notes, load=(load_before, common.load_average()))
    result.figure = _figure(rows, shown, config.model, baseline)
    result.figure_fallback = lambda path: _matplotlib(rows, shown, config.model, path)
    return result


def _figure(rows: list[dict], shown: list[str], model: str, baseline: float):
    import plotly.graph_objects as go

    fig = go.Figure()
    for label in shown:
        part = [r for r in rows if r["method"] == label]
        fig.add_trace(go.Scatter(x=[r["keep_ratio"] for r in part], y=[r["flops_reduction_pct"] for r in part],
                                 mode="lines+markers", name=f"{label} ({part[0]['placement']})"))
    fig.add_trace(go.Scatter(x=[0, 1], y=[100, 0], mode="lines", name="1 - rho",
                             line=dict(color="gray", dash="dot")))
    fig.update_layout(title=f"FLOPs reduction vs keep ratio rho: {model} ({baseline:.2f} GMACs unslimmed)",
                      xaxis_title="keep ratio rho (per stage)", yaxis_title="FLOPs (GMACs) reduction (%)",
                      template="plotly_white", width=900, height=600,
                      legend=dict(orientation="h", yanchor="top", y=-0.15, xanchor="left", x=0))
    fig.update_xaxes(autorange="reversed")
    return fig


def _matplotlib(rows: list[dict], shown: list[str], model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5.6), dpi=120)
    for label in shown:
        part = [r for r in rows if r["method"] == label]
        axes.plot([r["keep_ratio"] for r in part], [r["flops_reduction_pct"] for r in part], marker="o",
                  label=f"{label} ({part[0]['placement']})")
    axes.plot([0, 1], [100, 0], color="gray", linestyle=":", label="1 - rho")
    axes.invert_xaxis()
    axes.set_xlabel("keep ratio rho (per stage)")
    axes.set_ylabel("FLOPs (GMACs) reduction (%)")
    axes.set_title(f"FLOPs reduction vs keep ratio rho: {model}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
