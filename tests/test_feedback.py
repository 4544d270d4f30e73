"""The Demo's feedback inbox: photos filed with the right class, folded into a new dataset version."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.test_jobs import make_image_folder
from tlcore.data.feedback import add_feedback, already_in, discard, fold_inbox, inbox
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
    with pytest.raises(InvalidInput, match="has no photo that is not already in colours v2"):
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
    assert already_in(colours.id, inbox("colours")) == [item]
    with pytest.raises(InvalidInput, match="not already in"):
        fold_inbox("colours", store)
    discard("colours", item.sha256)
    assert inbox("colours") == []
