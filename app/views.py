"""Drawing the results: readouts, overlays, predictions, charts and downloads.

Every function here draws the data it is given (numbers, pictures, figures made by :mod:`app.compute`) and
calls neither the engine nor :mod:`app.compute`: a page computes, then hands the result to a view, each pair
inside one :class:`app.panels.panel`. ``compute`` is imported for its data types only.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Callable

import numpy as np
import streamlit as st
from PIL import Image

from app import compute, widgets

FONT = dict(size=16)  # readable on a projector
PICTURE_QUALITY = 90  # JPEG quality of the pictures sent to the browser


def _shown(target, image: Image.Image) -> None:
    """A picture the width of its column in ``target`` (``st`` or a column), sent as JPEG at quality 90: Streamlit
    encodes an RGB picture at quality 100, which for a 448-pixel overlay took 2.4 ms and 250 KB on every slider move
    against 1.7 ms and 110 KB (three pictures move with rho on the Explore page)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=PICTURE_QUALITY)
    target.image(buffer.getvalue(), width="stretch")


# The readout cards (st.metric) cut their label, value and delta with an ellipsis when a card is narrow: five cards
# on a 1280 px screen with the sidebar open showed "0.187 ...", "Latency per im...". These rules let the text wrap
# between words and size the value by the window's width (the full 2.25 rem from about 1700 px); when the row is
# too narrow for six readable cards (under 1100 px: a 1280 px screen with the sidebar open), the cards go three to
# a row (a container query on the row's own width), so every card reads in full from 1280 to 1920 px and on a
# projector. Streamlit's own test ids and the row's key name the parts. The top-5 tables (``table.top5``, plain
# HTML: app.widgets.predictions_table) get their bars here; nothing else is restyled.
PAGE_STYLE = """<style>
[data-testid="stMetricLabel"] *, [data-testid="stMetricValue"] *, [data-testid="stMetricDelta"] * {
  white-space: normal !important; overflow: visible !important; text-overflow: clip !important;
  overflow-wrap: break-word;
}
[data-testid="stMetricValue"] { font-size: clamp(1.3rem, 2.05vw, 2.25rem) !important; line-height: 1.2; }
[data-testid="stMetricDelta"] { height: auto !important; }
table.top5 { width: 100%; border-collapse: collapse; font-size: 0.95rem; }
table.top5 th { text-align: left; font-weight: 600; color: rgba(49, 51, 63, 0.7); }
table.top5 th, table.top5 td { padding: 0.3rem 0.5rem; border-bottom: 1px solid rgba(49, 51, 63, 0.1); }
table.top5 td.bar { width: 40%; }
table.top5 td.bar span { display: block; height: 0.6rem; border-radius: 0.3rem; background: #1f77b4; }
table.top5 td.p { width: 5.5rem; text-align: right; font-variant-numeric: tabular-nums; }
.st-key-readouts { container-type: inline-size; }
@container (max-width: 1100px) {
  .st-key-readouts [data-testid="stHorizontalBlock"] { flex-wrap: wrap !important; row-gap: 1rem; }
  .st-key-readouts [data-testid="stColumn"] {
    flex: 1 1 calc(33.3% - 1rem) !important; min-width: calc(33.3% - 1rem) !important;
    max-width: calc(33.4% - 0.5rem) !important; width: calc(33.3% - 1rem) !important;
  }
}
</style>"""


def page_style() -> None:
    """The app's few style rules (:data:`PAGE_STYLE`), once per page run."""
    st.html(PAGE_STYLE)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def change(after: float, before: float, before_text: str) -> dict:
    """``st.metric`` delta arguments for ``before -> after``: the relative change and where it came from, coloured
    as a cost (down is good); a change that rounds to 0 % reads "no change" without an arrow or a colour, so an
    unchanged readout never shows as a red increase of "+0%". No delta when there is nothing to compare with."""
    if not before > 0:
        return dict(delta=None)
    relative = after / before - 1
    if round(relative * 100) == 0:
        return dict(delta=f"no change (from {before_text})", delta_color="off", delta_arrow="off")
    return dict(delta=f"{relative:+.0%} (from {before_text})", delta_color="inverse")


