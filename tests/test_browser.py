"""One real-browser test: Chromium (Debian's) driven by Playwright against ``streamlit run app/main.py``.

The suite starts the app on a free localhost port, uploads a photo, picks a method, moves rho, and checks
that the overlay, the predictions and the GMAC readout change. Screenshots go to ``tests/artifacts/``.
Playwright's own browser download is never used: Chromium comes from the system (``/usr/bin/chromium``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = Path(os.environ.get("PATCHSLIM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]
sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright


@pytest.fixture
def photo(tmp_path) -> Path:
    """scikit-image's sample photo ``chelsea`` (Stefan van der Walt, CC0) as a PNG file to upload."""
    from PIL import Image
    from skimage import data

    path = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(path)
    return path


@pytest.fixture(scope="module")
def server():
    """``streamlit run app/main.py`` on a free port; yields its URL, stops it afterwards."""
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from app.local_server import LocalServer

    try:
        with LocalServer(ARTIFACTS_LOG(), timeout=60) as url:
            yield url
    except RuntimeError as exc:  # the server died or never answered: the log in tests/artifacts says why
        pytest.fail(str(exc))


def ARTIFACTS_LOG() -> Path:  # noqa: N802 - a path constant made on demand
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")  # screenshots and logs are never committed
    return ARTIFACTS / "streamlit.log"


def _metric(page, label: str) -> str:
    card = page.locator('[data-testid="stMetric"]', has_text=label).first
    return card.locator('[data-testid="stMetricValue"]').inner_text()


def _overlay_src(page) -> str:
    return page.locator('[data-testid="stMain"] [data-testid="stImage"] img').first.get_attribute("src")


def _prediction_banner(page) -> str:
    return page.locator('[data-testid="stAlert"]', has_text="prediction").or_(
        page.locator('[data-testid="stAlert"]', has_text="Label flipped")).first.inner_text()


def _state(page) -> tuple[str, str, str]:
    return _overlay_src(page), _prediction_banner(page), _metric(page, "GMACs per image")


def _wait_for_change(page, before: tuple[str, str, str], what: str, timeout: float = 60.0) -> tuple:
    """Polls until the overlay and the GMAC readout changed and the app finished its rerun."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            now = _state(page)
        except Exception:  # elements are replaced while the page reruns
            now = None
        if now is not None and now[0] != before[0] and now[2] != before[2] and not _running(page):
            time.sleep(0.5)  # let the last elements of the rerun arrive
            return _state(page)
        time.sleep(0.25)
    raise AssertionError(f"the overlay and the GMAC readout did not both change after {what} "
                         f"(GMACs still {before[2]})")


def _running(page) -> bool:
    status = page.locator('[data-testid="stStatusWidget"]')
    return status.count() > 0 and "Running" in (status.first.inner_text() or "")


def _wait_idle(page, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    time.sleep(0.5)
    while _running(page) and time.time() < deadline:
        time.sleep(0.25)


def test_upload_pick_method_move_rho_in_a_real_browser(server, photo):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1400})
        started = time.time()
        page.goto(server)
        page.locator('[data-testid="stMetric"]', has_text="GMACs per image").wait_for(timeout=60_000)
        first_screen = time.time() - started
        _wait_idle(page)
        page.screenshot(path=str(ARTIFACTS / "01_first_screen.png"))

        # upload the photo
        page.get_by_text("Upload", exact=True).first.click()
        page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(photo))
        page.get_by_text("Same prediction").or_(page.get_by_text("Label flipped")).first.wait_for(timeout=60_000)
        _wait_idle(page)
        page.locator('[data-testid="stMain"] [data-testid="stImage"] img').first.wait_for(timeout=60_000)
        uploaded = _state(page)
        page.screenshot(path=str(ARTIFACTS / "02_uploaded.png"))

        # pick a method in the sidebar
        method_box = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]', has_text="Method")
        method_box.locator("input").click()
        page.keyboard.type("grid")
        page.keyboard.press("Enter")
        picked = _wait_for_change(page, uploaded, "picking the method")
        # the rerun may still be drawing on a busy machine: wait for the method's text rather than read it once
        page.locator('[data-testid="stMain"]').get_by_text("How grid works").first.wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "03_method.png"))

        # move rho from 0.50 down to 0.20
        thumb = page.locator('[data-testid="stSidebar"] [data-testid="stSlider"]', has_text="Keep ratio").locator(
            'input[type="range"], [role="slider"]').first
        thumb.focus()
        for _ in range(6):
            page.keyboard.press("ArrowLeft")
        moved = _wait_for_change(page, picked, "moving rho")
        slider_text = page.locator('[data-testid="stSidebar"] [data-testid="stSlider"]', has_text="Keep ratio")
        assert slider_text.locator('[data-testid="stSliderThumbValue"]').inner_text().strip() == "0.20"
        page.screenshot(path=str(ARTIFACTS / "04_rho.png"))
        browser.close()

    for before, after, step in ((uploaded, picked, "method"), (picked, moved, "rho")):
        assert after[0] != before[0], f"the overlay did not change after the {step} change"
        assert after[2] != before[2], f"the GMAC readout did not change after the {step} change"
    assert moved[1] != uploaded[1], "the predictions did not change"
    assert float(moved[2]) < float(picked[2]), "fewer tokens must cost fewer GMACs"
    # wall-clock times are measured by benchmarks/app_latency.py, not asserted here (this machine is shared)
    print(f"first screen after {first_screen:.1f} s")
