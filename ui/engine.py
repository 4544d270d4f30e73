"""Reaching the engine from a page: import a `tlcore` module or say plainly that it is missing.

Pages import engine modules through `need()` so a partial install shows one sentence on the
page instead of a traceback, and so heavy modules are imported only by the pages using them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import streamlit as st


def need(module: str) -> ModuleType:
    """Import `tlcore.<module>`; if it cannot be imported, say so on the page and stop it."""
    try:
        return importlib.import_module(f"tlcore.{module}")
    except ImportError as exc:
        st.error(f"This part of the engine is not available: `tlcore.{module}` could not be "
                 f"imported ({exc}). Install the full package (`pip install -r requirements.txt`).")
        st.stop()
        raise  # unreachable; st.stop() raises


def maybe(module: str) -> ModuleType | None:
    """Import `tlcore.<module>` or return None (for optional bits such as the sidebar)."""
    try:
        return importlib.import_module(f"tlcore.{module}")
    except ImportError:
        return None
