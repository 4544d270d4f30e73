"""AppTest: the Datasets page — imports and what it says about bad input."""

from __future__ import annotations

import io
import zipfile

import app_seed as seed
import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def _no_device_probe(monkeypatch):
    monkeypatch.setenv("TLAB_DEVICE_PROBE", "off")
    monkeypatch.delenv("TLCORE_DATA_ROOTS", raising=False)


_counter = iter(range(10**6))


def _png(color, fmt: str = "PNG") -> bytes:
    """A distinct 64x64 noisy image of `color` (each call differs, so none is a duplicate)."""
    buf = io.BytesIO()
    rng = np.random.default_rng(next(_counter))
    arr = (rng.integers(0, 60, (64, 64, 3)) + np.array(color)).clip(0, 255).astype("uint8")
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_builtin_import_shows_report_balance_and_samples(store):
    at = seed.app("pages/datasets.py").run()
    assert not at.exception
    assert "No datasets yet" in seed.texts(at)
    at.radio(key="datasets.builtin").set_value("textures")
    at.button(key="datasets.import_builtin").click().run()
    assert not at.exception
    text = seed.texts(at)
    assert "Imported **textures v1**" in text
    assert "Classes: 3" in text
    assert len(at.image) >= 3  # one sample row per class
    assert len(store.list_datasets()) == 1


def test_zip_upload_reports_skipped_files(store):
    files = {f"{c}/{i}.png": _png(color) for c, color in (("red", (200, 0, 0)), ("blue", (0, 0, 200)))
             for i in range(4)}
    files["red/broken.jpg"] = b"\xff\xd8\xff\xe0 truncated"
    at = seed.app("pages/datasets.py").run()
    at.file_uploader(key="datasets.zip").set_value(("colours.zip", _zip(files), "application/zip")).run()
    at.button(key="datasets.import_zip").click().run()
    assert not at.exception
    text = seed.texts(at)
    assert "Imported **colours v1**" in text and "1 file(s) skipped" in text
    skipped = seed.table(at, "reason")
    assert any("broken.jpg" in f for f in skipped["file"])


def test_corrupt_upload_is_answered_in_words(store):
    at = seed.app("pages/datasets.py").run()
    at.file_uploader(key="datasets.zip").set_value(("photos.zip", b"this is not a zip", "application/zip")).run()
    at.button(key="datasets.import_zip").click().run()
    assert not at.exception
    [error] = at.error
    assert "Could not import 'photos.zip'" in error.value and "not a zip" in error.value
    assert "Traceback" not in seed.texts(at)
    assert store.list_datasets() == []


def test_zip_with_one_class_is_refused_with_a_reason(store):
    files = {f"cats/{i}.png": _png((100, 50 + i * 30, 0)) for i in range(3)}
    at = seed.app("pages/datasets.py").run()
    at.file_uploader(key="datasets.zip").set_value(("cats.zip", _zip(files), "application/zip")).run()
    at.button(key="datasets.import_zip").click().run()
    assert not at.exception
    [error] = at.error
    assert "only one class" in error.value and "two" in error.value


def test_folder_outside_the_roots_is_refused(store, tmp_path, monkeypatch):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    monkeypatch.setenv("TLCORE_DATA_ROOTS", str(allowed))
    at = seed.app("pages/datasets.py").run()
    assert str(allowed) in seed.texts(at)
    at.text_input(key="datasets.folder").input("/etc").run()
    at.button(key="datasets.import_folder").click().run()
    assert not at.exception
    [error] = at.error
    assert "outside the folders open for import" in error.value
    at.text_input(key="datasets.folder").input(str(allowed / ".." / "..")).run()
    at.button(key="datasets.import_folder").click().run()
    assert "outside the folders open for import" in at.error[0].value


