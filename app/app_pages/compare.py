"""Compare methods: at the same rho or at the same cost; accuracy against compute first, then every method on one
image, then cost and accuracy across rho."""

from __future__ import annotations

import streamlit as st

import patchslim

from app import compute, sidebar, state, views, widgets
from app.panels import panel

SAME_RHO, SAME_COST = "same ρ", "same cost"

settings = sidebar.current()
model = settings.choice.model
names, refused = compute.applicable_methods(model)  # a Swin takes the methods that act window by window
colours = views.method_colours(patchslim.method_names())  # the same colour per method whatever the model

st.title("Compare methods")
mode = st.radio("Compare at", (SAME_RHO, SAME_COST), horizontal=True, key="compare_mode",
                help="Same ρ keeps the same share of tokens, which costs different methods different compute; same "
                     "cost gives every method the same share of the unslimmed GMACs and searches the ρ it needs.")
budget = None
if mode == SAME_COST:
    budget = st.slider("Budget: share of the unslimmed GMACs", 0.2, 1.0, 0.5, 0.05, key="compare_budget",
                       help="Each method's ρ is searched on the analytic cost model (patchslim.budget) so that its "
                            "plan costs this share of the unslimmed multiply-adds, within 2 %.")
    st.caption(f"Every method at {budget:.2f} of the unslimmed GMACs, with its default options and placement: the ρ "
               "each one needs is on its card. A method that cannot cost that much at its placement says what it can.")
else:
    st.caption(f"Every method at ρ = {settings.keep_ratio:.2f} with its default options and placement "
               f"(the sidebar's options apply to the Explore page). The same ρ does not cost the same: switch to "
               f"*{SAME_COST}* to compare at equal compute.")
if refused:
    st.caption(compute.refused_sentence(model, refused))

with panel("Accuracy vs compute"):
    views.accuracy_compute_chart(state.load_accuracy_table(), state.results_facts(state.ACCURACY_CSV),
                                 state.load_budgets_table(), state.results_facts(state.BUDGETS_CSV), model.name,
                                 budget, colours)

picked = widgets.image_picker(model)
if picked is None:
    st.stop()

amount = f"{budget:.2f} of the unslimmed GMACs" if budget is not None else f"ρ = {settings.keep_ratio:.2f}"
st.subheader(f"What each method keeps at {amount}")
cards = []
with panel(f"Every method at {amount}") as methods_panel:
    base = state.baseline(settings.choice.key, picked.key, model, picked.image)
    results = []
    progress = st.progress(0.0, text="Searching each method's ρ for the budget…") if budget is not None else None
    for i, method in enumerate(names):
        try:
            if budget is None:
                timed = state.slimmed(settings.choice.key, picked.key, method, settings.keep_ratio, (), model,
                                      picked.image)
            else:
                timed = state.slimmed_at_budget(settings.choice.key, picked.key, method, budget, model, picked.image)
            results.append(compute.MethodResult(method, timed))
        except patchslim.PatchslimError as exc:
            results.append(compute.MethodResult(method, None, str(exc)))
        if progress is not None:
            progress.progress((i + 1) / len(names), text=f"Budget {budget:.2f}: {method}")
    if progress is not None:
        progress.empty()
    pixels = state.model_input(settings.choice.key, picked.key, model, picked.image)
    cards = compute.method_cards(results, base, pixels, model, budget,
                                 state.display_view(settings.choice.key, picked.key, model, picked.image))
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