def readout_row(r: compute.Costs, device: str, windowed: bool = False, model=None) -> None:
    """GMACs, latency, memory, rho reached and tokens, each before -> after (``device``: where it ran;
    ``windowed``: a Swin, whose tokens all come back after the blocks they sat out), and the model's weights as
    stored (``model``: the loaded model; slimming does not change them)."""
    cols = st.container(key="readouts").columns(6 if model is not None else 5)  # the key: PAGE_STYLE
    card = dict(border=True, height="stretch")  # one height for the row, whichever card wraps most
    cols[0].metric("GMACs per image", f"{r.gmacs_after:.3g}",
                   **change(r.gmacs_after, r.gmacs_before, f"{r.gmacs_before:.3g}"),
                   help="Analytic multiply-adds of the slimmed forward (patchslim.metrics.flops), "
                        "selection cost included; the delta compares with the unslimmed model.", **card)
    cols[1].metric("Latency per image", _ms(r.latency_after),
                   **change(r.latency_after, r.latency_before, _ms(r.latency_before)), **card,
                   help=f"Measured wall time of this image's forward on {device.upper()}, attention "
                        "maps kept: the fastest of up to 3 runs for a small model, one run for a large one "
                        "(noisy). 'Measure the speed-up properly' below and the Benchmark page take medians "
                        "over many interleaved runs.")
    cols[2].metric("Activation memory", f"{r.memory_after:.3g} MB",
                   **change(r.memory_after, r.memory_before, f"{r.memory_before:.3g}"), **card,
                   help="Analytic peak of activation memory per image for this plan (patchslim.metrics.memory), "
                        "without the attention maps kept for display; bytes per element from the model's "
                        "precision (fp32: 4, bf16 / fp16: 2).")
    cols[3].metric("ρ reached", f"{r.keep_ratio_reached:.2f}", **card,
                   help="The smallest share of its tokens a block ran on: the share kept in the slimmed blocks "
                        "(a Swin's other tokens sit the block out and come back for the next)." if windowed else
                        "Patch tokens left after the last block / patches of the image (N′/N).")
    cols[4].metric("Tokens in last block", f"{r.tokens_after[-1]}", delta=f"of {r.tokens_before[-1]}",
                   delta_color="off", delta_arrow="off", **card,
                   help=("Tokens" if windowed else "Tokens (CLS included)") + " the last block ran on; the chart "
                        "below shows every block.")
    if model is not None:
        cols[5].metric("Weights", f"{model.weights_mb:.3g} MB", delta=model.precision_label, delta_color="off",
                       delta_arrow="off", **card,
                       help="The model's weights as stored (int8 layers at one byte per weight plus their scales); "
                            "slimming leaves them as they are, int8 makes them about 4x smaller. GMACs stay "
                            "multiply-adds in every precision.")


def picture(image: Image.Image, caption: str | None = None) -> None:
    """A picture the width of its column (the kept / dropped / merged overlay)."""
    _shown(st, image)
    if caption:
        st.caption(caption)


def prediction_change(r: compute.Prediction, true_label: str | None) -> None:
    """The label flip (or not) and the confidence change, then the two top-5 lists."""
    before_label, before_p = r.top5_before[0]
    after_label, after_p = r.top5_after[0]
    if r.flipped:
        st.error(f"**Label flipped:** {before_label} ({before_p:.1%}) → **{after_label}** ({after_p:.1%})")
    else:
        change = r.top1_confidence_after - r.top1_confidence_before
        st.success(f"**Same prediction:** {before_label}, confidence {r.top1_confidence_before:.1%} → "
                   f"{r.top1_confidence_after:.1%} ({change * 100:+.1f} points)")
    if true_label is not None:
        marks = [":green[**right**]" if label == true_label else ":red[**wrong**]" for label in (before_label, after_label)]
        st.caption(f"True label **{true_label}** · unslimmed {marks[0]} · slimmed {marks[1]}")
    st.markdown("**Unslimmed model**")
    widgets.predictions_table(r.top5_before, highlight=before_label)
    st.markdown("**Slimmed model**")
    widgets.predictions_table(r.top5_after, highlight=before_label)
    st.caption("➜ marks the unslimmed model's top-1 class in both lists.")


