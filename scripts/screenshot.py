"""Takes the README's screenshot of the app: a bundled model, one gallery image, a method and a keep ratio.

    .venv/bin/python scripts/screenshot.py [--model fashion-swin] [--method attention] [--steps-left 10]
        [--out docs/screenshot.png]

Starts ``streamlit run app/main.py`` on a free localhost port, drives Debian's Chromium with Playwright
(never Playwright's own browser download), and saves a PNG of the Explore page.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.local_server import LocalServer  # noqa: E402

CHROMIUM = os.environ.get("PATCHSLIM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _wait_idle(page, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    time.sleep(1.0)
    while time.time() < deadline:
        status = page.locator('[data-testid="stStatusWidget"]')
        if not (status.count() > 0 and "Running" in (status.first.inner_text() or "")):
            break
        time.sleep(0.3)
    time.sleep(1.0)


def _pick(page, label: str, text: str) -> None:
    box = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]', has_text=label).first
    box.locator("input").click()
    page.keyboard.type(text)
    page.keyboard.press("Enter")
    _wait_idle(page)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fashion-vit", help="the sidebar's model (typed into its picker)")
    parser.add_argument("--method", default="attention")
    parser.add_argument("--steps-left", type=int, default=0,
                        help="ArrowLeft presses on the keep-ratio slider (0.05 each) from its default")
    parser.add_argument("--width", type=int, default=1500)
    parser.add_argument("--height", type=int, default=1150)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshot.png")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    with LocalServer() as url:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(url)
            page.locator('[data-testid="stMetric"]', has_text="GMACs per image").wait_for(timeout=120_000)
            _wait_idle(page)
            _pick(page, "Model", args.model)
            _pick(page, "Method", args.method)
            if args.steps_left:
                thumb = page.locator('[data-testid="stSidebar"] [data-testid="stSlider"]',
                                     has_text="Keep ratio").locator('input[type="range"], [role="slider"]').first
                thumb.focus()
                for _ in range(args.steps_left):
                    page.keyboard.press("ArrowLeft")
                _wait_idle(page)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            browser.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
