"""Writing plotly figures as PNG files: kaleido (with the system's Chromium) when it works, else a fallback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def write_png(fig, path: str | Path, fallback: Callable[[Path], None] | None = None,
              scale: float = 2) -> tuple[str | None, Exception | None]:
    """Writes ``fig`` to ``path`` with kaleido; when kaleido cannot (no Chromium, kaleido missing), calls
    ``fallback(path)`` (e.g. a matplotlib drawing of the same data) if given.

    Returns:
        (``"kaleido"``, ``"fallback"`` or None when nothing was written; kaleido's exception or None).
    """
    path = Path(path)
    if not os.environ.get("BROWSER_PATH"):  # kaleido looks for Chrome; point it at the system's Chromium
        for candidate in BROWSERS:
            if shutil.which(candidate):
                os.environ["BROWSER_PATH"] = candidate
                break
    try:
        fig.write_image(str(path), scale=scale)
        return "kaleido", None
    except Exception as exc:  # kaleido's failures are of many types; the caller reports it
        if fallback is None:
            return None, exc
        fallback(path)
        return "fallback", exc
