"""patchslim app entry point: ``streamlit run app/main.py``.

This file is the frame around every page: page config, the navigation, and the shared sidebar (model,
device, precision, method and its options, rho). Each page lives in ``app/app_pages/`` and reads like a
description of what a person sees.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `streamlit run app/main.py` puts only app/ on the path
    sys.path.insert(0, str(REPO_ROOT))

import streamlit as st  # noqa: E402

from app import sidebar, state, views  # noqa: E402

st.set_page_config(page_title="patchslim: patch slimming, live", page_icon=":material/content_cut:", layout="wide",
                   initial_sidebar_state="expanded")
state.init_session()
views.page_style()

PAGES = Path(__file__).resolve().parent / "app_pages"
explore = st.Page(PAGES / "explore.py", title="Explore one image", icon=":material/search:", default=True)
page = st.navigation([
    explore,
    st.Page(PAGES / "compare.py", title="Compare methods", icon=":material/compare:"),
    st.Page(PAGES / "explain.py", title="Explain", icon=":material/lightbulb:"),
    st.Page(PAGES / "benchmark.py", title="Benchmark", icon=":material/timer:"),
    st.Page(PAGES / "audit.py", title="Audit", icon=":material/balance:"),
])
settings = sidebar.draw(page_draws_keep_ratio=page.url_path == explore.url_path)  # Explore: in its fragment
sidebar.notices(settings)
page.run()
