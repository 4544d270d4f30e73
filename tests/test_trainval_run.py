"""A run on train/ and val/ folders only has no fitted temperature and no threshold: it still serves,
predicts, exports its card and bundle and shows in `runs show`, with unscaled probabilities, and says so
(one shared run, see `trainval_run`; the Demo and Export pages are in test_app_demo/test_app_export)."""

from __future__ import annotations

import json
import zipfile

import pytest
import requests

from tests.test_serve import serving
from tlcore.cli import main
from tlcore.records.run_folder import RunFolder

REASON = "no test split"  # in the reason training wrote into calibration.json


@pytest.fixture(autouse=True)
def tlcore_home(trainval_run, monkeypatch):
    monkeypatch.setenv("TLCORE_HOME", str(trainval_run.home))
    return trainval_run.home


def _first_eval_image(run_id: str) -> dict:
    """The first evaluation (val) image with the raw softmax confidence evaluation gave it."""
    return json.loads(RunFolder(run_id).predictions.read_text().splitlines()[0])


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_run_says_it_has_no_temperature_and_why(trainval_run, capsys):
    folder = RunFolder(trainval_run.run_id)
    written = json.loads(folder.calibration_file.read_text())
    assert written["temperature"] is None and REASON in written["reason"]
    assert not folder.threshold_file.exists()

    assert main(["runs", "show", trainval_run.run_id, "--json"]) == 0
    calibration = _last_json(capsys)["calibration"]
    assert calibration["temperature"] is None and REASON in calibration["reason"]
    assert calibration["probabilities"] == "unscaled softmax"
    assert main(["runs", "show", trainval_run.run_id]) == 0
    assert "not calibrated, probabilities are the unscaled softmax: The dataset has no test split" in \
        capsys.readouterr().out


def test_predict_answers_with_the_unscaled_probabilities(trainval_run, capsys):
    row = _first_eval_image(trainval_run.run_id)
    assert main(["predict", "--run", trainval_run.run_id, row["path"], "--json"]) == 0
    [pred] = _last_json(capsys)["predictions"]
    assert pred["label"] == row["pred"] and pred["abstained"] is False
    assert pred["confidence"] == pytest.approx(row["confidence"], abs=1e-5)


def test_it_serves_over_http_and_its_card_says_the_probabilities_are_unscaled(trainval_run):
    row = _first_eval_image(trainval_run.run_id)
    with serving(trainval_run.run_id) as url, open(row["path"], "rb") as f:
        reply = requests.post(f"{url}/v1/predict", files={"file": ("val.png", f, "image/png")}, timeout=60)
        card = requests.get(f"{url}/v1/model", timeout=10).json()
    assert reply.status_code == 200, reply.text
    [pred] = reply.json()["predictions"]
    assert pred["label"] == row["pred"] and pred["abstained"] is False
    assert pred["probability"] == pytest.approx(row["confidence"], abs=1e-5)
    assert card["probabilities"] == "unscaled softmax" and card["threshold"] is None
    assert card["calibration"]["temperature"] is None and REASON in card["calibration"]["reason"]
    assert "It has no abstention threshold: every photo gets a label, however unsure." in card["limits"]


def test_card_and_bundle_export_and_say_there_is_no_temperature(trainval_run, tmp_path, capsys):
    assert main(["export", "--run", trainval_run.run_id, "--format", "card", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "model_card.md").read_text()
    assert "- Calibration: none (unscaled softmax probabilities). The dataset has no test split" in md
    assert "- Threshold: none (never abstains)." in md

    assert main(["export", "--run", trainval_run.run_id, "--format", "bundle", "--out", str(tmp_path),
                 "--json"]) == 0
    with zipfile.ZipFile(_last_json(capsys)["path"]) as zf:
        names = set(zf.namelist())
        calibration = json.loads(zf.read("calibration.json"))
        card = json.loads(zf.read("model_card.json"))
    assert {"model.keras", "model.onnx", "labels.json", "model_card.md", "calibration.json"} <= names
    assert "threshold.json" not in names
    assert calibration["temperature"] is None and REASON in calibration["reason"]
    assert card["probabilities"] == "unscaled softmax"
