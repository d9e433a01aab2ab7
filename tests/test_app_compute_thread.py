"""The app's compute thread: the interactive pages' PyTorch work runs on one long-lived thread (app.compute)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

import patchslim  # noqa: E402
from app import compute  # noqa: E402
from patchslim import bundled  # noqa: E402

MAIN = Path(__file__).resolve().parent.parent / "app" / "main.py"


def test_a_function_on_the_compute_thread_runs_there_once_and_inline_when_called_from_there():
    @compute.on_compute_thread
    def where() -> str:
        return threading.current_thread().name

    @compute.on_compute_thread
    def nested() -> tuple[str, str]:
        return threading.current_thread().name, where()  # no deadlock: already on the thread

    first, second = where(), where()
    assert first.startswith(compute.COMPUTE_THREAD) and first == second  # one long-lived thread
    assert nested() == (first, first)
    seen = []
    callers = [threading.Thread(target=lambda: seen.append(where())) for _ in range(3)]  # as script threads do
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert seen == [first] * 3


def test_an_error_on_the_compute_thread_reaches_the_caller_as_it_was_raised():
    @compute.on_compute_thread
    def refuse() -> None:
        raise patchslim.PlanError("no such block")

    with pytest.raises(patchslim.PlanError, match="no such block"):
        refuse()


def test_the_explore_page_runs_its_forwards_and_model_load_on_the_compute_thread(monkeypatch):
    threads = []
    forward = patchslim.run

    def recorded(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return forward(*args, **kwargs)

    monkeypatch.setattr(patchslim, "run", recorded)
    import streamlit as st

    st.cache_resource.clear()  # forwards cached by earlier tests in this process would run nothing here
    st.cache_data.clear()
    at = AppTest.from_file(str(MAIN), default_timeout=120).run()
    at.selectbox(key="model_name").set_value(bundled.BUNDLED_NAME).run()
    assert not at.exception
    at.selectbox(key="method").set_value("tome").run()
    assert not at.exception
    assert threads and all(name.startswith(compute.COMPUTE_THREAD) for name in threads), set(threads)