def tokens_chart(tokens_before: list[int], tokens_after: list[int],
                 title: str = "Tokens per block (CLS included)") -> None:
    """Tokens per block, unslimmed (dashed line) vs slimmed (bars), as a Vega-Lite spec with its data inline.

    Drawn on every rho change: building a plotly figure (which validates and deep-copies its input) and
    serializing it took about 5 ms of each; this spec is a small dict of plain values.
    """
    values = ([dict(block=i, tokens=int(n), model="slimmed") for i, n in enumerate(tokens_after)]
              + [dict(block=i, tokens=int(n), model="unslimmed") for i, n in enumerate(tokens_before)])
    encoding = dict(
        x=dict(field="block", type="ordinal", title="block", axis=dict(labelAngle=0)),
        y=dict(field="tokens", type="quantitative", title="tokens", scale=dict(zero=True)),
        color=dict(field="model", type="nominal", title=None, legend=dict(orient="right"),
                   scale=dict(domain=["slimmed", "unslimmed"], range=["#1f77b4", "#888888"])),
        tooltip=[dict(field="model"), dict(field="block"), dict(field="tokens")],
    )

    def only(name: str) -> list[dict]:
        return [dict(filter=f"datum.model == '{name}'")]

    spec = dict(
        height=320, title=dict(text=title, fontSize=FONT["size"], anchor="start"),
        data=dict(values=values), encoding=encoding,
        layer=[dict(mark=dict(type="bar"), transform=only("slimmed")),
               dict(mark=dict(type="line", point=True, strokeDash=[6, 4]), transform=only("unslimmed"))],
        config=dict(axis=dict(labelFontSize=14, titleFontSize=FONT["size"]),
                    legend=dict(labelFontSize=14)),
    )
    st.vega_lite_chart(spec=spec, width="stretch")


def attention_controls(kinds: dict[str, bool], depth: int, key: str, default_block: int | None = None,
                       scope: str = "") -> tuple[str, int]:
    """Which attention picture and which block; ``kinds``: name -> whether it depends on the block.

    ``default_block``: where the block slider starts (None: the last block); ``scope`` tells apart models of the
    same depth whose pictures differ (a ViT's and a Swin's), so each keeps its own block choice.
    """
    kind_col, block_col = st.columns([2, 3])
    kind_key = f"{key}_attention_kind"
    if st.session_state.get(kind_key) not in kinds:  # a choice made for another model's pictures
        st.session_state[kind_key] = next(iter(kinds))
    kind = kind_col.radio("Show", list(kinds), horizontal=True, key=kind_key)
    block_key = f"{key}_attention_block::{scope}{depth}"
    st.session_state.setdefault(block_key, depth - 1 if default_block is None else default_block)
    block = block_col.slider("Block", 0, depth - 1, key=block_key, disabled=not kinds[kind])
    return kind, block


def attention_pair(pair: compute.AttentionPair) -> None:
    """The unslimmed and the slimmed attention picture next to each other, and the caption."""
    for col, image in zip(st.columns(2), (pair.before, pair.after)):
        _shown(col, image)
    st.caption(pair.caption)


def metrics_record(readouts: compute.Readouts, settings, picked) -> dict:
    """The run's numbers as one flat dict (for the JSON / CSV downloads)."""
    r, p = readouts.costs, readouts.prediction
    return dict(
        model=settings.choice.model.name,
        weights=settings.choice.model.weights_name,
        device=str(settings.choice.model.device),
        precision=settings.choice.model.precision_label,
        weights_mb=settings.choice.model.weights_mb,
        image=picked.name,
        true_label=picked.label,
        method=settings.method,
        keep_ratio=settings.keep_ratio,
        options=json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in settings.options.items()}),
        keep_ratio_reached=r.keep_ratio_reached,
        gmacs_before=r.gmacs_before,
        gmacs_after=r.gmacs_after,
        gmacs_reduction=r.gmacs_reduction,
        latency_ms_before=r.latency_before * 1000,
        latency_ms_after=r.latency_after * 1000,
        memory_mb_before=r.memory_before,
        memory_mb_after=r.memory_after,
        tokens_per_block_before=" ".join(map(str, r.tokens_before)),
        tokens_per_block_after=" ".join(map(str, r.tokens_after)),
        top1_before=p.top5_before[0][0],
        top1_after=p.top5_after[0][0],
        label_flipped=p.flipped,
        top1_confidence_before=p.top1_confidence_before,
        top1_confidence_after=p.top1_confidence_after,
    )


def downloads(overlay_image: Callable[[], Image.Image | None], r: compute.Readouts, settings, picked) -> None:
    """Overlay PNG, metrics JSON and CSV; the files are made only when a button is clicked.

    ``overlay_image``: gives the overlay on screen when the button is clicked (its panel may have redrawn it since
    this row was drawn), or None when it could not be drawn.
    """
    record = metrics_record(r, settings, picked)
    stem = f"patchslim_{settings.method}_rho{settings.keep_ratio:.2f}"
    cols = st.columns(3)

    def png() -> bytes:
        buffer = io.BytesIO()
        overlay_image().save(buffer, format="PNG")
        return buffer.getvalue()

    def csv_text() -> str:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(record))
        writer.writeheader()
        writer.writerow(record)
        return text.getvalue()

    if overlay_image() is not None:
        cols[0].download_button("Overlay (PNG)", png, f"{stem}_overlay.png", "image/png", width="stretch",
                                on_click="ignore")
    else:
        cols[0].button("Overlay (PNG)", disabled=True, help="the overlay could not be drawn (see above)",
                       width="stretch")
    cols[1].download_button("Metrics (JSON)", lambda: json.dumps(record, indent=2), f"{stem}_metrics.json",
                            "application/json", width="stretch", on_click="ignore")
    cols[2].download_button("Metrics (CSV)", csv_text, f"{stem}_metrics.csv", "text/csv", width="stretch",
                            on_click="ignore")


