"""The Demo's feedback inbox: photos filed with the right class, folded into a new dataset version."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.test_jobs import make_image_folder
from tlcore.data.feedback import NONE_OF_THESE, add_feedback, discard, fold_inbox, fold_plan, inbox
from tlcore.data.importer import import_dataset
from tlcore.data.manifest import load_manifest
from tlcore.errors import ImageRejected, InvalidInput


def _photo(colour) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(sum(colour))
    Image.fromarray(np.clip(np.array(colour) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)).save(
        buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def colours(tmp_path, store):
    return import_dataset(make_image_folder(tmp_path / "colours"), "colours", store=store).dataset


def test_filed_photos_fold_into_a_new_version_and_the_old_one_stays(store, colours):
    purple, teal = _photo((150, 40, 160)), _photo((30, 160, 160))
    add_feedback("colours", purple, "blue", colours.classes, run_id="run-1", predicted="red")
    add_feedback("colours", teal, "red", colours.classes)
    add_feedback("colours", teal, "blue", colours.classes)  # filed again: the latest label counts
    assert [(i.label, i.predicted) for i in inbox("colours")] == [("blue", "red"), ("blue", None)]

    result = fold_inbox("colours", store)
    v2 = result.dataset
    assert (v2.name, v2.version, v2.num_images) == ("colours", 2, colours.num_images + 2)
    fed = [e for e in load_manifest(v2.id) if e.source.startswith("train/blue/feedback-")]
    assert len(fed) == 2 and all(e.split == "train" for e in fed)
    old, new = load_manifest(colours.id), load_manifest(v2.id)
    assert len(old) == colours.num_images  # the first version is untouched
    assert {(e.sha256, e.split, e.label) for e in old} <= {(e.sha256, e.split, e.label) for e in new}
    assert inbox("colours") == []
    with pytest.raises(InvalidInput, match="has no labelled photo that is not already in colours v2"):
        fold_inbox("colours", store)


def test_bad_feedback_is_refused_in_a_sentence(store, colours):
    with pytest.raises(InvalidInput, match="must be one of the dataset's classes"):
        add_feedback("colours", _photo((1, 2, 3)), "green", colours.classes)
    with pytest.raises(ImageRejected):
        add_feedback("colours", b"<html>not a photo</html>", "red", colours.classes)
    assert inbox("colours") == []


def test_a_photo_already_in_the_dataset_stays_in_the_inbox(store, colours):
    entry = load_manifest(colours.id)[0]
    item = add_feedback("colours", entry.path.read_bytes(), "blue" if entry.label == "red" else "red",
                        colours.classes)
    assert fold_plan(colours.id).already_in == [item] and fold_plan(colours.id).added == []
    with pytest.raises(InvalidInput, match="not already in"):
        fold_inbox("colours", store)
    discard("colours", item.sha256)
    assert inbox("colours") == []


def test_confirming_correcting_and_none_of_these_are_told_apart_and_only_labels_fold(store, colours):
    red, blue, bottle = _photo((210, 30, 30)), _photo((20, 30, 220)), _photo((120, 120, 110))
    add_feedback("colours", red, "red", colours.classes, predicted="red")
    add_feedback("colours", blue, "blue", colours.classes, predicted="red")
    add_feedback("colours", bottle, NONE_OF_THESE, colours.classes, predicted="red")
    assert [i.answer for i in inbox("colours")] == ["confirmed", "corrected", "none of these"]
    filed = (next(iter(_inbox_files(store))).read_text()).splitlines()
    assert [json.loads(line)["answer"] for line in filed] == ["confirmed", "corrected", "none of these"]

    plan = fold_plan("colours", store)
    assert (plan.next_label, plan.added_per_class()) == ("colours v2", {"blue": 1, "red": 1})
    assert [i.answer for i in plan.not_in_any_class] == ["none of these"]
    v2 = fold_inbox("colours", store).dataset
    assert v2.num_images == colours.num_images + 2  # the bottle is not in the data
    assert [i.answer for i in inbox("colours")] == ["none of these"]  # kept as a record
    with pytest.raises(InvalidInput, match="no labelled photo"):
        fold_inbox("colours", store)


def _inbox_files(store):
    from tlcore.records import home

    return (home.subdir("feedback")).rglob("inbox.jsonl")
