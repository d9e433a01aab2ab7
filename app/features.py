"""The app's optional features: present or absent by what is installed, decided once when the app starts.

Every part of the engine the app draws (``patchslim.vis``, ``metrics``, ``explain.attention``, ``audit``) is part
of the package and imported directly: if it fails to import, that is a bug to see, not a feature to hide. The
one feature the app can run without is the Explain page's attributions: the engine imports captum only when an
attribution is asked for, so an installation without it (``pip install --no-deps``, a trimmed image) still runs
every other page. Whether it is there is looked up here once, without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec


@dataclass(frozen=True)
class Features:
    """What this installation can do beyond the core.

    Attributes:
        attributions: captum is installed (Integrated Gradients and occlusion on the Explain page).
    """

    attributions: bool


def detect() -> Features:
    """Looks the optional packages up (``importlib.util.find_spec``: found, not imported)."""
    return Features(attributions=find_spec("captum") is not None)


INSTALLED = detect()

MISSING_HELP = {
    "attributions": "Attributions need captum, which is not installed on this server: `pip install captum` "
                    "and restart the app.",
}
