"""The Compare page's switch between "same ρ" and "same cost", headless with AppTest on the bundled model: at the
same cost every card shows the ρ the engine's budget search gives, a method that cannot meet the budget says what
it can reach, and the accuracy-vs-compute chart leads the page."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

import patchslim  # noqa: E402
from patchslim import bundled  # noqa: E402

MAIN = Path(__file__).resolve().parent.parent / "app" / "main.py"
TIMEOUT = 300


@pytest.fixture()
def compare() -> AppTest:
    """The Compare page on the bundled model, first run done (same ρ)."""
    at = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT).run()
    at.selectbox(key="model_name").set_value(bundled.BUNDLED_NAME).run()
    at.switch_page("app_pages/compare.py").run()
    assert not at.exception
    return at


@pytest.fixture(scope="module")
def engine_model():
    """The model exactly as the app loads it."""
    return patchslim.load_model(bundled.BUNDLED_NAME, device="auto", pretrained=bundled.CHECKPOINT_PATH.exists())


def test_same_rho_is_the_default_and_says_the_cost_differs(compare):
    assert compare.radio(key="compare_mode").value == "same ρ"
    assert not [s for s in compare.slider if s.key == "compare_budget"]
    assert any("same cost" in c.value for c in compare.caption)
    assert not [m for m in compare.markdown if "ρ needed" in m.value]


def test_same_cost_gives_every_method_the_rho_the_engine_finds(compare, engine_model):
    compare.radio(key="compare_mode").set_value("same cost").run()
    compare.slider(key="compare_budget").set_value(0.6).run()
    assert not compare.exception
    lines = [m.value for m in compare.markdown if m.value.startswith("ρ needed")]
    expected = []
    for method in patchslim.method_names():
        try:
            solution = patchslim.plan_for_budget(engine_model, method, 0.6)
        except patchslim.BudgetError:
            continue
        expected.append(f"ρ needed **{solution.keep_ratio:.3g}**")
    assert [line.split(" · ")[0] for line in lines] == expected
    for line in lines:  # every card costs the budget within 2 %
        share = float(line.split("(")[1].split(" of unslimmed")[0])
        assert abs(share / 0.6 - 1) <= 0.02, line
    assert any(s.value == "What each method keeps at 0.60 of the unslimmed GMACs" for s in compare.subheader)


def test_a_budget_a_method_cannot_meet_shows_what_it_can(compare):
    compare.radio(key="compare_mode").set_value("same cost").run()
    compare.slider(key="compare_budget").set_value(0.3).run()
    assert not compare.exception
    warnings = " ".join(w.value for w in compare.warning)
    assert "method 'tome' cannot meet the budget" in warnings and "0.500 to" in warnings
    assert len([m for m in compare.markdown if m.value.startswith("ρ needed")]) < len(patchslim.method_names())


def test_the_accuracy_vs_compute_chart_leads_and_marks_the_budget(compare):
    charts = compare.get("plotly_chart")
    assert charts, "no chart"
    first = charts[0].proto.spec
    assert "share of the unslimmed GMACs" in first and "budget 0." not in first
    compare.radio(key="compare_mode").set_value("same cost").run()
    compare.slider(key="compare_budget").set_value(0.7).run()
    first = compare.get("plotly_chart")[0].proto.spec
    assert "share of the unslimmed GMACs" in first and "budget 0.70" in first


def test_switching_back_restores_the_same_rho_cards(compare):
    compare.radio(key="compare_mode").set_value("same cost").run()
    compare.radio(key="compare_mode").set_value("same ρ").run()
    assert not compare.exception
    assert not [m for m in compare.markdown if m.value.startswith("ρ needed")]
    assert any(s.value.startswith("What each method keeps at ρ = ") for s in compare.subheader)
