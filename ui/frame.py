"""Every page runs inside the frame (`streamlit_app.py`: access gate, navigation, sidebar).

Streamlit runs a file of `pages/` on its own when the very first request after a server start
is a deep link (before `st.navigation` has ever been called on that server). `require()`, at
the top of every page, makes the access gate hold in that case too.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import streamlit as st

from ui import gate

_local = threading.local()  # each session's script runs in its own thread


@contextlib.contextmanager
def running() -> Iterator[None]:
    """Mark the page run by the frame as framed."""
    _local.in_frame = True
    try:
        yield
    finally:
        _local.in_frame = False


def require() -> None:
    """Stop the page unless the visitor passed the gate (run by the frame, or here if unframed)."""
    if getattr(_local, "in_frame", False):
        return
    st.set_page_config(page_title="Transfer Lab", layout="wide")
    if not gate.check():
        st.stop()
