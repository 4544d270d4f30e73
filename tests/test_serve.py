"""The HTTP endpoint: a real uvicorn server on a free port of 127.0.0.1, serving one small trained run."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from tests.test_data_images import make_bomb_png
from tlcore.evaluate.operating_point import read_operating_point
from tlcore.records.run_folder import RunFolder

TOKEN = "s3cret-token"


@pytest.fixture(autouse=True)
def tlcore_home(trained_run, monkeypatch):
    monkeypatch.setenv("TLCORE_HOME", str(trained_run.home))
    return trained_run.home


@contextlib.contextmanager
def serving(run_id: str | None, token: str | None = None, **app_options):
    """A uvicorn server for `run_id` (or `model=NAME[@ALIAS]`) on a free port of 127.0.0.1; yields its base URL."""
    import uvicorn

    from tlcore.deploy.serve import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(run_id, token=token, **app_options), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            thread.join(0.05)
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def server(trained_run):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TLCORE_HOME", str(trained_run.home))
        with serving(trained_run.run_id, token=TOKEN) as url:
            yield url


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _eval_rows(run_id):
    from tlcore.evaluate.evaluation import read_predictions

    return read_predictions(RunFolder(run_id).predictions)


def _post(url, files, headers=AUTH, **params):
    return requests.post(f"{url}/v1/predict", files=files, headers=headers, params=params, timeout=60)


def test_predict_answers_like_evaluation_for_one_or_several_images(server, trained_run):
    rows = _eval_rows(trained_run.run_id)
    first = rows.iloc[0]
    with open(first["path"], "rb") as f:
        reply = _post(server, {"file": ("first.png", f, "image/png")})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["run"] == trained_run.run_id
    (pred,) = body["predictions"]
    # predictions.jsonl holds the raw softmax (both classes); the endpoint answers with the run's temperature.
    point = read_operating_point(RunFolder(trained_run.run_id))
    calibrated = point.calibrate(np.array([p for _, p in first["topk"]]))
    assert pred["file"] == "first.png" and pred["label"] == first["pred"]
    assert pred["abstained"] is point.abstains(calibrated[0])
    assert pred["probability"] == pytest.approx(calibrated[0], abs=1e-5)
    assert [t["label"] for t in pred["top_k"]] == [label for label, _ in first["topk"]]

    several = [("files", (f"{i}.png", open(p, "rb").read(), "image/png")) for i, p in enumerate(rows["path"])]
    reply = _post(server, several, top_k=1)
    assert reply.status_code == 200, reply.text
    preds = reply.json()["predictions"]
    assert [p["file"] for p in preds] == [f"{i}.png" for i in range(len(rows))]
    assert [p["label"] for p in preds] == list(rows["pred"])
    assert all(len(p["top_k"]) == 1 for p in preds)


def test_model_card_health_and_docs(server, trained_run):
    card = requests.get(f"{server}/v1/model", headers=AUTH, timeout=10).json()
    assert card["model"]["run_id"] == trained_run.run_id and card["dataset"]["classes"] == ["blue", "red"]
    health = requests.get(f"{server}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    from tlcore.train import devices

    assert "serve" in devices.declared_roles()  # the server declared its device policy before loading
    assert health.json()["device_policy"] == devices.current_policy()  # what it applied, e.g. "serve: on GPU 0, …"
    assert requests.get(f"{server}/docs", timeout=10).status_code == 200
    schema = requests.get(f"{server}/openapi.json", timeout=10).json()
    assert "/v1/predict" in schema["paths"] and "/v1/model" in schema["paths"]


def test_token_is_required_when_set(server):
    assert requests.get(f"{server}/v1/model", timeout=10).status_code == 401
    reply = requests.get(f"{server}/v1/model", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert reply.status_code == 401 and reply.headers["WWW-Authenticate"] == "Bearer"
    assert reply.json() == {"error": "This server needs a token: send the header `Authorization: Bearer TOKEN`."}
    assert _post(server, {"file": ("x.png", b"", "image/png")}, headers={}).status_code == 401
    assert requests.get(f"{server}/healthz", timeout=10).status_code == 200  # liveness needs no token


def test_bad_input_gets_a_plain_4xx(server, monkeypatch):
    from tlcore.deploy import serve

    def refused(reply, status, *phrases):
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        assert all(p in error for p in phrases), error
        assert "Traceback" not in reply.text

    refused(_post(server, {"file": ("notes.png", b"just some text\n", "image/png")}), 415,
            "notes.png is not an image", "a text file")
    refused(_post(server, {"file": ("bomb.png", make_bomb_png(30000, 30000), "image/png")}), 413,
            "bomb.png", "megapixels")
    refused(_post(server, {"file": ("broken.png", _png()[:60], "image/png")}), 400, "broken.png")
    refused(_post(server, {"file": ("empty.png", b"", "image/png")}), 400, "empty.png is an empty file")
    refused(_post(server, {"image": ("a.png", _png(), "image/png")}), 400,
            "No image in the request", "`file`", "`files`")
    refused(requests.post(f"{server}/v1/predict", json={"file": "a.png"}, headers=AUTH, timeout=10), 400,
            "No image in the request")
    refused(_post(server, {"file": ("a.png", _png(), "image/png")}, top_k=0), 422, "`top_k` as a positive integer")
    monkeypatch.setattr(serve, "MAX_UPLOAD_BYTES", 1000)  # the server runs in this process
    refused(_post(server, {"file": ("big.png", _png(size=200), "image/png")}), 413, "big.png is over")


def _png(size=48, seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_concurrent_clients_each_get_their_own_answer(server, trained_run):
    from tlcore.deploy import inference

    loaded = inference.load_run_model(trained_run.run_id)
    images = [_png(seed=i) for i in range(16)]
    expected = [loaded.predict_image(data, top_k=2) for data in images]

    def ask(i):
        reply = _post(server, {"file": (f"{i}.png", images[i], "image/png")}, top_k=2)
        return reply.json()["predictions"][0]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, list(range(16)) * 2))
    for i, answer in enumerate(answers):
        exp = expected[i % 16]
        assert answer["file"] == f"{i % 16}.png" and answer["label"] == exp.label
        assert answer["probability"] == pytest.approx(exp.confidence, abs=1e-5)


def test_threshold_and_calibration_of_the_run_are_applied(trained_run):
    from tlcore.deploy import inference
    from tlcore.evaluate.operating_point import read_operating_point

    folder = RunFolder(trained_run.run_id)
    own = {path: path.read_bytes() for path in (folder.calibration_file, folder.threshold_file) if path.is_file()}
    folder.calibration_file.write_text(json.dumps({"temperature": 3.0}))
    folder.threshold_file.write_text(json.dumps({"threshold": 0.99}))
    try:
        point = read_operating_point(folder)
        with serving(trained_run.run_id) as url:
            reply = _post(url, {"file": ("a.png", _png(), "image/png")}, headers={})
            card = requests.get(f"{url}/v1/model", timeout=10).json()
    finally:  # the run's own operating point (written by training) back as it was
        for path in (folder.calibration_file, folder.threshold_file):
            path.unlink()
        for path, data in own.items():
            path.write_bytes(data)
    assert reply.status_code == 200, reply.text
    pred = reply.json()["predictions"][0]
    raw = inference.load_run_model(trained_run.run_id).probabilities(inference.to_pixels(_png(), 48))[0]
    calibrated = point.calibrate(raw)
    assert pred["probability"] == pytest.approx(calibrated.max(), abs=1e-5)
    assert pred["probability"] < raw.max()  # a temperature above 1 softens
    assert calibrated.max() < 0.99 and pred["abstained"] is True
    assert card["threshold"] == {"threshold": 0.99}


def test_serving_an_unknown_run_is_one_plain_sentence(capsys):
    from tlcore.cli import main

    assert main(["serve", "--run", "no-such-run", "--port", "1"]) == 2
    assert capsys.readouterr().err.startswith("Error: No run 'no-such-run'.")