# --------------------------------------------------------------------------- compare

PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
           "#999999", "#8C564B", "#7F7F7F", "#BCBD22")


def method_colours(names: list[str]) -> dict[str, str]:
    """A stable colour per method (Okabe-Ito first, in registry order), the same in every chart."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


OTHER_COLOUR = "#333333"


def method_grid(cards: list[compute.MethodCard], columns: int = 4) -> None:
    """One card per method: overlay, top-1 (flip marked), GMACs and rho reached, or why it could not run."""
    for start in range(0, len(cards), columns):
        cols = st.columns(columns)
        for col, card in zip(cols, cards[start:start + columns]):
            with col.container(border=True):
                st.markdown(f"#### {card.method}")
                if card.error:
                    st.warning(card.error)
                    continue
                _shown(st, card.overlay)
                flip = ":red[**label flipped**]" if card.flipped else "same as unslimmed"
                st.markdown(f"**{card.label}** {card.probability:.0%} · {flip}")
                if card.budget is not None:
                    st.markdown(f"ρ needed **{card.keep_ratio:.3g}** · {card.gmacs:.3g} GMACs "
                                f"({1 - card.gmacs_reduction:.3f} of unslimmed) · "
                                f"ρ reached {card.keep_ratio_reached:.2f}")
                else:
                    st.markdown(f"{card.gmacs:.3g} GMACs ({-card.gmacs_reduction:+.0%}) · "
                                f"ρ reached {card.keep_ratio_reached:.2f}")


def _layout(fig, title: str, x_title: str, y_title: str, height: int = 420) -> None:
    fig.update_layout(height=height, font=FONT, title=dict(text=title, font=dict(size=18)),
                      margin=dict(l=10, r=10, t=60, b=10), hovermode="closest",
                      legend=dict(font=dict(size=14), orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0))
    fig.update_xaxes(title=x_title, range=[0, 1.05], dtick=0.1)
    fig.update_yaxes(title=y_title, rangemode="tozero")


def flops_curve_chart(curves: list[dict], cards: list[compute.MethodCard], base_gmacs: float,
                      colours: dict[str, str]) -> None:
    """GMACs vs rho per method, this image's points at the chosen rho marked with stars."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for method in dict.fromkeys(p["method"] for p in curves):
        points = [p for p in curves if p["method"] == method]
        fig.add_trace(go.Scatter(x=[p["keep_ratio"] for p in points], y=[p["gmacs"] for p in points],
                                 mode="lines+markers", name=method, legendgroup=method,
                                 line=dict(color=colours.get(method, OTHER_COLOUR), width=3)))
    here = [card for card in cards if not card.error]
    at_budget = any(card.budget is not None for card in here)
    fig.add_trace(go.Scatter(
        x=[card.keep_ratio for card in here], y=[card.gmacs for card in here], mode="markers",
        name="this image, ρ needed for the budget" if at_budget else "this image, chosen ρ",
        marker=dict(symbol="star", size=18, color=[colours.get(card.method, OTHER_COLOUR) for card in here],
                    line=dict(color="black", width=1.5)),
        text=[card.method for card in here], hovertemplate="%{text}: %{y:.3g} GMACs<extra>this image</extra>",
    ))
    fig.add_hline(y=base_gmacs, line=dict(color="#555555", dash="dot"),
                  annotation_text=f"unslimmed {base_gmacs:.3g}", annotation_position="top left")
    _layout(fig, "GMACs per image vs keep ratio ρ", "keep ratio ρ (requested)", "GMACs per image", height=560)
    st.plotly_chart(fig, width="stretch", config={"displayModeBar": False})
    st.caption("Analytic GMACs (patchslim.metrics.flops) of each method with its default placement, on this "
               "image; stars mark " + ("the ρ each method needs for the budget: one height, many ρ." if at_budget
                                       else "the chosen ρ."))


