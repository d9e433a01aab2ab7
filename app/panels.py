"""One panel of a page: what goes wrong inside it is shown inside it, and the rest of the page still renders.

A page is a list of panels (the readouts row, the overlay, the top-5, the attention maps, ...). Each is drawn as::

    with panel("Attention maps"):
        pictures = compute.attention_pictures(...)
        views.attention_pair(pictures)

An exception raised in the block is caught at the end of the block and shown in the panel's place with its
message (``st.error``), and logged on the server with its traceback (logger ``patchslim.app``); the page goes on
with its next panel. A :class:`~patchslim.errors.PatchslimError` is a message for the person (a plan that does
not fit the model, a bad file): it is shown as it is and logged without a traceback. Streamlit's own control
flow (``st.stop()``, ``st.rerun()``) is not an ``Exception`` and passes through untouched.
"""

from __future__ import annotations

import logging

import streamlit as st

from patchslim.errors import PatchslimError

log = logging.getLogger("patchslim.app")
if not log.handlers:  # the server's console shows panel failures even when nobody configured logging
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)


class panel:
    """A context manager drawing one panel in its own container; errors end the panel, not the page.

    Args:
        title: what the panel shows, as the person knows it ("Top-5 before and after"); starts the error
            message.

    Attributes:
        error: the exception that ended the panel, or None when it was drawn completely.
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self.error: Exception | None = None
        self._box = None

    def __enter__(self) -> "panel":
        self._box = st.container()
        self._box.__enter__()
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        self._box.__exit__(None, None, None)
        if exc is None or not isinstance(exc, Exception):
            return False  # finished, or st.stop() / st.rerun(): Streamlit handles those
        self.error = exc
        if isinstance(exc, PatchslimError):
            log.warning("%s: %s", self.title, exc)
            self._box.error(f"**{self.title}**: {exc}", icon=":material/error:")
        else:
            log.error("%s failed", self.title, exc_info=(kind, exc, traceback))
            self._box.error(f"**{self.title}** could not be shown: {type(exc).__name__}: {exc}",
                            icon=":material/error:")
        return True

    @property
    def failed(self) -> bool:
        """Whether the panel ended with an error."""
        return self.error is not None