def test_folder_under_the_roots_imports(store, tmp_path, monkeypatch):
    root = tmp_path / "images"
    for c, color in (("red", (200, 0, 0)), ("green", (0, 200, 0))):
        (root / "shapes" / c).mkdir(parents=True)
        for i in range(3):
            (root / "shapes" / c / f"{i}.png").write_bytes(_png(color))
    monkeypatch.setenv("TLCORE_DATA_ROOTS", str(root))
    at = seed.app("pages/datasets.py").run()
    at.text_input(key="datasets.folder").input(str(root / "shapes")).run()
    at.button(key="datasets.import_folder").click().run()
    assert not at.exception
    assert "Imported **shapes v1**" in seed.texts(at)


def test_camera_snapshots_build_a_dataset(store):
    at = seed.app("pages/datasets.py").run()
    for label, color in (("mug", (150, 80, 20)), ("pen", (20, 20, 160))):
        for i in range(3):
            at.text_input(key="datasets.cam_class").input(label)
            at.camera_input(key="datasets.camera").set_value(
                ("snap.jpg", _png(tuple(c + 10 * i for c in color), "JPEG"), "image/jpeg"))
            at.run()
            at.button(key="datasets.cam_add").click().run()
    assert "**mug**: 3" in seed.texts(at)
    at.button(key="datasets.cam_build").click().run()
    assert not at.exception
    assert "Imported **camera v1**" in seed.texts(at)


def test_catalog_offline_says_so(store, monkeypatch):
    from tlcore.data import builtin

    def offline(*args, **kwargs):
        raise builtin.DatasetDownloadError("Could not reach www.cs.toronto.edu: this server has no internet.")

    monkeypatch.setattr(builtin, "download_catalog", offline)
    at = seed.app("pages/datasets.py").run()
    at.button(key="datasets.download").click().run()
    assert not at.exception
    assert "no internet" in at.error[0].value


def test_the_feedback_inbox_shows_what_folding_adds_and_folds_only_labelled_photos(store, monkeypatch):
    import io

    import numpy as np
    from PIL import Image

    from tlcore.data.feedback import NONE_OF_THESE, add_feedback, inbox
    from ui import format as fmt

    # The dataset selector's labels say "created N s ago": fixed, so the widget keeps its value across reruns.
    monkeypatch.setattr(fmt, "ago", lambda ts, now=None: "just now")
    ds = seed.dataset(store)
    for colour, label, said in (((90, 30, 200), "wasps", "bees"), ((30, 200, 90), "bees", "bees"),
                                ((128, 128, 120), NONE_OF_THESE, "ants")):
        buf = io.BytesIO()
        Image.fromarray(np.full((48, 48, 3), colour, np.uint8)).save(buf, "PNG")
        add_feedback(ds.name, buf.getvalue(), label, ds.classes, predicted=said)
    at = seed.app("pages/datasets.py").run()
    assert not at.exception, at.exception
    text = seed.texts(at)
    assert "3 photo(s) filed from the Demo for insects" in text
    # Before folding: what it adds per class, with the photos; the "none of these" photo apart.
    assert "**Folding adds 2 photo(s) to train:** bees +1, wasps +1" in text
    assert "1 photo(s) filed as none of these classes: kept here as a record, never added to the data." in text
    captions = [c for image in at.image for c in image.captions]
    assert {"wasps (corrected; said bees)", "bees (confirmed; said bees)",
            "none of these (said ants)"} <= set(captions)
    assert at.button(key="datasets.fold").label == "Fold 2 photo(s) into insects v2"
    at.button(key="datasets.fold").click().run()
    assert not at.exception, at.exception
    assert "Imported **insects v2** from the feedback inbox of insects" in at.success[0].value
    v2 = store.get_dataset("insects")
    assert v2.version == 2 and v2.num_images == ds.num_images + 2
    assert at.selectbox(key="datasets.selected").value == v2.id
    assert [i.answer for i in inbox("insects")] == ["none of these"]
    assert "Folding would add nothing" in seed.texts(at) and at.button(key="datasets.fold").disabled


