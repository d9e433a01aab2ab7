"""The app's pages, headless with ``streamlit.testing.v1.AppTest``, on the bundled model.

Every page runs without an exception, and the readouts follow the engine: after moving the method and rho
widgets, the page shows exactly what ``patchslim.run`` gives for the same image and plan.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

import patchslim  # noqa: E402
from patchslim import bundled  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MAIN = REPO / "app" / "main.py"
TIMEOUT = 120


def _exceptions(at: AppTest) -> list[str]:
    return [e.value for e in at.exception]


def _metric(at: AppTest, label: str):
    found = [m for m in at.metric if m.label == label]
    assert found, f"no metric {label!r}; metrics: {[m.label for m in at.metric]}"
    return found[0]


@pytest.fixture()
def app() -> AppTest:
    """The app on the bundled model (the person's choice in the sidebar), first run done."""
    at = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT).run()
    at.selectbox(key="model_name").set_value(bundled.BUNDLED_NAME).run()
    assert not _exceptions(at)
    return at


@pytest.fixture(scope="module")
def engine_model():
    """The model exactly as the app loads it (random weights only while the checkpoint is missing)."""
    return patchslim.load_model(bundled.BUNDLED_NAME, device="auto", pretrained=bundled.CHECKPOINT_PATH.exists())


@pytest.fixture(scope="module")
def first_gallery_image():
    from app import compute

    return compute.bundled_gallery()[0].image


@pytest.fixture()
def default_weights_missing(monkeypatch):
    """As on a machine where DeiT-S's pretrained weights are neither cached nor downloadable."""
    from app import state

    if not bundled.CHECKPOINT_PATH.exists():
        pytest.skip("the bundled checkpoint is missing (the first screen then says so)")
    monkeypatch.setattr(state, "weights_status", lambda name: "not cached, and the model hub cannot be reached")
    state.weights_available.clear()
    yield
    state.weights_available.clear()


def test_first_screen_opens_on_the_bundled_model_with_a_note_on_the_default_weights(default_weights_missing):
    """Without DeiT-S's weights the app opens on the bundled model: results at once, one line in the sidebar on
    how to get the weights, and no warning banner on any page. Asking for DeiT-S then says what runs instead."""
    from patchslim.models import DEFAULT_MODEL, WEIGHTS_DIR_ENV

    at = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT).run()
    assert not _exceptions(at)
    assert at.title[0].value == "Explore one image"
    assert at.session_state["model_name"] == bundled.BUNDLED_NAME
    assert at.session_state["settings"].choice.model.name == bundled.BUNDLED_NAME
    assert _metric(at, "Tokens in last block").value  # results shown with the bundled model
    notes = [c.value for c in at.sidebar.caption if WEIGHTS_DIR_ENV in c.value]
    assert len(notes) == 1 and "DeiT-S" in notes[0] and "\n" not in notes[0]  # one line
    help_text = at.sidebar.caption[[c.value for c in at.sidebar.caption].index(notes[0])].proto.help
    assert f"{DEFAULT_MODEL}.safetensors" in help_text  # the ways to get them, in its tooltip
    for page in (None, "app_pages/benchmark.py", "app_pages/audit.py"):  # pages that compute nothing at once
        if page:
            at.switch_page(page).run()
            assert not _exceptions(at)
        assert not at.warning, (page, [w.value for w in at.warning])

    at.selectbox(key="model_name").set_value(DEFAULT_MODEL).run()  # asked for by name: say what runs instead
    notices = " ".join(w.value for w in at.warning)
    assert "not available" in notices and bundled.BUNDLED_NAME in notices


@pytest.mark.parametrize("method,keep_ratio", [("uniform", 0.3), ("tome", 0.5), ("attention", 0.7), ("tofu", 0.5),
                                               ("pitome", 0.3), ("ppt", 0.5), ("zerotprune", 0.7)])