def accuracy_compute_chart(table, facts: dict, budgets_table, budgets_facts: dict, model_name: str,
                           budget: float | None, colours: dict[str, str]) -> None:
    """The headline: top-1 vs the share of the unslimmed GMACs, from the committed tables. One line per method
    through its points at each rho (``accuracy.csv``), and, when ``budgets.csv`` is there, a diamond per method and
    budget (each plan searched to cost the budget); ``budget`` (same-cost mode) is marked."""
    import plotly.graph_objects as go

    source = facts.get("model")
    if table is None and budgets_table is None:
        st.info("Accuracy vs compute: `benchmarks/results/accuracy.csv` has not been written yet "
                "(`python -m patchslim benchmark --which accuracy,budgets` writes it).",
                icon=":material/hourglass_empty:")
        return
    if source is not None and source != model_name:
        st.info(f"Accuracy vs compute was measured on {source}; the app is running {model_name}, so it is not "
                "shown for it.", icon=":material/info:")
        return
    fig = go.Figure()
    base_gmacs = facts.get("baseline_gmacs") or budgets_facts.get("baseline_gmacs")
    if table is not None and base_gmacs and "gmacs" in table:
        for method in dict.fromkeys(table["method"]):
            rows = table[table["method"] == method].sort_values("gmacs")
            base = rows["base_method"].iloc[0] if "base_method" in rows else method
            fig.add_trace(go.Scatter(
                x=rows["gmacs"] / base_gmacs, y=rows["top1"], mode="lines+markers", name=method, legendgroup=base,
                line=dict(color=colours.get(base, OTHER_COLOUR), width=2, dash="solid" if method == base else "dot"),
                customdata=rows[["keep_ratio"]].to_numpy(),
                hovertemplate=f"{method}<br>ρ %{{customdata[0]:g}}: %{{x:.3f}} of the GMACs<br>top-1 %{{y:.2%}}"
                              "<extra></extra>"))
    if budgets_table is not None and "budget" in budgets_table and budgets_facts.get("model") in (None, model_name):
        for method in dict.fromkeys(budgets_table["method"]):
            rows = budgets_table[budgets_table["method"] == method].sort_values("budget")
            base = rows["base_method"].iloc[0] if "base_method" in rows else method
            fig.add_trace(go.Scatter(
                x=rows["budget_reached"], y=rows["top1"], mode="markers", name=f"{method} at a budget",
                legendgroup=base, showlegend=table is None,
                marker=dict(symbol="diamond", size=13, color=colours.get(base, OTHER_COLOUR),
                            line=dict(color="black", width=1)),
                customdata=rows[["budget", "keep_ratio"]].to_numpy(),
                hovertemplate=(f"{method} at budget %{{customdata[0]:g}} (ρ %{{customdata[1]:.3g}})<br>"
                               "top-1 %{y:.2%}<extra></extra>")))
    if budget is not None:
        fig.add_vline(x=budget, line=dict(color="black", dash="dash", width=2),
                      annotation_text=f"budget {budget:.2f}", annotation_position="top")
    baseline = facts.get("baseline_top1") or budgets_facts.get("baseline_top1")
    if baseline:
        fig.add_hline(y=baseline, line=dict(color="#555555", dash="dot"),
                      annotation_text=f"unslimmed {baseline:.1%}", annotation_position="bottom right")
    _layout(fig, "Top-1 accuracy vs compute: which method is most accurate for the compute you can pay",
            "share of the unslimmed GMACs", "top-1 accuracy", height=600)
    fig.update_xaxes(range=[0, 1.15])  # a method's own work can cost more than the tokens it saves (lowrank)
    fig.update_yaxes(tickformat=".0%")
    st.plotly_chart(fig, width="stretch", config={"displayModeBar": False})
    n = facts.get("n") or budgets_facts.get("n")
    st.caption(f"From benchmarks/results/accuracy.csv (lines: each method at ρ 1 … 0.3) and budgets.csv (diamonds: "
               f"each method's plan searched to cost 0.7 / 0.5 / 0.35 of the GMACs), {source or 'model not recorded'}"
               f"{f', {n} test images' if n else ''}. Up and to the left is better; a method missing a diamond "
               "cannot reach that budget at its default placement.")


