"""Shared fixtures: every test gets its own empty data home."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(autouse=True)
def tlcore_home(tmp_path, monkeypatch) -> Path:
    """A fresh `$TLCORE_HOME` per test, so nothing a test writes leaks into another."""
    home = tmp_path / "tlcore_home"
    monkeypatch.setenv("TLCORE_HOME", str(home))
    return home


@pytest.fixture
def store(tlcore_home):
    from tlcore.store import Store

    return Store()
