"""Audit: does slimming hurt some groups or classes more than others? (patchslim.audit)"""

from __future__ import annotations

import streamlit as st

import patchslim
from patchslim import bundled

from app import compute, data_sources, sidebar, state, views
from app.panels import panel

settings = sidebar.current()
model = settings.choice.model

st.title("Audit")
st.markdown(
    "Run slimming methods at several keep ratios ρ over labelled images split into groups, and see, per group "
    "and per class, how top-1 accuracy changes (with bootstrap 95 % intervals), how many predictions flip, and "
    "whether one group is **hurt more than the others beyond the noise** (the survey's §5.5 concern about "
    "underrepresented classes and subgroups)."
)
BUNDLED = "Bundled canvas sample (built-in groups)"
UPLOAD = "Upload a zip"
FOLDER = "A folder, CSV or zip on this server"
TYPED = "Type a path inside it…"
data_policy = data_sources.DataPolicy.from_environment()  # the operator's data folder, or None: no server data
sources = [BUNDLED] if bundled.is_bundled(model.name) else []
sources += [UPLOAD, FOLDER] if data_policy.enabled else [UPLOAD]
source = st.radio("Labelled images", sources, key="audit_source", horizontal=True)
if not data_policy.enabled:
    st.caption(f"Audits of data already on this server are off: its operator turns them on by naming a data "
               f"folder in {data_sources.DATA_DIR_ENV}.")
upload = folder = None
if source == BUNDLED:
    st.caption("The 500 canvas Fashion-MNIST test images shipped with the app, grouped by **brightness** (dark vs "
               "bright garments: mean intensity of the garment's pixels, split at the median) and by class "
               "**family** (tops, footwear, others).")
elif source == UPLOAD:
    upload = st.file_uploader("Zip of ROOT/<class>/<image> or ROOT/<group>/<class>/<image> folders, or with a "
                              "CSV manifest path,label[,group] at its top", type=["zip"], key="audit_zip")
    st.caption(f"Class folders (or CSV labels) must be named like {model.name}'s classes, e.g. "
               f"{', '.join(list(model.class_names)[:4])}… or the class index. The zip is read in memory and never "
               "extracted; paths with '..' or absolute paths, zip bombs, duplicates and unreadable files are "
               "skipped and listed in the report.")
else:
    folder = st.selectbox("In the server's data folder", data_sources.choices(data_policy) + [TYPED],
                          key="audit_server_pick", help="Its folders (ROOT/<class>/<image> or "
                          "ROOT/<group>/<class>/<image>), CSV manifests path,label[,group] and zips.")
    if folder == TYPED:
        folder = st.text_input("Path of a folder, a CSV manifest or a zip, inside the server's data folder",
                               key="audit_folder", placeholder="photos/test  (ROOT/<group>/<class>/<image>)")

methods_col, ratios_col, limit_col = st.columns([3, 2, 1])
names, refused = compute.applicable_methods(model)  # a Swin takes the methods that act window by window
if any(m not in names for m in st.session_state.get("audit_methods", ())):  # chosen for another model: start over
    del st.session_state["audit_methods"]
methods = methods_col.multiselect("Methods", names, key="audit_methods",
                                  default=[m for m in ("random", "evit", "tome") if m in names] or names[:2])
ratios = ratios_col.multiselect("Keep ratios ρ", [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
                                default=[0.7, 0.5], key="audit_ratios")
limit = limit_col.number_input("At most N images", 1, 100_000, 500, key="audit_limit",
                               help="Evenly spaced over the data, so every group and class stays in.")
if refused:
    st.caption(compute.refused_sentence(model, refused))
_, no_rollout = compute.attention_views(model)  # kept evidence ranks patches by rollout from the class token
if no_rollout and st.session_state.get("audit_evidence"):  # ticked for another model
    del st.session_state["audit_evidence"]
evidence = st.checkbox("Also measure the kept evidence (slower)", key="audit_evidence", disabled=bool(no_rollout),
                       help=f"Not offered: {no_rollout}." if no_rollout else
                            "Share of the unslimmed model's top 10 % patches (by attention rollout) that each "
                            "slimmed forward still has.")
ready = bool(methods and ratios) and (source == BUNDLED or upload is not None or bool(folder))
key = ("audit", settings.choice.key, source, upload.file_id if upload is not None else folder, tuple(methods),
       tuple(sorted(ratios)), int(limit), evidence)
outcome = state.remembered(key)
if st.button("Run the audit", type="primary", disabled=not ready):
    bar = st.progress(0.0, text="Reading the images…")

    def progress(done: int, total: int) -> None:
        bar.progress(done / max(total, 1), text=f"{done:,} of {total:,} image forwards")

    with panel("The audit run"):
        try:
            if source == FOLDER:  # only inside the operator's data folder
                data = data_sources.load(folder or "", model, data_policy, int(limit))
            else:
                data = compute.audit_data(model, {BUNDLED: "bundled", UPLOAD: "zip"}[source],
                                          upload.getvalue() if upload is not None else None, None, int(limit))
            outcome = compute.run_audit(model, data, methods, sorted(ratios, reverse=True),
                                        compute.audit_groupings(data), evidence, progress)
            state.remember(key, outcome)
        except (patchslim.PatchslimError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
            st.error(f"The audit could not run: {exc}")
        finally:
            bar.empty()
if settings.choice.random_weights:
    st.warning("The model runs with random weights, so accuracies mean nothing here.")
if outcome is not None:
    with panel("Audit summary"):
        views.audit_summary(outcome, compute.audit_matrices(outcome.report), compute.audit_findings(outcome.report))
    with panel("Audit charts"):
        views.audit_charts(compute.audit_figures(outcome.report))
    with panel("Audit tables and downloads"):
        views.audit_details(outcome)