def accuracy_curve_chart(table, source_model: str | None, model_name: str, keep_ratio: float,
                         colours: dict[str, str]) -> None:
    """Top-1 vs rho from benchmarks/results/accuracy.csv, the chosen rho marked."""
    import plotly.graph_objects as go

    if table is None:
        st.info("Accuracy across ρ: `benchmarks/results/accuracy.csv` has not been written yet "
                "(`python -m patchslim evaluate` writes it).", icon=":material/hourglass_empty:")
        return
    if source_model is not None and source_model != model_name:
        st.info(f"Accuracy across ρ was measured on {source_model}; the app is running {model_name}, "
                "so the curve is not shown for it.", icon=":material/info:")
        return
    fig = go.Figure()
    for method in dict.fromkeys(table["method"]):
        rows = table[table["method"] == method].sort_values("keep_ratio")
        base = rows["base_method"].iloc[0] if "base_method" in rows else method
        fig.add_trace(go.Scatter(x=rows["keep_ratio"], y=rows["top1"], mode="lines+markers", name=method,
                                 line=dict(color=colours.get(base, OTHER_COLOUR), width=3)))
    fig.add_vline(x=keep_ratio, line=dict(color="black", dash="dash", width=2),
                  annotation_text=f"chosen ρ = {keep_ratio:.2f}", annotation_position="top")
    _layout(fig, "Top-1 accuracy vs keep ratio ρ", "keep ratio ρ (requested)", "top-1 accuracy", height=560)
    fig.update_yaxes(tickformat=".0%")
    st.plotly_chart(fig, width="stretch", config={"displayModeBar": False})
    n = int(table["n"].iloc[0]) if "n" in table else None
    st.caption(f"From benchmarks/results/accuracy.csv ({source_model or 'model not recorded'}"
               f"{f', {n} images' if n else ''}); the dashed line marks the ρ this image is shown at.")


# --------------------------------------------------------------------------- explain

def explanation(result, pictures: tuple[Image.Image, Image.Image], share: float) -> None:
    """Kept evidence and the two attribution maps (drawn on one symmetric colour scale)."""
    evidence = result.evidence
    before, after = result.attribution_before, result.attribution_after
    cols = st.columns(4)
    cols[0].metric("Kept evidence", f"{evidence.kept_evidence:.0%}", border=True,
                   delta=f"{evidence.top_kept} of {evidence.top_count} top patches", delta_color="off",
                   delta_arrow="off",
                   help=f"Share of the unslimmed model's top {share:.0%} patches (by attribution) that the "
                        "slimmed model still sees after its last block.")
    cols[1].metric("Rank agreement", "—" if np.isnan(evidence.spearman) else f"{evidence.spearman:.2f}",
                   border=True, help="Spearman correlation of the per-patch attributions before and after.")
    cols[2].metric("Class explained", result.target_label, border=True,
                   help="The unslimmed model's prediction; both maps explain this same class.")
    seconds = sum(a.seconds for a in (before, after) if a is not None)
    cols[3].metric("Attribution time", f"{seconds:.1f} s", border=True,
                   delta=f"{sum(a.evaluations for a in (before, after) if a is not None)} forwards",
                   delta_color="off", delta_arrow="off")
    for col, image in zip(st.columns(2), pictures):
        _shown(col, image)
    st.caption("Red: patches that push the prediction towards the class; blue: away from it. Both maps share "
               "one colour scale centred on zero; hatched patches were dropped.")
    if evidence.dropped_top_patch_ids:
        st.markdown(f"Top patches the slimmed model dropped (raster ids): "
                    f"`{', '.join(map(str, evidence.dropped_top_patch_ids))}`")


def grad_rollout(pictures: tuple[Image.Image, Image.Image] | None, refused: str) -> None:
    """The gradient-weighted rollout before and after slimming, or why the model cannot give it."""
    if pictures is None:
        st.info(f"No gradient-weighted rollout: {refused}.", icon=":material/info:")
        return
    for col, image in zip(st.columns(2), pictures):
        _shown(col, image)
    st.caption("Gradient-weighted rollout (Chefer et al., ICCV 2021): attention weighted by its gradient for the "
               "explained class, keeping only what pushes the class up, accumulated block by block and followed "
               "through pruning and merging. Both maps share one colour scale; hatched patches never entered the "
               "model.")


