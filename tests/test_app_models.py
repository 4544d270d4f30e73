"""AppTest: the Models page — register, open a review, approve as the typed reviewer, promote, the audit trail,
a refusal shown as its sentence, the report's download."""

from __future__ import annotations

import app_seed as seed
import pytest

from tlcore.deploy import model_registry
from tlcore.records.store import ModelTables


@pytest.fixture(autouse=True)
def _no_device_probe(monkeypatch):
    monkeypatch.setenv("TLAB_DEVICE_PROBE", "off")


def test_no_model_yet_offers_to_register_one(store):
    ds = seed.dataset(store)
    alpha = seed.run(store, ds, "alpha", accuracy=0.7)
    at = seed.app("pages/models.py").run()
    assert not at.exception
    at.text_input(key="models.new_name").input("insects")
    at.button[0].click()  # the form's Register, before a name is typed
    at.run()
    assert "Type your name in the sidebar first" in seed.texts(at)
    at.text_input(key="models.reviewer").input("ana").run()
    at.text_input(key="models.new_name").input("insects")
    at.selectbox(key="models.new_run").select(alpha.id)
    at.button[0].click()
    at.run()
    assert not at.exception
    assert [v.run_id for v in ModelTables(store).model_versions("insects")] == [alpha.id]


def test_review_approve_promote_and_the_audit_trail(store):
    ds = seed.dataset(store)
    alpha = seed.run(store, ds, "alpha", accuracy=0.7)
    model_registry.register("insects", alpha.id, "ana", store)
    at = seed.app("pages/models.py").run()
    at.text_input(key="models.reviewer").input("ana").run()
    at.selectbox(key="models.candidate").select(alpha.id)
    next(b for b in at.button if b.label == "Open a review against production").click()
    at.run()
    assert not at.exception
    assert "Gate passed: No evaluation image is among the candidate's training images." in seed.texts(at)
    at.button(key="models.promote").click().run()
    assert "is open, not approved, so production stays" in seed.texts(at)
    assert model_registry.registry(store).model_aliases("insects") == {"candidate": 1}

    at.text_area(key="models.comment").input("fine by me")
    at.button(key="models.approve").click().run()
    assert "**Approved** by ana" in seed.texts(at)
    at.button(key="models.promote").click().run()
    assert not at.exception
    assert model_registry.version_of("insects", "production", store).run_id == alpha.id
    audit = seed.table(at, "action")
    assert list(audit["action"]) == ["set", "promote"] and list(audit["who"]) == ["ana", "ana"]
    assert at.get("download_button")
