"""Compare methods: every method on the same image at the same rho, then cost and accuracy across rho."""

from __future__ import annotations

import streamlit as st

import patchslim

from app import compute, sidebar, state, views, widgets

settings = sidebar.current()
model = settings.choice.model

st.title("Compare methods")
st.caption(f"Every method at ρ = {settings.keep_ratio:.2f} with its default options and placement "
           f"(the sidebar's options apply to the Explore page).")
picked = widgets.image_picker(model)
if picked is None:
    st.stop()

base = state.baseline(settings.choice.key, picked.key, model, picked.image)
results = []
for method in patchslim.method_names():
    try:
        timed = state.slimmed(settings.choice.key, picked.key, method, settings.keep_ratio, (), model, picked.image)
        results.append(compute.MethodResult(method, timed))
    except patchslim.PatchslimError as exc:
        results.append(compute.MethodResult(method, None, str(exc)))

st.subheader(f"What each method keeps at ρ = {settings.keep_ratio:.2f}")
pixels = state.model_input(settings.choice.key, picked.key, model, picked.image)
views.method_grid(results, base, pixels, model, columns=3)

st.subheader("Cost and accuracy across ρ")
left, right = st.columns(2, gap="large")
with left:
    curves = []
    missing = [m for m in patchslim.method_names()]
    progress = st.progress(0.0, text="Computing GMACs across ρ for every method…")
    for i, method in enumerate(missing):
        curves.extend(state.flops_curve(settings.choice.key, picked.key, method, model, picked.image))
        progress.progress((i + 1) / len(missing), text=f"GMACs across ρ: {method}")
    progress.empty()
    views.flops_curve_chart(curves, results, base)
with right:
    views.accuracy_curve_chart(state.load_accuracy_table(), state.accuracy_source(), model.name,
                               settings.keep_ratio, results)