def faithfulness(rows: list[dict], figure, refused: dict[str, str]) -> None:
    """Deletion and insertion scores of every map before and after slimming, and the slimmed model's curves."""
    columns = {
        "map": st.column_config.TextColumn("Map"),
        "deletion_before": st.column_config.NumberColumn("Deletion, unslimmed ↓", format="%.3f"),
        "deletion_after": st.column_config.NumberColumn("Deletion, slimmed ↓", format="%.3f"),
        "insertion_before": st.column_config.NumberColumn("Insertion, unslimmed ↑", format="%.3f"),
        "insertion_after": st.column_config.NumberColumn("Insertion, slimmed ↑", format="%.3f"),
    }
    st.dataframe([{k: r[k] for k in columns} for r in rows], hide_index=True, width="stretch",
                 column_config=columns, key="faithfulness_table")
    st.caption("Deletion: the area under the class's probability as the map's top patches are removed (lower: "
               "the map found what the answer rests on); insertion: as they are added to an empty image (higher "
               "is better). 'random' is the mean of 5 random orders: a map is worth its name where it beats it.")
    st.plotly_chart(figure, width="stretch", config={"displayModeBar": False}, key="faithfulness_curves")
    for mode, reason in refused.items():
        st.caption(f"{mode.capitalize()} mode is not offered: {reason}.")


# --------------------------------------------------------------------------- benchmark

def benchmark_results(rows: list[dict], model_name: str, colours: dict[str, str]) -> None:
    """The table (with a CSV download) and measured vs ideal speed-up per plan."""
    import pandas as pd
    import plotly.graph_objects as go

    frame = pd.DataFrame(rows)
    failed = frame[frame["error"].notna()] if "error" in frame else frame.iloc[0:0]
    ok = frame[frame["error"].isna()] if "error" in frame else frame
    for method, group in failed.groupby("method", sort=False):
        ratios = ", ".join(f"{r:g}" for r in group["keep_ratio"])
        st.warning(f"**{method}** (ρ = {ratios}) could not run: {group['error'].iloc[0]}")
    if ok.empty:
        return
    columns = {
        "method": st.column_config.TextColumn("Method"),
        "keep_ratio": st.column_config.NumberColumn("ρ", format="%.2f"),
        "keep_ratio_reached": st.column_config.NumberColumn("ρ reached", format="%.2f"),
        "gmacs": st.column_config.NumberColumn("GMACs", format="%.3g"),
        "gmacs_reduction": st.column_config.NumberColumn("GMACs saved", format="percent"),
        "latency_ms": st.column_config.NumberColumn("Latency (ms)", format="%.1f"),
        "latency_iqr_ms": st.column_config.NumberColumn("IQR (ms)", format="%.1f"),
        "baseline_ms": st.column_config.NumberColumn("Unslimmed (ms)", format="%.1f"),
        "speedup": st.column_config.NumberColumn("Speed-up", format="%.2f×"),
        "ideal_speedup": st.column_config.NumberColumn("Ideal (GMACs)", format="%.2f×"),
        "efficiency": st.column_config.NumberColumn("Share of ideal", format="percent"),
    }
    shown = [c for c in columns if c in ok]
    st.dataframe(ok[shown], hide_index=True, width="stretch", column_config=columns)
    fig = go.Figure()
    labels = [f"{m} ρ={r:g}" for m, r in zip(ok["method"], ok["keep_ratio"])]
    fig.add_trace(go.Bar(x=labels, y=ok["speedup"], name="measured speed-up",
                         marker_color=[colours.get(m, OTHER_COLOUR) for m in ok["method"]]))
    if "ideal_speedup" in ok:
        fig.add_trace(go.Scatter(x=labels, y=ok["ideal_speedup"], name="ideal (GMAC ratio)", mode="markers",
                                 marker=dict(symbol="line-ew-open", size=26, line=dict(width=3, color="black"))))
    fig.add_hline(y=1.0, line=dict(color="#555555", dash="dot"))
    fig.update_layout(height=440, font=FONT, title=dict(text=f"Speed-up over the unslimmed {model_name}",
                                                        font=dict(size=18)),
                      yaxis_title="× faster", margin=dict(l=10, r=10, t=60, b=10),
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1))
    st.plotly_chart(fig, width="stretch", config={"displayModeBar": False})
    st.download_button("Table (CSV)", frame.to_csv(index=False), f"patchslim_benchmark_{model_name}.csv",
                       "text/csv")


# --------------------------------------------------------------------------- latency

def latency_comparison(timing, r: compute.Costs) -> None:
    """Medians of the interleaved measurement, and the measured vs the ideal speed-up."""
    cols = st.columns(4)
    cols[0].metric("Unslimmed (median)", f"{timing.baseline.median_ms:.1f} ms",
                   delta=f"IQR {timing.baseline.iqr_ms:.1f} ms", delta_color="off", delta_arrow="off")
    cols[1].metric("Slimmed (median)", f"{timing.slimmed.median_ms:.1f} ms",
                   delta=f"IQR {timing.slimmed.iqr_ms:.1f} ms", delta_color="off", delta_arrow="off")
    cols[2].metric("Measured speed-up", f"{timing.speedup:.2f}×")
    if r.gmacs_after:
        ideal = r.gmacs_before / r.gmacs_after
        cols[3].metric("Ideal speed-up (GMACs)", f"{ideal:.2f}×", delta=f"{timing.efficiency(ideal):.0%} reached",
                       delta_color="off", delta_arrow="off")


