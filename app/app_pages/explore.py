"""Explore one image: pick an image, slim it, and see what was kept, what it cost and what changed."""

from __future__ import annotations

import streamlit as st

from patchslim.errors import PatchslimError

from app import compute, sidebar, state, views, widgets

settings = sidebar.current()
model = settings.choice.model

st.title("Explore one image")
picked = widgets.image_picker(model)
if picked is None:
    st.stop()

base = state.baseline(settings.choice.key, picked.key, model, picked.image)
try:
    slim = state.slimmed(settings.choice.key, picked.key, settings.method, settings.keep_ratio,
                         settings.options_key, model, picked.image)
except PatchslimError as exc:
    st.error(f"This plan cannot run: {exc}")
    st.stop()
readouts = compute.readouts(base, slim)
pixels = state.model_input(settings.choice.key, picked.key, model, picked.image)  # what the model saw, for drawing

# --- the numbers, in one row a projector can show
views.readout_row(readouts, model)
with st.expander("Measure the speed-up properly (interleaved runs, median)"):
    key = ("latency", settings.choice.key, picked.key, settings.method, settings.keep_ratio, settings.options_key)
    timing = state.remembered(key)
    if st.button("Measure", key="explore_measure"):
        with st.spinner("Timing the unslimmed and the slimmed forward, 10 runs each…"):
            timing = compute.latency_comparison(model, picked.image, settings.method, settings.keep_ratio,
                                                settings.options)
        state.remember(key, timing)
    if timing is not None:
        views.latency_comparison(timing, readouts)
    else:
        st.caption("The live latency above is one forward each. This runs both forwards ten times, alternating, "
                   "and compares the measured speed-up with the ideal one (the GMAC ratio).")

# --- what was kept, and what the model now says
left, right = st.columns([1, 1], gap="large")
with left:
    st.subheader("Patches kept, dropped, merged")
    depth = model.spec.depth
    st.session_state.setdefault(f"explore_block::{depth}", depth)  # the default, kept across pages (state.py)
    block = st.select_slider(
        "Watch the tokens layer by layer", list(range(depth + 1)), key=f"explore_block::{depth}",
        format_func=lambda b: "after the last block" if b == depth else f"entering block {b}",
        help="Block 0 is the input: what the model sees after input pruning.")
    overlay = views.overlay(pixels, model, slim.trace, None if block == depth else block)
    caption = f"{picked.name}" + (f" · true label: **{picked.label}**" if picked.label else "")
    st.caption(caption + f" · {picked.credit}")
with right:
    st.subheader("Top-5 before and after")
    views.prediction_change(readouts, picked.label)

views.tokens_chart(readouts)

st.subheader("Attention: unslimmed vs slimmed")
views.attention_side_by_side(pixels, model, base.trace, slim.trace, key="explore")

widgets.method_card(settings.method)

st.subheader("Downloads")
views.downloads(overlay, readouts, settings, picked)