def test_method_and_rho_widgets_drive_the_readouts_like_the_engine(app, engine_model, first_gallery_image,
                                                                   method, keep_ratio):
    from patchslim.metrics.flops import compare_macs

    app.selectbox(key="method").set_value(method)
    app.slider(key="keep_ratio").set_value(keep_ratio)
    app.run()
    assert not _exceptions(app)

    trace = patchslim.run(engine_model, first_gallery_image, patchslim.SlimPlan.from_options(method, keep_ratio))
    base = patchslim.run(engine_model, first_gallery_image)
    assert _metric(app, "ρ reached").value == f"{trace.keep_ratio:.2f}"
    tokens = _metric(app, "Tokens in last block")
    assert tokens.value == str(trace.tokens_per_block[-1])
    assert tokens.delta == f"of {base.tokens_per_block[-1]}"
    assert _metric(app, "GMACs per image").value == f"{compare_macs(trace, base).gmacs:.3g}"
    top1 = trace.top_k(1)[0][0]
    banner = " ".join(s.value for s in app.success) + " ".join(e.value for e in app.error)
    assert top1 in banner
    memory = _metric(app, "Activation memory")
    assert memory.delta.endswith(")") and ("no change" in memory.delta or "%" in memory.delta)


def test_a_readout_that_did_not_change_says_so_without_a_coloured_arrow():
    from app.views import change

    assert change(0.372, 0.372, "0.372") == dict(delta="no change (from 0.372)", delta_color="off", delta_arrow="off")
    assert change(0.3735, 0.372, "0.372")["delta"] == "no change (from 0.372)"  # +0.4 % rounds to 0 %
    assert change(0.0669, 0.0886, "0.0886") == dict(delta="-24% (from 0.0886)", delta_color="inverse")
    assert change(0.012, 0.011, "11 ms") == dict(delta="+9% (from 11 ms)", delta_color="inverse")
    assert change(1.0, 0.0, "0") == dict(delta=None)  # nothing to compare with: no delta at all


def test_moving_rho_changes_tokens_and_gmacs(app):
    app.selectbox(key="method").set_value("random").run()
    app.slider(key="keep_ratio").set_value(0.9).run()
    high = (_metric(app, "Tokens in last block").value, _metric(app, "GMACs per image").value)
    app.slider(key="keep_ratio").set_value(0.2).run()
    low = (_metric(app, "Tokens in last block").value, _metric(app, "GMACs per image").value)
    assert int(low[0]) < int(high[0]) and float(low[1]) < float(high[1])


def test_every_method_option_gets_a_widget(app):
    depth = 6  # the bundled model
    for method in patchslim.method_names():
        app.selectbox(key="method").set_value(method).run()
        assert not _exceptions(app), method
        keys = {w.key for w in app.sidebar if getattr(w, "key", None)}
        for spec in patchslim.get_method(method).options:
            assert f"opt::{method}::{spec.name}::{depth}" in _widget_keys(app), (method, spec.name, keys)


def _widget_keys(at: AppTest) -> set[str]:
    keys = set()
    for kind in ("selectbox", "slider", "checkbox", "number_input", "text_input", "multiselect", "radio"):
        keys.update(w.key for w in getattr(at, kind) if w.key)
    return keys


def test_bad_upload_shows_an_error_and_the_app_stays_usable(app):
    app.radio(key="image_source").set_value("Upload").run()
    app.file_uploader(key="uploader").upload("broken.png", b"this is not an image", "image/png").run()
    assert not _exceptions(app)
    assert any("cannot be used" in e.value for e in app.error)
    app.radio(key="image_source").set_value("Gallery").run()
    assert not _exceptions(app)
    assert _metric(app, "ρ reached").value


def test_uploaded_photo_is_explored(app):
    buffer = io.BytesIO()
    Image.new("RGB", (120, 90), (200, 30, 30)).save(buffer, format="JPEG")
    app.radio(key="image_source").set_value("Upload").run()
    app.file_uploader(key="uploader").upload("red.jpg", buffer.getvalue(), "image/jpeg").run()
    assert not _exceptions(app)
    assert not app.error
    assert _metric(app, "Tokens in last block").value