# --------------------------------------------------------------------------- audit (patchslim.audit)

def audit_summary(outcome: compute.AuditOutcome, matrices: dict, findings: list) -> None:
    """An audit's headline numbers, its accuracy-drop matrices (plotly figures) and its findings by method
    (:class:`patchslim.audit.report.MethodFindings`), each method collapsed."""
    report = outcome.report
    cols = st.columns(4)
    cols[0].metric("Images audited", f"{report.audited}", border=True,
                   help=f"{report.data}; {report.images} images found")
    cols[1].metric("Unslimmed top-1", f"{report.baseline_top1.value:.1%}", border=True,
                   help=f"95 % interval {report.baseline_top1.low:.1%} – {report.baseline_top1.high:.1%}")
    cols[2].metric("Flagged", f"{len(report.flagged())} of {len(report.disparities)}", border=True,
                   help="method × ρ × grouping combinations where one group is hurt more than the others "
                        "beyond the noise")
    cols[3].metric("Time", f"{outcome.seconds:.1f} s", border=True,
                   help=f"{report.throughput.get('baseline_images_per_second', float('nan')):.0f} images/s in "
                        "the unslimmed forward")
    st.subheader("Which group pays?")
    if not report.disparities:
        st.info("Only one group and one class: there is nothing to compare. Add groups (folders "
                "ROOT/<group>/<class>/<image>, a group column in a CSV) or choose a built-in grouping.")
    for key, fig in matrices.items():
        st.plotly_chart(fig, width="stretch", config={"displayModeBar": False}, key=f"audit_matrix_{key}")
    st.caption("Each cell: the accuracy drop in points (top-1 before minus after slimming, on the same images) of "
               "one group, for one method at one ρ; red is a loss, blue a gain. ▲ and a box mark the most hurt "
               "group where its gap to the least hurt one is beyond the noise.")
    for finding in findings:
        icon = ":material/warning:" if finding.flagged else ":material/check_circle:"
        with st.expander(f"**{finding.method}**: {finding.flagged} of {finding.total} flagged; {finding.headline}",
                         icon=icon):
            st.markdown("\n".join(f"- {d.message}" for d in finding.disparities))
    st.caption(" ".join(report.notes))


def audit_charts(figures: dict) -> None:
    """The accuracy drop by group vs rho, one plotly figure per grouping."""
    st.subheader("Accuracy drop by group vs ρ")
    for by, fig in figures.items():
        fig.update_layout(font=FONT, title=dict(font=dict(size=18)))
        st.plotly_chart(fig, width="stretch", config={"displayModeBar": False}, key=f"audit_chart_{by}")


def audit_details(outcome: compute.AuditOutcome) -> None:
    """An audit's tables, skipped items and downloads (CSV, JSON, the self-contained HTML report)."""
    import pandas as pd

    report = outcome.report
    st.subheader("Tables")
    rows = pd.DataFrame([r.__dict__ for r in report.rows])
    for by in report.groupings:
        part = rows[rows["by"] == by].drop(columns=["by"])
        title = {"all": "All images", "class": "Per class"}.get(by, f"Per group ({by})")
        st.markdown(f"**{title}**")
        st.dataframe(part, hide_index=True, width="stretch")
    if report.disparities:
        st.markdown("**Disparity** (gaps as shares; flagged when the corrected interval excludes zero)")
        st.dataframe(pd.DataFrame([d.__dict__ for d in report.disparities]).drop(columns=["message"]),
                     hide_index=True, width="stretch")
    st.subheader("Skipped")
    if report.skipped:
        st.dataframe(pd.DataFrame([s.__dict__ for s in report.skipped]), hide_index=True, width="stretch")
    else:
        st.caption("Nothing was skipped.")
    stem = f"patchslim_audit_{report.model}"
    c1, c2, c3 = st.columns(3)
    c1.download_button("Per group (CSV)", outcome.files["audit_groups.csv"], f"{stem}_groups.csv", "text/csv",
                       width="stretch")
    c2.download_button("Everything (JSON)", outcome.files["audit.json"], f"{stem}.json", "application/json",
                       width="stretch")
    c3.download_button("Report (HTML, works offline)", outcome.files["audit.html"], f"{stem}.html", "text/html",
                       width="stretch")
