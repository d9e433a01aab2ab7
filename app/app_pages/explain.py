"""Explain: which patches the prediction rests on, before and after slimming, and how much of it was kept."""

from __future__ import annotations

import streamlit as st

from patchslim.errors import PatchslimError

from app import compute, features, sidebar, state, views, widgets
from app.panels import panel

settings = sidebar.current()
model = settings.choice.model

st.title("Explain")
st.caption("Captum attributions and gradient-weighted rollout of the unslimmed and the slimmed model for the same "
           "class, the share of the unslimmed model's evidence that slimming kept, and how faithful each map is.")
_, no_class_token = compute.attention_views(model)
if no_class_token:  # Swin: maps of the attention received in windows instead
    st.caption(f"Rollout and CLS attention are not offered: {no_class_token}.")
if not features.INSTALLED.attributions:
    st.info(features.MISSING_HELP["attributions"], icon=":material/extension_off:")
    st.stop()

picked = widgets.image_picker(model)
if picked is None:
    st.stop()

attributions, no_gradient = compute.attribution_choices(model)
if no_gradient:  # int8: occlusion only
    st.caption(f"Integrated Gradients is not offered: {no_gradient}.")
if st.session_state.get("explain_attribution") not in attributions:
    st.session_state["explain_attribution"] = next(iter(attributions))
how_col, share_col, run_col = st.columns([2, 2, 1], vertical_alignment="bottom")
how = how_col.radio("Attribution", list(attributions), key="explain_attribution", horizontal=True,
                    format_func=lambda k: attributions[k])
share = share_col.slider("Evidence = the top share of patches", 0.05, 0.5, 0.1, 0.05, key="explain_share",
                         format="%.2f")
key = (settings.choice.key, picked.key, settings.method, settings.keep_ratio, settings.options_key, how, share)
result = state.remembered(key)
pixels = state.model_input(settings.choice.key, picked.key, model, picked.image)
at_once = compute.explains_at_once(model, pixels, how)  # a small model: no button to press (compute.py says when)
if run_col.button("Explain", type="primary", width="stretch") or result is not None or at_once:
    with panel("Attributions"):
        if result is None:
            bar = st.progress(0.0, text="Attributing the unslimmed model…")

            def progress(done: int, total: int) -> None:
                part = "unslimmed" if done <= total // 2 else "slimmed"
                bar.progress(min(done / total, 1.0), text=f"Attributing the {part} model: {done}/{total} forwards")

            try:
                result = compute.explanation(model, picked.image, settings.method, settings.keep_ratio,
                                             settings.options, how, share, progress)
            except PatchslimError as exc:
                bar.empty()
                st.error(f"{compute.PLAN_REFUSAL}: {exc}")
                st.stop()
            bar.empty()
            state.remember(key, result)
        views.explanation(result, compute.attribution_pictures(result, picked.image, model), share)
        if model.spec.hierarchical:
            st.caption("On a Swin no patch leaves the model (a token that sits a block out comes back for the "
                       "next), so every top patch is kept; the rank agreement shows how slimming moved them.")
    if result is None:  # the attributions' panel said why
        st.stop()
    if model.spec.hierarchical:
        with panel("Attention received in the window"):
            kinds = {name: view.per_block for name, view in compute.WINDOW_ATTENTION_VIEWS.items()}
            kind, block = views.attention_controls(kinds, model.spec.depth, key="explain",
                                                   default_block=min(compute.default_overlay_block(model.spec), model.spec.depth - 1),
                                                   scope="window::")
            views.attention_pair(compute.attention_pair(model, pixels, result.baseline_trace, result.trace, kind,
                                                        block))
    with panel("Gradient-weighted rollout"):
        views.grad_rollout(compute.grad_rollout_pictures(result, picked.image, model), result.grad_rollout_refused)

    st.subheader("Which map to believe?")
    modes, refused = compute.faithfulness_modes(model)
    mode_col, steps_col, score_col = st.columns([2, 2, 1], vertical_alignment="bottom")
    mode = mode_col.radio("Remove a patch by", modes, key="faithfulness_mode", horizontal=True,
                          format_func=lambda m: compute.MODE_LABELS[m])
    steps = steps_col.slider("Steps of the curves", 5, 50, 20, 5, key="faithfulness_steps")
    scored_key = ("faithfulness",) + key + (mode, steps)
    scored = state.remembered(scored_key)
    if score_col.button("Score the maps", key="faithfulness_run", width="stretch") or scored is not None:
        with panel("Faithfulness"):
            if scored is None:
                with st.spinner("Deleting and inserting patches in the order of each map…"):
                    scored = compute.faithfulness_scores(model, picked.image, result, mode, steps)
                state.remember(scored_key, scored)
            phase = st.radio("Curves of", ("after", "before"), key="faithfulness_phase", horizontal=True,
                             format_func=lambda p: "the slimmed model" if p == "after" else "the unslimmed model")
            views.faithfulness(compute.faithfulness_rows(scored), compute.faithfulness_figure(scored, mode, phase),
                               refused)
    else:
        st.caption("Deletion and insertion scores: a few dozen batched forwards per map and model. "
                   + " ".join(f"{m.capitalize()} mode is not offered: {r}." for m, r in refused.items()))
else:
    st.info(f"Attributions of {model.name} take a few seconds to a minute (each is dozens of forwards and backwards "
            f"of the model): press **Explain**.")
