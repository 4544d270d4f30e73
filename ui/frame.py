"""The frame every page runs in: the access gate, the navigation and the shared sidebar.

`streamlit_app.py` runs it. Until `st.navigation` has been called once in a server process,
Streamlit treats the `pages/` folder as an old-style multipage app: it runs the requested file
of `pages/` without the entry script, under an automatic page list ("streamlit app", "compare",
…). That is what a deep link (`/compare?runs=…`) as the first request after a server start gets.
`require()`, at the top of every page, then runs the frame itself, with the page inside it, so
the first visitor gets the gate, navigation, titles and sidebar of every later visit; the
frame's `st.navigation` also ends the automatic page list for the whole server.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import streamlit as st

from ui import gate, sidebar, train_form

_local = threading.local()  # each session's script runs in its own thread


def _pages() -> list:
    # New `st.Page` objects on every run: `st.navigation` marks the one it returns as runnable.
    return [
        st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
        st.Page("pages/datasets.py", title="Datasets", icon=":material/photo_library:"),
        st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
        st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
        st.Page("pages/models.py", title="Models", icon=":material/verified:"),
        st.Page("pages/errors.py", title="Errors", icon=":material/error:"),
        st.Page("pages/demo.py", title="Demo", icon=":material/photo_camera:"),
        st.Page("pages/export.py", title="Export", icon=":material/download:"),
    ]


@contextlib.contextmanager
def _running() -> Iterator[None]:
    """Mark the page run by the frame as framed."""
    _local.in_frame = True
    try:
        yield
    finally:
        _local.in_frame = False


def run() -> None:
    """Run the frame and, inside it, the page the visitor asked for (URL path and query kept)."""
    st.set_page_config(page_title="Transfer Lab", page_icon=":material/model_training:", layout="wide")
    train_form.keep_values()  # before st.navigation, which drops the widget state of the page left
    # Before the gate: a visitor who is not in gets no page list, and the gate's widgets get the
    # same ids whether or not Streamlit ran a page file first (ids drawn before st.navigation
    # differ), so a password typed on a deep link is not lost on submit.
    page = st.navigation(_pages(), position="sidebar" if gate.signed_in() else "hidden")
    if not gate.check():
        st.stop()
    sidebar.draw()
    with _running():
        page.run()


def require() -> None:
    """Let a page draw only inside the frame: run on its own, it runs the frame (which runs the
    page again, framed) and stops there."""
    if getattr(_local, "in_frame", False):
        return
    # Not st.rerun(): AppTest runs every switched page like this, and a rerun drops its clicks.
    run()
    st.stop()