def _saved_audit(ds):
    """An audit of the seed dataset as `audit_dataset` saves it: one finding of each kind."""
    from tlcore.data.manifest import load_manifest
    from tlcore.evaluate import audit
    from tlcore.records.atomic import write_json_atomically

    report = audit.AuditReport(
        dataset_id=ds.id, dataset=ds.label, backbone="efficientnet_lite0", image_size=224, images=12,
        label_issues=[audit.LabelIssue("ants/ants_0.png", "train", "ants", "bees", 0.08)],
        near_duplicates=[audit.NearDuplicate("bees/bees_3.png", "bees/bees_0.png", 0.97, ("test", "train"))],
        outliers=[audit.Outlier("wasps/wasps_1.png", "train", "wasps", 0.2)],
        class_balance=audit.class_balance(ds),
        embedding_map=[audit.MapPoint(e.source, e.split, e.label, float(i), float(i % 3))
                       for i, e in enumerate(load_manifest(ds.id))],
        timings={"total_s": 1.5})
    write_json_atomically(audit.audit_path(ds.id, "efficientnet_lite0"), report.to_dict())


def test_audit_view_fixes_in_bulk_into_a_new_version_then_retrains_and_compares(store):
    from tlcore.data.manifest import load_manifest

    ds = seed.dataset(store)
    original = seed.run(store, ds, "lite0-insects")
    _saved_audit(ds)
    at = seed.app("pages/datasets.py").run()
    assert not at.exception
    text = seed.texts(at)
    assert "Likely label errors: 1" in text and "Near-duplicate pairs (across splits): 1 (1)" in text
    assert "Outliers: 1" in text

    at.selectbox(key="datasets.audit.labels.bulk").set_value("relabel").run()
    at.selectbox(key="datasets.audit.duplicates.bulk").set_value("exclude").run()
    at.text_input(key="datasets.audit.reason").set_value("ant photo filed wrongly; leaked copy").run()
    at.button(key="datasets.audit.apply").click().run()
    assert not at.exception
    fixed = store.get_dataset("insects@2")
    assert "Created **insects v2** from insects v1: 2 change(s)" in seed.texts(at)
    manifest = {e.source: e.label for e in load_manifest(fixed.id)}
    assert manifest["ants/ants_0.png"] == "bees" and "bees/bees_0.png" not in manifest
    assert len(load_manifest(ds.id)) == 12  # the audited version is untouched
    assert "Fixed from **insects v1**" in seed.texts(at) and "leaked copy" in seed.texts(at)

    at.button(key="datasets.audit.retrain").click().run()
    queued = [r for r in store.list_runs() if r.dataset_id == fixed.id]
    assert len(queued) == 1 and queued[0].config["head_epochs"] == original.config["head_epochs"]
    seed.run(store, fixed, "lite0-insects-fixed", accuracy=0.9)
    at.run()
    assert not at.exception
    assert "Before / after** on the 11 images both runs evaluated" in seed.texts(at)


def test_audit_of_a_dataset_too_small_for_k_folds_says_why(store):
    seed.dataset(store, "tiny", per_class=2)
    at = seed.app("pages/datasets.py").run()
    at.button(key="datasets.audit.run").click().run()
    assert not at.exception
    assert "Could not audit tiny v1: Class 'ants' of tiny v1 has 2 image(s)" in seed.texts(at)


def test_the_audit_runs_under_the_dashboard_device_policy(store, monkeypatch):
    from tlcore.evaluate import audit
    from tlcore.train import devices

    monkeypatch.setattr(devices, "_declared_roles", [])
    monkeypatch.setattr(devices, "_policy", "dashboard: (this test applies nothing)")
    seen = []
    # The audit itself is tested in test_audit.py; here only what it runs under.
    monkeypatch.setattr(audit, "audit_dataset", lambda dataset_id, store: seen.append(devices.declared_roles()))
    seed.dataset(store)
    at = seed.app("pages/datasets.py").run()
    at.button(key="datasets.audit.run").click().run()
    assert not at.exception
    assert seen == [("dashboard",)]
