"""The app never hides an error: a failing panel shows its message in its place and logs the traceback, the rest
of the page renders; optional features are decided by what is installed; the memory readout follows the model's
precision; the app's modules form no import circle and the views call neither the engine nor compute."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

import patchslim  # noqa: E402
from patchslim import bundled  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "app"
MAIN = APP / "main.py"
TIMEOUT = 120


def _metric(at: AppTest, label: str):
    found = [m for m in at.metric if m.label == label]
    assert found, f"no metric {label!r}; metrics: {[m.label for m in at.metric]}"
    return found[0]


def _explore(at: AppTest | None = None) -> AppTest:
    at = at or AppTest.from_file(str(MAIN), default_timeout=TIMEOUT)
    at.run()
    at.selectbox(key="model_name").set_value(bundled.BUNDLED_NAME).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


# --------------------------------------------------------------------------- one panel fails, the page goes on

def test_a_panel_whose_computation_raises_shows_its_error_and_the_rest_renders(monkeypatch, caplog):
    from app import compute

    def broken(*args, **kwargs):
        raise RuntimeError("attention maps exploded on purpose")

    monkeypatch.setattr(compute, "attention_pair", broken)
    with caplog.at_level(logging.ERROR, logger="patchslim.app"):
        at = _explore()
    errors = [e.value for e in at.error]
    wanted = "RuntimeError: attention maps exploded on purpose"
    assert any("Attention maps" in e and wanted in e for e in errors), errors
    assert not any("Traceback" in e for e in errors)
    # the rest of the page: numbers, top-5, tokens chart, method card and downloads
    assert _metric(at, "Tokens in last block").value
    assert at.success or any("Label flipped" in e for e in errors)
    assert any(s.value == "Downloads" for s in at.subheader)
    assert len(at.get("download_button")) >= 2
    logged = [r for r in caplog.records if r.name == "patchslim.app" and r.exc_info]
    assert logged and "attention maps exploded on purpose" in str(logged[0].exc_info[1])


def test_a_panel_whose_drawing_raises_shows_its_error_and_the_rest_renders(monkeypatch, caplog):
    from app import views

    def broken(*args, **kwargs):
        raise ValueError("cannot draw the top-5")

    monkeypatch.setattr(views, "prediction_change", broken)
    with caplog.at_level(logging.ERROR, logger="patchslim.app"):
        at = _explore()
    assert any("Top-5 before and after" in e.value and "cannot draw the top-5" in e.value for e in at.error)
    assert _metric(at, "GMACs per image").value
    assert any(s.value == "Attention: unslimmed vs slimmed" for s in at.subheader)
    assert len(at.get("image")) >= 3  # the overlay and both attention maps are still drawn
    assert any(r.exc_info for r in caplog.records if r.name == "patchslim.app")


def test_a_failing_panel_on_the_compare_page_leaves_the_accuracy_chart(monkeypatch):
    from app import compute

    def broken(*args, **kwargs):
        raise RuntimeError("no cards today")

    monkeypatch.setattr(compute, "method_cards", broken)
    at = _explore()
    at.switch_page("app_pages/compare.py").run()
    assert not at.exception
    assert any("no cards today" in e.value for e in at.error)
    assert any(s.value == "Cost and accuracy across ρ" for s in at.subheader)


def test_the_panel_helper_passes_streamlit_control_flow_and_shows_patchslim_errors_plainly():
    """``st.stop()`` inside a panel still stops the page; a PatchslimError is shown as the message it is."""
    script = '''
import streamlit as st
from patchslim.errors import PatchslimError
from app.panels import panel

with panel("First") as first:
    raise PatchslimError("keep ratio must be in (0, 1]")
st.write(f"first failed: {first.failed}")
with panel("Second"):
    st.stop()
st.write("never shown")
'''
    at = AppTest.from_string(script, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert [e.value for e in at.error] == ["**First**: keep ratio must be in (0, 1]"]
    texts = [m.value for m in at.markdown]
    assert "first failed: True" in texts and "never shown" not in texts


# --------------------------------------------------------------------------- optional features

def test_explain_page_without_captum_says_so_and_the_app_goes_on(monkeypatch):
    from app import features

    monkeypatch.setattr(features, "INSTALLED", features.Features(attributions=False))
    at = _explore()
    at.switch_page("app_pages/explain.py").run()
    assert not at.exception
    assert any("captum" in i.value for i in at.info)
    at.switch_page("app_pages/explore.py").run()
    assert _metric(at, "Tokens in last block").value


def test_optional_features_are_looked_up_without_importing(monkeypatch):
    from app import features

    seen = []
    monkeypatch.setattr(features, "find_spec", lambda name: seen.append(name) or None)
    assert features.detect() == features.Features(attributions=False)
    assert seen == ["captum"]


# --------------------------------------------------------------------------- memory readout

@pytest.fixture(scope="module")
def fp32_and_bf16():
    pretrained = bundled.CHECKPOINT_PATH.exists()
    return [patchslim.load_model(bundled.BUNDLED_NAME, device="cpu", precision=p, pretrained=pretrained)
            for p in ("fp32", "bf16")]


def test_memory_readout_takes_bytes_from_the_model_precision(fp32_and_bf16):
    from app import compute

    image = compute.bundled_gallery()[0].image
    costs = {}
    for model in fp32_and_bf16:
        base = compute.baseline(model, image)
        slim = compute.slimmed(model, image, "random", 0.5)
        assert base.precision == model.precision
        assert slim.trace.logits.dtype == patchslim.run(model, image).logits.dtype  # the engine's fp32 logits
        costs[model.precision] = compute.costs(base, slim)
    assert costs["bf16"].memory_after == pytest.approx(costs["fp32"].memory_after / 2)
    assert costs["bf16"].memory_before == pytest.approx(costs["fp32"].memory_before / 2)
    trace = patchslim.run(fp32_and_bf16[0], image)
    assert compute.activation_mb(trace, "fp16") == pytest.approx(compute.activation_mb(trace, "fp32") / 2)


def test_memory_readout_in_the_app_halves_under_bf16():
    at = _explore()
    fp32 = float(_metric(at, "Activation memory").value.split()[0])
    at.selectbox(key="precision").set_value("bf16").run()
    assert not at.exception
    bf16 = float(_metric(at, "Activation memory").value.split()[0])
    assert bf16 == pytest.approx(fp32 / 2, rel=0.01)


# --------------------------------------------------------------------------- structure

def _app_modules() -> dict[str, Path]:
    modules = {f"app.{p.stem}": p for p in APP.glob("*.py") if p.stem != "__init__"}
    modules.update({f"app.app_pages.{p.stem}": p for p in (APP / "app_pages").glob("*.py")})
    return modules


def _app_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The app modules a file imports, anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


def test_no_app_modules_import_each_other():
    modules = _app_modules()
    graph = {name: _app_imports(path, modules) - {name} for name, path in modules.items()}
    assert "app.compute" in graph and graph["app.compute"] == set(), graph["app.compute"]

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for c in (cycle_from(name) for name in graph) if c]
    assert not cycles, cycles


def test_views_call_neither_the_engine_nor_compute():
    tree = ast.parse((APP / "views.py").read_text())
    imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert not {"patchslim", "vis", "flops", "torch"} & imported
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            root = node.func
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in {"compute", "patchslim"}:
                calls.append(ast.unparse(node.func))
    assert not calls, calls


def test_no_error_is_swallowed_in_the_app():
    """No ``except Exception`` / bare ``except`` in app/ outside the panel helper, which shows and logs."""
    broad = []
    for name, path in _app_modules().items():
        if name == "app.panels":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler):
                caught = ast.unparse(node.type) if node.type is not None else "bare"
                if caught in {"bare", "Exception", "BaseException"}:
                    broad.append(f"{path.name}:{node.lineno} {caught}")
    assert not broad, broad
