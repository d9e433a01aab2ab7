"""Explore one image: pick an image, slim it, and see what was kept, what it cost and what changed.

Everything that depends on rho is one fragment, and the rho slider is drawn by it (into its place in the
sidebar): moving the slider reruns that fragment only, not the sidebar, the image picker or the unslimmed
forward. What a rho change does not change comes from the caches (the model's input, its picture, the unslimmed
forward with its attention). Inside it, the overlay's block slider and the attention map's controls each redraw
their own part only (fragments too).
"""

from __future__ import annotations

import dataclasses

import streamlit as st

import patchslim
from patchslim.errors import PatchslimError

from app import compute, sidebar, state, views, widgets
from app.panels import panel

settings = sidebar.current()
model = settings.choice.model

st.title("Explore one image")
picked = widgets.image_picker(model)
if picked is None:
    sidebar.keep_ratio_slider(settings.keep_ratio_slot)
    st.stop()

with panel("The forwards") as forwards:
    base = state.baseline(settings.choice.key, picked.key, model, picked.image)
    pixels = state.model_input(settings.choice.key, picked.key, model, picked.image)  # what the model saw
    view = state.display_view(settings.choice.key, picked.key, model, picked.image)  # what the pictures start from
if forwards.failed:  # the panel says why; nothing below can be drawn without the unslimmed forward
    sidebar.keep_ratio_slider(settings.keep_ratio_slot)
    st.stop()

# --- what was kept, and what the model now says
windowed = model.spec.hierarchical
drawn = {}  # the overlay on screen, for the download (its fragment may redraw it without a full rerun)


@st.fragment
def kept_patches(trace: patchslim.Trace) -> None:
    """The overlay and its block slider: moving the slider redraws this part only."""
    depth = model.spec.depth
    block_key = f"explore_block::{model.spec.kind}::{depth}"
    st.session_state.setdefault(block_key, compute.default_overlay_block(model.spec))  # kept across pages (state.py)
    block = st.select_slider(
        "Watch the tokens layer by layer", list(range(depth + 1)), key=block_key,
        format_func=lambda b: compute.block_label(model.spec, b),
        help=("Each block on its own token grid (it shrinks at every patch merging) and its windows (shifted in "
              "every second block): the tokens a method kept in every window ran the block, the others sat it out "
              "and came back for the next." if windowed else
              "Block 0 is the input: what the model sees after input pruning."))
    with panel("Kept / dropped / merged overlay"):
        drawn["overlay"] = compute.overlay(model, pixels, trace, None if block == depth else block, view)
        caption = f"{picked.name}" + (f" · true label: **{picked.label}**" if picked.label else "")
        views.picture(drawn["overlay"], caption + f" · {picked.credit}")


@st.fragment
def attention_maps(before: patchslim.Trace, after: patchslim.Trace) -> None:
    """The unslimmed and the slimmed attention pictures and their controls: a control redraws this part only."""
    with panel("Attention maps"):
        attention_views, not_offered = compute.attention_views(model)
        if not_offered:
            st.caption(f"CLS attention and rollout are not offered: {not_offered}.")
        kind, attention_block = views.attention_controls(
            {name: v.per_block for name, v in attention_views.items()}, model.spec.depth, key="explore",
            default_block=min(compute.default_overlay_block(model.spec), model.spec.depth - 1) if windowed else None,
            scope=f"{model.spec.kind}::" if windowed else "")
        views.attention_pair(compute.attention_pair(model, pixels, before, after, kind, attention_block, view))


@st.fragment(key="explore_results")
def results() -> None:
    """The slimmed forward and all it shows; draws the rho slider, so a rho change reruns this part only."""
    here = dataclasses.replace(settings, keep_ratio=sidebar.keep_ratio_slider(settings.keep_ratio_slot))
    with panel("The forwards") as forward:
        try:
            slim = state.slimmed(here.choice.key, picked.key, here.method, here.keep_ratio, here.options_key, model,
                                 picked.image)
        except PatchslimError as exc:
            st.error(f"{compute.PLAN_REFUSAL}: {exc}")
            return
    if forward.failed:  # the panel says why
        return

    # --- the numbers, in one row a projector can show
    costs = prediction = None  # each set by its panel, unless that panel fails
    with panel("Numbers"):
        costs = compute.costs(base, slim)
        views.readout_row(costs, model.device.type, windowed=windowed, model=model)
    with st.expander("Measure the speed-up properly (interleaved runs, median)"), panel("Speed-up measurement"):
        key = ("latency", here.choice.key, picked.key, here.method, here.keep_ratio, here.options_key)
        timing = state.remembered(key)
        if st.button("Measure", key="explore_measure"):
            with st.spinner("Timing the unslimmed and the slimmed forward, 10 runs each…"):
                timing = compute.latency_comparison(model, picked.image, here.method, here.keep_ratio, here.options)
            state.remember(key, timing)
        if timing is not None:
            views.latency_comparison(timing, costs or compute.costs(base, slim))
        else:
            st.caption("The live latency above is one forward each. This runs both forwards ten times, alternating, "
                       "and compares the measured speed-up with the ideal one (the GMAC ratio).")

    left, right = st.columns([1, 1], gap="large")
    with left:
        st.subheader("Tokens that ran each block, window by window" if windowed else "Patches kept, dropped, merged")
        kept_patches(slim.trace)
    with right:
        st.subheader("Top-5 before and after")
        with panel("Top-5 before and after"):
            prediction = compute.prediction(base, slim)
            views.prediction_change(prediction, picked.label)

    with panel("Tokens per block"):
        views.tokens_chart(base.trace.tokens_per_block, slim.trace.tokens_per_block,
                           "Tokens per block (each on its own grid)" if windowed else "Tokens per block (CLS included)")

    st.subheader("Attention: unslimmed vs slimmed")
    attention_maps(base.trace, slim.trace)

    with panel(f"How {here.method} works"):
        widgets.method_card(patchslim.get_method(here.method))

    st.subheader("Downloads")
    with panel("Downloads"):
        readouts = compute.Readouts(costs, prediction) if costs and prediction else compute.readouts(base, slim)
        views.downloads(lambda: drawn.get("overlay"), readouts, here, picked)


results()
