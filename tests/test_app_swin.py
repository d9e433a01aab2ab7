"""The app's pages with the bundled Swin (``fashion-swin``) chosen in the sidebar, headless with AppTest.

Methods that do not act window by window are left out of the pickers with their reason, a stage picker sets the
plan's ``stages``, the Explore page's readouts follow the engine, the overlay draws each block's own grid and
windows, and the Compare, Explain, Benchmark and Audit pages run without a traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

import patchslim  # noqa: E402
from patchslim import bundled  # noqa: E402

MAIN = Path(__file__).resolve().parent.parent / "app" / "main.py"
TIMEOUT = 180
SWIN = bundled.SWIN_NAME
WINDOWED = [n for n in patchslim.method_names() if patchslim.get_method(n).windowed]
NOT_WINDOWED = [n for n in patchslim.method_names() if not patchslim.get_method(n).windowed]
STAGES_KEY = f"stages::{SWIN}::2"


def _exceptions(at: AppTest) -> list[str]:
    return [e.value for e in at.exception]


def _metric(at: AppTest, label: str):
    found = [m for m in at.metric if m.label == label]
    assert found, f"no metric {label!r}; metrics: {[m.label for m in at.metric]}"
    return found[0]


def _texts(at: AppTest) -> str:
    return " ".join([c.value for c in at.caption] + [m.value for m in at.markdown] + [i.value for i in at.info]
                    + [w.value for w in at.warning])


@pytest.fixture()
def app() -> AppTest:
    at = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT).run()
    at.selectbox(key="model_name").set_value(SWIN).run()
    assert not _exceptions(at)
    return at


@pytest.fixture(scope="module")
def engine_model():
    """fashion-swin as the app loads it (random weights while its checkpoint is missing)."""
    return patchslim.load_model(SWIN, device="auto", pretrained=bundled.checkpoint_path(SWIN).exists())


@pytest.fixture(scope="module")
def first_gallery_image():
    from app import compute

    return compute.bundled_gallery()[0].image


def test_the_method_picker_offers_only_window_methods_and_says_why_not_the_others(app):
    assert NOT_WINDOWED and WINDOWED
    assert app.selectbox(key="method").options == WINDOWED
    reasons = " ".join(m.value for m in app.sidebar.markdown)
    for name in NOT_WINDOWED:
        assert f"**{name}**" in reasons
        reason = patchslim.get_method(name).window_reason
        if reason:
            assert reason in reasons
    if not bundled.checkpoint_path(SWIN).exists():
        assert any("random weights" in w.value for w in app.warning)  # the missing checkpoint, said once


def test_a_method_chosen_for_a_vit_that_does_not_apply_is_replaced_with_the_reason():
    at = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT).run()
    at.selectbox(key="model_name").set_value(bundled.BUNDLED_NAME).run()
    at.selectbox(key="method").set_value("evit").run()
    at.selectbox(key="model_name").set_value(SWIN).run()
    assert not _exceptions(at)
    assert at.selectbox(key="method").value in WINDOWED
    assert any("**evit** does not apply to fashion-swin" in c.value for c in at.sidebar.caption)


@pytest.mark.parametrize("method,keep_ratio,stages", [("random", 0.5, None), ("uniform", 0.3, [0, 1]),
                                                      ("attention", 0.7, [1]), ("tome", 0.5, None)])
def test_explore_readouts_follow_the_engine_with_the_stages_picked(app, engine_model, first_gallery_image, method,
                                                                   keep_ratio, stages):
    from patchslim.metrics.flops import compare_macs

    assert app.multiselect(key=STAGES_KEY).value == list(engine_model.spec.default_stages)
    app.selectbox(key="method").set_value(method)
    app.slider(key="keep_ratio").set_value(keep_ratio)
    if stages is not None:
        app.multiselect(key=STAGES_KEY).set_value(stages)
    app.run()
    assert not _exceptions(app)
    chosen = tuple(stages) if stages is not None else engine_model.spec.default_stages
    assert app.session_state["settings"].options["stages"] == chosen
    plan = patchslim.SlimPlan.from_options(method, keep_ratio, {"stages": chosen})
    trace = patchslim.run(engine_model, first_gallery_image, plan)
    base = patchslim.run(engine_model, first_gallery_image)
    assert _metric(app, "GMACs per image").value == f"{compare_macs(trace, base).gmacs:.3g}"
    assert _metric(app, "ρ reached").value == f"{trace.keep_ratio:.2f}"
    assert _metric(app, "Tokens in last block").value == str(trace.tokens_per_block[-1])
    top1 = trace.top_k(1)[0][0]
    assert top1 in " ".join(s.value for s in app.success) + " ".join(e.value for e in app.error)


def test_explore_overlay_block_picker_names_stages_and_windows(app):
    from app import compute

    picker = app.select_slider(key="explore_block::swin::6")
    spec = patchslim.load_model(SWIN, pretrained=False).spec
    assert picker.value == compute.default_overlay_block(spec) == 0
    assert compute.block_label(spec, 1) == "block 1 (stage 0, 12x12 tokens, shifted windows)"
    assert compute.block_label(spec, 4) == "block 4 (stage 1, 6x6 tokens)"
    for block in (1, 4, 6):
        picker.set_value(block).run()
        assert not _exceptions(app)
        assert not [e for e in app.error if "overlay" in e.value]
    texts = _texts(app)
    assert "CLS attention and rollout are not offered" in texts and "no class token" in texts
    assert app.radio(key="explore_attention_kind").options == ["Attention received in the window"]


def test_explore_with_tome_per_window_draws_merged_tokens_and_window_attention(app, engine_model,
                                                                               first_gallery_image):
    from app import compute
    from patchslim.vis import MERGED, window_status

    app.selectbox(key="method").set_value("tome")
    app.slider(key="keep_ratio").set_value(0.5)
    app.run()
    assert not _exceptions(app) and not app.error
    for block in (0, 1, 4, 6):  # merged blocks of stage 0 (one shifted), then stage 1 and the end, unslimmed
        app.select_slider(key="explore_block::swin::6").set_value(block).run()
        assert not _exceptions(app)
        assert not [e for e in app.error if "overlay" in e.value]
    trace = patchslim.run(engine_model, first_gallery_image, patchslim.SlimPlan.single("tome", 0.5))
    status = window_status(trace, 1)
    assert (status.status == MERGED).any() and status.ran_per_window.tolist() == [36] * 4
    overlay = compute.overlay(engine_model, first_gallery_image, trace, 1)
    assert overlay.size[0] > 0
    app.slider(key="explore_attention_block::swin::6").set_value(1).run()  # received attention, merged block
    assert not _exceptions(app) and not app.error


def test_compare_page_shows_the_window_methods_and_why_not_the_others(app):
    app.switch_page("app_pages/compare.py").run()
    assert not _exceptions(app)
    titles = {m.value for m in app.markdown}
    for method in WINDOWED:
        assert f"#### {method}" in titles
    for method in NOT_WINDOWED:
        assert f"#### {method}" not in titles
    assert f"Not offered for {SWIN}" in _texts(app)
    assert not app.error


def test_explain_page_says_why_there_is_no_rollout_and_runs_occlusion(app):
    app.switch_page("app_pages/explain.py").run()
    assert not _exceptions(app)
    assert "Rollout and CLS attention are not offered" in _texts(app)
    app.radio(key="explain_attribution").set_value("occlusion").run()
    app.button[0].click().run()
    assert not _exceptions(app)
    assert not app.error, [e.value for e in app.error]
    assert _metric(app, "Kept evidence").value == "100%"  # a Swin drops no patch for good
    assert app.radio(key="explain_attention_kind").options == ["Attention received in the window"]
    app.slider(key="explain_attention_block::window::6").set_value(4).run()
    assert not _exceptions(app) and not app.error


def test_benchmark_page_offers_the_window_methods(app):
    app.switch_page("app_pages/benchmark.py").run()
    assert not _exceptions(app)
    assert app.multiselect(key="bench_methods").options == WINDOWED
    assert app.multiselect(key="bench_methods").value == WINDOWED
    app.multiselect(key="bench_methods").set_value(["uniform"])
    app.multiselect(key="bench_ratios").set_value([0.5])
    app.number_input(key="bench_repeats").set_value(3)
    app.run()
    app.button[0].click().run()
    assert not _exceptions(app)
    assert not [w for w in app.warning if "could not run" in w.value]
    table = app.dataframe[0].value
    assert list(table["method"]) == ["uniform"] and table["gmacs_reduction"].iloc[0] > 0


def test_audit_page_audits_the_canvas_sample_with_a_swin(app):
    app.switch_page("app_pages/audit.py").run()
    assert not _exceptions(app)
    assert app.radio(key="audit_source").value.startswith("Bundled canvas sample")
    assert app.multiselect(key="audit_methods").options == WINDOWED
    assert app.checkbox(key="audit_evidence").disabled  # kept evidence ranks patches by rollout from CLS
    app.multiselect(key="audit_methods").set_value(["uniform"])
    app.multiselect(key="audit_ratios").set_value([0.5])
    app.number_input(key="audit_limit").set_value(20)
    app.run()
    app.button[0].click().run()
    assert not _exceptions(app) and not app.error
    assert _metric(app, "Images audited").value == "20"
