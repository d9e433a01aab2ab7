"""Benchmark: latency and GMACs of every method on this machine, for the chosen model, on demand."""

from __future__ import annotations

import streamlit as st

import patchslim
from patchslim import bundled

from app import compute, sidebar, state, views
from app.panels import panel

settings = sidebar.current()
model = settings.choice.model

st.title("Benchmark")
st.caption(f"{model.name} on {model.device.type.upper()} ({model.precision}). Each plan is timed against the "
           "unslimmed forward in one interleaved run (median of the repeats); the ideal speed-up is the GMAC ratio.")

methods_col, ratios_col, repeats_col = st.columns([3, 2, 1])
names, refused = compute.applicable_methods(model)  # a Swin takes the methods that act window by window
if any(m not in names for m in st.session_state.get("bench_methods", ())):  # chosen for another model: start over
    del st.session_state["bench_methods"]
methods = methods_col.multiselect("Methods", names, default=names, key="bench_methods")
ratios = ratios_col.multiselect("Keep ratios ρ", [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
                                default=list(compute.BENCHMARK_KEEP_RATIOS), key="bench_ratios")
repeats = repeats_col.number_input("Repeats", 3, 100, 10, key="bench_repeats")
if refused:
    st.caption(compute.refused_sentence(model, refused))
image = state.gallery(bundled.is_bundled(model.name))[0]
st.caption(f"Input: the gallery image “{image.name}”, batch of 1.")

key = ("benchmark", settings.choice.key, tuple(methods), tuple(sorted(ratios)), int(repeats))
rows = state.remembered(key)
with panel("Benchmark"):
    if st.button("Run benchmark", type="primary", disabled=not (methods and ratios)):
        bar = st.progress(0.0, text="Starting…")

        def progress(done: int, total: int, what: str) -> None:
            bar.progress(done / total, text=f"{done}/{total} plans · timing {what}")

        rows = compute.benchmark(model, image.image, methods, sorted(ratios, reverse=True), int(repeats), progress)
        bar.empty()
        state.remember(key, rows)
    if rows is None:
        st.info("Press **Run benchmark**: each plan takes a few seconds on a CPU.")
    else:
        views.benchmark_results(rows, model.name, views.method_colours(patchslim.method_names()))