def _jpeg(colour: tuple[int, int, int], size=(120, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_image_choice_survives_a_visit_to_other_pages(app):
    """Upload on Explore, look at Compare, Benchmark and back: the upload stays the image in use."""
    app.radio(key="image_source").set_value("Upload").run()
    app.file_uploader(key="uploader").upload("red.jpg", _jpeg((200, 30, 30)), "image/jpeg").run()
    for page in ("app_pages/compare.py", "app_pages/benchmark.py", "app_pages/compare.py", "app_pages/explore.py"):
        app.switch_page(page).run()
        assert not _exceptions(app)
        if page != "app_pages/benchmark.py":
            assert app.radio(key="image_source").value == "Upload", page
            assert not app.info, [i.value for i in app.info]  # not "upload an image to start"
    assert _metric(app, "Tokens in last block").value


def test_gallery_pick_survives_a_visit_to_other_pages(app):
    key = "gallery_pick::bundled"
    app.selectbox(key=key).set_value(3).run()
    for page in ("app_pages/benchmark.py", "app_pages/explore.py"):
        app.switch_page(page).run()
    assert app.selectbox(key=key).value == 3


def test_good_upload_after_a_refused_one_on_another_page_replaces_it(app):
    """The refusal of a broken upload shows until a good file is uploaded, on whichever page."""
    app.radio(key="image_source").set_value("Upload").run()
    app.file_uploader(key="uploader").upload("broken.png", b"this is not an image", "image/png").run()
    assert any("cannot be used" in e.value for e in app.error)
    app.switch_page("app_pages/compare.py").run()
    assert any("cannot be used" in e.value for e in app.error)  # still the current upload
    app.file_uploader(key="uploader").upload("red.jpg", _jpeg((200, 30, 30)), "image/jpeg").run()
    assert not _exceptions(app)
    assert not any("cannot be used" in e.value for e in app.error)
    app.switch_page("app_pages/explore.py").run()
    assert not any("cannot be used" in e.value for e in app.error)
    assert _metric(app, "Tokens in last block").value


def test_compare_page(app):
    app.switch_page("app_pages/compare.py").run()
    assert not _exceptions(app)
    assert app.title[0].value == "Compare methods"
    titles = {m.value for m in app.markdown}
    for method in patchslim.method_names():
        assert f"#### {method}" in titles


def test_explain_page_runs_attributions(app):
    app.switch_page("app_pages/explain.py").run()
    assert not _exceptions(app)
    app.radio(key="explain_attribution").set_value("occlusion").run()
    app.button[0].click().run()
    assert not _exceptions(app)
    kept = _metric(app, "Kept evidence").value
    assert kept.endswith("%")


def test_explain_page_scores_the_maps(app):
    app.switch_page("app_pages/explain.py").run()
    app.radio(key="explain_attribution").set_value("occlusion").run()
    app.button[0].click().run()
    assert not _exceptions(app)
    assert app.radio(key="faithfulness_mode").options == ["Dropping its token", "Blurring its pixels"]
    app.slider(key="faithfulness_steps").set_value(5).run()
    app.button(key="faithfulness_run").click().run()
    assert not _exceptions(app) and not app.error
    table = app.dataframe[0].value
    assert list(table["map"]) == ["CLS attention (last block)", "attention rollout", "gradient-weighted rollout",
                                  "occlusion", "random (reference)"]
    assert ((table["deletion_before"] >= 0) & (table["insertion_after"] <= 1)).all()
    assert any("Deletion: the area under" in c.value for c in app.caption)
    app.radio(key="faithfulness_mode").set_value("pixel").run()  # another mode: scored on demand again
    assert not _exceptions(app) and not app.dataframe[1:]


def test_explain_page_offers_pixel_mode_only_where_dropped_tokens_flow_on(app, monkeypatch):
    from patchslim.adapters.vit import ViTAdapter

    monkeypatch.setattr(ViTAdapter, "token_removal", False)
    app.switch_page("app_pages/explain.py").run()
    app.radio(key="explain_attribution").set_value("occlusion").run()
    app.button[0].click().run()
    assert not _exceptions(app)
    assert app.radio(key="faithfulness_mode").options == ["Blurring its pixels"]
    assert any("Token mode is not offered" in c.value and "pixel mode" in c.value for c in app.caption)


def test_benchmark_page_runs_on_demand(app):
    app.switch_page("app_pages/benchmark.py").run()
    assert not _exceptions(app)
    app.multiselect(key="bench_methods").set_value(["random"])
    app.multiselect(key="bench_ratios").set_value([0.5])
    app.number_input(key="bench_repeats").set_value(3)
    app.run()
    app.button[0].click().run()
    assert not _exceptions(app)
    assert len(app.dataframe) == 1
    table = app.dataframe[0].value
    assert list(table["method"]) == ["random"]
    assert table["speedup"].iloc[0] > 0


def test_audit_page_audits_the_bundled_sample(app):
    app.switch_page("app_pages/audit.py").run()
    assert not _exceptions(app)
    app.multiselect(key="audit_methods").set_value(["uniform"])
    app.multiselect(key="audit_ratios").set_value([0.5])
    app.number_input(key="audit_limit").set_value(40)
    app.run()
    app.button[0].click().run()
    assert not _exceptions(app)
    assert not app.error
    assert _metric(app, "Images audited").value == "40"
    flagged = _metric(app, "Flagged").value
    assert flagged.endswith("of 3")  # uniform at one rho, by brightness, by family and by class
    sentences = [m.value for m in app.markdown] + [w.value for w in app.warning] + [s.value for s in app.success]
    assert any("beyond the noise" in text for text in sentences)
    tables = [t.value for t in app.dataframe]
    per_class = [t for t in tables if "group" in t and set(t["group"]) <= set(bundled.CLASS_NAMES) and len(t) > 2]
    assert per_class and per_class[0]["images"].sum() == 40
    assert len(app.get("download_button")) == 3


def test_audit_page_says_why_a_folder_cannot_be_audited(app, tmp_path, monkeypatch):
    """(Server data needs the operator's data folder: tests/test_app_data_sources.py.)"""
    monkeypatch.setenv("PATCHSLIM_APP_DATA_DIR", str(tmp_path))
    app.switch_page("app_pages/audit.py").run()
    app.radio(key="audit_source").set_value("A folder, CSV or zip on this server").run()
    app.selectbox(key="audit_server_pick").set_value("Type a path inside it…").run()
    app.text_input(key="audit_folder").set_value("nowhere").run()
    app.button[0].click().run()
    assert not _exceptions(app)
    assert app.error and "could not run" in app.error[0].value


@pytest.mark.parametrize("typical_seconds, slimmed_runs, unslimmed_runs",
                         [(0.004, 3, 3), (0.02, 2, 0), (0.065, 1, 0)])
def test_live_latency_is_the_fastest_of_the_runs_the_model_can_afford(monkeypatch, engine_model, first_gallery_image,
                                                                       typical_seconds, slimmed_runs, unslimmed_runs):
    """A model whose forward takes a few ms is timed three times, alternating with the unslimmed forward, and
    the fastest run of each kept (the first run of each is disturbed here, ten times slower); a 20 ms model
    gets two runs of the slimmed forward only, a DeiT-S-sized one a single run. The forwards and the clock
    are stand-ins (the unslimmed forward "takes" twice as long), and the model's typical time is set as the
    warm-up would have measured it."""
    import types

    from app import compute

    trace = patchslim.run(engine_model, first_gallery_image, patchslim.SlimPlan.single("random", 0.5))
    now = [0.0]
    calls = {"slimmed": 0, "unslimmed": 0}

    def run(model, images, plan=None):
        kind = "slimmed" if plan.stages else "unslimmed"
        calls[kind] += 1
        now[0] += typical_seconds * (2 if kind == "unslimmed" else 1) * (10 if calls[kind] == 1 else 1)
        return trace

    monkeypatch.setitem(compute._TYPICAL_SECONDS, engine_model.model, typical_seconds)
    monkeypatch.setattr(compute.patchslim, "run", run)
    monkeypatch.setattr(compute, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    timed = compute.slimmed(engine_model, first_gallery_image, "random", 0.5)
    assert calls == {"slimmed": slimmed_runs, "unslimmed": unslimmed_runs}
    assert timed.seconds == pytest.approx(typical_seconds * (1 if slimmed_runs > 1 else 10))
    if unslimmed_runs:
        assert timed.baseline_seconds == pytest.approx(2 * typical_seconds)
    else:
        assert timed.baseline_seconds is None
    assert timed.trace is trace


def test_warm_up_measures_the_typical_forward_once(engine_model, first_gallery_image):
    from app import compute

    compute._TYPICAL_SECONDS.pop(engine_model.model, None)
    compute.baseline(engine_model, first_gallery_image)
    typical = compute._TYPICAL_SECONDS[engine_model.model]
    assert 0 < typical < 5
    compute.slimmed(engine_model, first_gallery_image, "random", 0.5)
    assert 0 < compute._TYPICAL_SECONDS[engine_model.model] <= typical  # never measured again, only lowered


def test_a_warm_up_on_a_busy_machine_is_corrected_by_the_next_unslimmed_run(monkeypatch, engine_model,
                                                                            first_gallery_image):
    from app import compute

    monkeypatch.setitem(compute._TYPICAL_SECONDS, engine_model.model, 10.0)  # as if the warm-up took 10 s
    compute.baseline(engine_model, first_gallery_image)  # one run (10 s leaves no room for more)
    assert compute._TYPICAL_SECONDS[engine_model.model] < 10.0


def test_readouts_compare_with_the_unslimmed_time_taken_in_the_same_moment(monkeypatch, engine_model,
                                                                          first_gallery_image):
    from dataclasses import replace

    from app import compute

    base = compute.baseline(engine_model, first_gallery_image)
    monkeypatch.setitem(compute._TYPICAL_SECONDS, engine_model.model, 0.001)  # cheap, whatever the machine's load
    slim = compute.slimmed(engine_model, first_gallery_image, "random", 0.5)
    assert slim.baseline_seconds is not None
    assert compute.readouts(base, slim).costs.latency_before == slim.baseline_seconds
    alone = replace(slim, baseline_seconds=None)  # a large model: the image's unslimmed forward, timed once
    assert compute.readouts(base, alone).costs.latency_before == base.seconds


def _pictures(at: AppTest) -> list[str]:
    """The URLs of the page's pictures (a picture's URL names its content), in page order."""
    return [url for image in at.main.image for url in image.value]


def test_a_rho_change_redraws_everything_it_changes(app, engine_model, first_gallery_image):
    """The overlay and the attention maps are drawn in fragments (their own controls redraw them alone); a rho
    change still redraws them, and the numbers, the top-5 and the tokens chart, with the slimmed forward of the
    new rho. Moving the overlay's block slider redraws the overlay only."""
    from patchslim.metrics.flops import compare_macs

    app.selectbox(key="method").set_value("attention").run()
    app.slider(key="keep_ratio").set_value(0.9).run()
    overlay, attention_before, attention_after = _pictures(app)
    chart = app.main.get("vega_lite_chart")[0].proto.SerializeToString()  # the data rides beside the spec
    app.slider(key="keep_ratio").set_value(0.3).run()
    assert not _exceptions(app)
    pictures = _pictures(app)
    assert len(pictures) == 3
    assert pictures[0] != overlay and pictures[2] != attention_after
    assert app.main.get("vega_lite_chart")[0].proto.SerializeToString() != chart
    trace = patchslim.run(engine_model, first_gallery_image, patchslim.SlimPlan.from_options("attention", 0.3))
    base = patchslim.run(engine_model, first_gallery_image)
    assert _metric(app, "Tokens in last block").value == str(trace.tokens_per_block[-1])
    assert _metric(app, "GMACs per image").value == f"{compare_macs(trace, base).gmacs:.3g}"
    assert trace.top_k(1)[0][0] in " ".join(s.value for s in app.success) + " ".join(e.value for e in app.error)

    numbers = [m.value for m in app.metric]
    depth = engine_model.spec.depth
    app.select_slider(key=f"explore_block::{engine_model.spec.kind}::{depth}").set_value(0).run()
    assert not _exceptions(app)
    after_block = _pictures(app)
    assert after_block[0] != pictures[0] and after_block[1:] == pictures[1:]
    assert [m.value for m in app.metric][:2] == numbers[:2]  # GMACs and latency: not recomputed


def _app_latency():
    """``benchmarks/app_latency.py`` as a module (its fragment-rerun harness)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("app_latency", REPO / "benchmarks" / "app_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_rho_change_on_explore_reruns_only_the_fragment_that_draws_the_slider(app, engine_model,
                                                                                first_gallery_image):
    """The rho slider is drawn by the Explore page's results fragment, in its place in the sidebar: the server
    answers a move of it by rerunning that fragment alone (not the sidebar, the picker or the unslimmed forward),
    and the fragment alone redraws every number, picture and chart that rho changes, and the slider itself."""
    from patchslim.metrics.flops import compare_macs

    harness = _app_latency()
    app.selectbox(key="method").set_value("uniform").run()
    app.slider(key="keep_ratio").set_value(0.8).run()
    before = _pictures(app)
    app.slider(key="keep_ratio").set_value(0.3)
    with harness.fragment_reruns(harness.RHO_FRAGMENT):
        app.run()
    assert not _exceptions(app)
    assert not app.sidebar.selectbox and not app.title  # only the fragment ran: no model picker, no page title
    assert [s.key for s in app.sidebar.slider] == ["keep_ratio"] and app.slider(key="keep_ratio").value == 0.3
    after = _pictures(app)
    assert len(after) == 3 and after[0] != before[0] and after[2] != before[2]
    trace = patchslim.run(engine_model, first_gallery_image, patchslim.SlimPlan.from_options("uniform", 0.3))
    base = patchslim.run(engine_model, first_gallery_image)
    assert _metric(app, "Tokens in last block").value == str(trace.tokens_per_block[-1])
    assert _metric(app, "GMACs per image").value == f"{compare_macs(trace, base).gmacs:.3g}"
    assert app.main.get("vega_lite_chart") and app.main.get("download_button")
    tables = [h.proto.body for h in app.main.get("html") if 'class="top5"' in h.proto.body]
    assert len(tables) == 2 and f"{trace.top_k(1)[0][1]:.2%}" in tables[1]  # before, after: the slimmed top-1
    assert app.session_state["keep_ratio"] == 0.3
    app.run()  # the whole page again, at the new rho
    assert not _exceptions(app) and app.title and app.slider(key="keep_ratio").value == 0.3
    assert _metric(app, "GMACs per image").value == f"{compare_macs(trace, base).gmacs:.3g}"


@pytest.mark.parametrize("share_of_budget", [0.9, 1.1])
def test_explain_computes_at_once_only_when_the_model_is_quick(app, engine_model, monkeypatch, share_of_budget):
    """The Explain page starts the attributions without a button press when the model's forward, timed at
    warm-up, makes them fit AUTO_EXPLAIN_BUDGET_S, and waits for the button otherwise. The clock is a stand-in:
    every timed forward takes exactly the time that puts the estimate at 90 % or 110 % of the budget."""
    import types
    import weakref

    from app import compute

    forward = share_of_budget * compute.AUTO_EXPLAIN_BUDGET_S / compute.attribution_passes(engine_model, "ig")
    now = [0.0]

    def perf_counter() -> float:  # a forward is clocked by two readings in a row: each reading adds its time
        now[0] += forward
        return now[0]

    monkeypatch.setattr(compute, "_TYPICAL_SECONDS", weakref.WeakKeyDictionary())  # warm up again, on this clock
    monkeypatch.setattr(compute, "time", types.SimpleNamespace(perf_counter=perf_counter))
    app.switch_page("app_pages/explain.py").run()
    assert not _exceptions(app)
    assert app.radio(key="explain_attribution").value == "ig"
    computed = [m for m in app.metric if m.label == "Kept evidence"]
    waiting = [i.value for i in app.info if "press **Explain**" in i.value]
    if share_of_budget < 1:
        assert computed and not waiting
    else:
        assert waiting and not computed
        app.button[0].click().run()  # the button still computes them
        assert _metric(app, "Kept evidence").value.endswith("%")
