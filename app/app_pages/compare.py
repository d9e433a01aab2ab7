"""Compare methods: every method on the same image at the same rho, then cost and accuracy across rho."""

from __future__ import annotations

import streamlit as st

import patchslim

from app import compute, sidebar, state, views, widgets
from app.panels import panel

settings = sidebar.current()
model = settings.choice.model
names, refused = compute.applicable_methods(model)  # a Swin takes the methods that act window by window
colours = views.method_colours(patchslim.method_names())  # the same colour per method whatever the model

st.title("Compare methods")
st.caption(f"Every method at ρ = {settings.keep_ratio:.2f} with its default options and placement "
           f"(the sidebar's options apply to the Explore page).")
if refused:
    st.caption(compute.refused_sentence(model, refused))
picked = widgets.image_picker(model)
if picked is None:
    st.stop()

st.subheader(f"What each method keeps at ρ = {settings.keep_ratio:.2f}")
cards = []
with panel("Every method at this ρ") as methods_panel:
    base = state.baseline(settings.choice.key, picked.key, model, picked.image)
    results = []
    for method in names:
        try:
            timed = state.slimmed(settings.choice.key, picked.key, method, settings.keep_ratio, (), model,
                                  picked.image)
            results.append(compute.MethodResult(method, timed))
        except patchslim.PatchslimError as exc:
            results.append(compute.MethodResult(method, None, str(exc)))
    pixels = state.model_input(settings.choice.key, picked.key, model, picked.image)
    cards = compute.method_cards(results, base, pixels, model)
    views.method_grid(cards, columns=3)

st.subheader("Cost and accuracy across ρ")
left, right = st.columns(2, gap="large")
with left:
    if methods_panel.failed:
        st.caption("GMACs across ρ are drawn with the forwards above, which could not run.")
    else:
        with panel("GMACs across ρ"):
            curves = []
            progress = st.progress(0.0, text="Computing GMACs across ρ for every method…")
            for i, method in enumerate(names):
                curves.extend(state.flops_curve(settings.choice.key, picked.key, method, model, picked.image))
                progress.progress((i + 1) / len(names), text=f"GMACs across ρ: {method}")
            progress.empty()
            views.flops_curve_chart(curves, cards, compute.unslimmed_gmacs(base), colours)
with right, panel("Accuracy across ρ"):
    views.accuracy_curve_chart(state.load_accuracy_table(), state.accuracy_source(), model.name,
                               settings.keep_ratio, colours)
