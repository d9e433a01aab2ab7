"""Audit: what the audit will do, and the part that exists now (accuracy of every method on your data)."""

from __future__ import annotations

import tempfile

import streamlit as st

import patchslim
from patchslim import bundled

from app import compute, sidebar, state, views, widgets

settings = sidebar.current()
model = settings.choice.model

st.title("Audit")
st.markdown(
    "**What the audit will do** (its engine is a separate, upcoming issue): run a slimmed model over a labelled "
    "image folder split into subgroups, and report per subgroup how accuracy, agreement with the unslimmed "
    "model and the kept evidence change, so you can see whether slimming hurts some groups more than others. "
    "No subgroup report is shown here until that engine exists."
)
st.markdown("**What exists now:** accuracy and agreement of every method across ρ on labelled images "
            "(`patchslim.evaluate`).")
evaluate = compute.optional("patchslim.evaluate")
if evaluate is None:
    widgets.not_available("Accuracy evaluation", "patchslim.evaluate")
    st.stop()

sources = (["Bundled canvas test sample"] if model.name == bundled.BUNDLED_NAME else []) + \
    ["Upload a zip of <class>/<image> folders", "A folder on this server"]
source = st.radio("Labelled images", sources, key="audit_source", horizontal=True)
upload = folder = None
if source.startswith("Upload"):
    upload = st.file_uploader("Zip with one folder per class, named like the model's classes", type=["zip"],
                              key="audit_zip")
    st.caption(f"Class folder names must match {model.name}'s classes, e.g. "
               f"{', '.join(list(model.class_names)[:4])}… (or the class index).")
elif source.startswith("A folder"):
    folder = st.text_input("Folder path (ROOT/<class>/<image>)", key="audit_folder")

methods_col, ratios_col, limit_col = st.columns([3, 2, 1])
methods = methods_col.multiselect("Methods", patchslim.method_names(), default=patchslim.method_names(),
                                  key="audit_methods")
ratios = ratios_col.multiselect("Keep ratios ρ", [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
                                default=[0.9, 0.7, 0.5, 0.3], key="audit_ratios")
limit = limit_col.number_input("At most N images", 1, 100_000, 500, key="audit_limit")
ready = bool(methods and ratios) and (source.startswith("Bundled") or upload is not None or bool(folder))
key = ("audit", settings.choice.key, source, upload.file_id if upload is not None else folder, tuple(methods),
       tuple(sorted(ratios)), int(limit))
result = state.remembered(key)
if st.button("Evaluate", type="primary", disabled=not ready):
    bar = st.progress(0.0, text="Reading the images…")

    def progress(done: int, total: int, what: str) -> None:
        bar.progress(done / total, text=f"{done}/{total} methods · evaluating {what}")

    try:
        with tempfile.TemporaryDirectory(prefix="patchslim_audit_") as tmp:
            if source.startswith("Bundled"):
                data = evaluate.load_data("bundled", model)
            elif upload is not None:
                compute.extract_zip(upload.getvalue(), tmp)
                data = evaluate.folder_images(compute.data_root(tmp), model)
            else:
                data = evaluate.folder_images(folder, model)
            result = compute.accuracy_evaluation(model, data.subset(int(limit)), methods,
                                                 sorted(ratios, reverse=True), progress)
        state.remember(key, result)
    except (patchslim.PatchslimError, FileNotFoundError, NotADirectoryError) as exc:
        st.error(f"The evaluation could not run: {exc}")
    bar.empty()
if result is not None:
    views.evaluation_results(result)
