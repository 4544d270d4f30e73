"""Faults while saving: a full disk fails the save clearly and keeps the previous file readable."""

from __future__ import annotations

import errno

import pytest

from tlcore.records.atomic import write_atomically


def _full_disk(tmp):
    tmp.write_bytes(b"half a model")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_save_keeps_the_previous_file_and_says_what_to_do(tmp_path):
    model = tmp_path / "model.keras"
    write_atomically(model, lambda tmp: tmp.write_bytes(b"best model so far"))

    with pytest.raises(OSError) as caught:
        write_atomically(model, _full_disk)

    assert caught.value.errno == errno.ENOSPC
    assert "Free disk space" in str(caught.value) and "previous file is kept" in str(caught.value)
    assert model.read_bytes() == b"best model so far"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]
