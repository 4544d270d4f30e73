"""A run's model behind HTTP: `python -m tlcore serve --run RUN`, or `--model NAME[@ALIAS]` to follow an alias.

FastAPI app with `POST /v1/predict` (multipart image field `file`, or several as `files`),
`GET /v1/model` (the model card), `GET /healthz` and OpenAPI docs at `/docs`. The model is
loaded once per server. Request threads decode their images (through `tlcore.data.images`,
the one way pixels are made); one batching thread runs the model on whatever images are
waiting, so concurrent requests share forward passes. Every refusal is a 4xx with one plain
sentence in `{"error": ...}`, never a traceback.

Serving a registered model's alias (`production` by default), a `Follower` thread looks the alias
up every few seconds; when it moved, the new version is loaded beside the old one and swapped in
with one assignment. A request holds the model it started with, so none is dropped or mixed, and
the old batcher, closed after the swap, still answers whatever was queued or is sent to it late.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, and
# `Depends(bearer)` names a variable local to `create_app`.
import logging
import queue
import secrets
import threading
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from tlcore.errors import ImageRejected

# Largest upload accepted per image; bigger ones get 413 before they are decoded.
MAX_UPLOAD_BYTES = 20 * 2**20
# Images per request.
MAX_FILES = 32
# Images run through the model in one forward pass at most.
MAX_BATCH = 32


class Batcher:
    """Runs a loaded model on the images of concurrent callers in shared batches.

    Callers block in `probabilities`; one thread takes everything queued (up to `MAX_BATCH`
    images) and runs it at once, so there is no added wait when requests come one at a time.
    """

    def __init__(self, loaded, max_batch: int = MAX_BATCH):
        self.loaded = loaded
        self.max_batch = max_batch
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._closing = threading.Lock()  # nothing is queued after the stop marker
        self._thread = threading.Thread(target=self._loop, name="predict-batcher", daemon=True)
        self._thread.start()

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities for a uint8 batch `(n, size, size, 3)`, computed with other callers' images
        (once closed, alone: a request that picked this model just before a swap is still answered)."""
        future: Future = Future()
        with self._closing:
            queued = not self._closed
            if queued:
                self._queue.put((pixels, future))
        return future.result() if queued else self.loaded.probabilities(pixels)

    def close(self) -> None:
        """Answer what is queued, then stop the thread."""
        with self._closing:
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            jobs = [item]
            count = len(item[0])
            while count < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                jobs.append(item)
                count += len(item[0])
            try:
                probs = self.loaded.probabilities(np.concatenate([pixels for pixels, _ in jobs]))
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                for _, future in jobs:
                    future.set_exception(exc)
                continue
            start = 0
            for pixels, future in jobs:
                future.set_result(probs[start:start + len(pixels)])
                start += len(pixels)


class ServedModel:
    """What one server holds: the loaded run model, its card, its operating point and the batcher."""

    def __init__(self, run_ref: str, store=None, version=None):
        from tlcore.deploy import inference
        from tlcore.evaluate.model_card import build_card, find_run
        from tlcore.evaluate.operating_point import read_operating_point
        from tlcore.train import devices

        self.device_policy = devices.declare_process("serve")
        self.loaded = inference.load_run_model(run_ref, store)
        run, folder = find_run(run_ref, store)
        self.run_id, self.run_name = run.id, run.name
        self.card = build_card(run.id, store)
        self.point = read_operating_point(folder)
        self.version = version  # the registry's `ModelVersion`, when serving a model's alias
        self.loaded.warm_up(inference.BATCH_BUCKETS)  # the batcher sends any size up to MAX_BATCH
        self.batcher = Batcher(self.loaded)

    def identity(self) -> dict[str, Any]:
        """What `/v1/model` says is served: the run, and the model version when it follows an alias."""
        return {"run": self.run_id, "run_name": self.run_name,
                "model": self.version.model if self.version else None,
                "version": self.version.version if self.version else None}

    def predict(self, images: list[tuple[str, bytes]], top_k: int) -> list[dict[str, Any]]:
        """Top-k answers for (file name, file bytes) pairs, in order.

        Raises:
            ImageRejected: a file is not a usable image (the message names it).
        """
        from tlcore.data.images import load_resized

        pixels = np.stack([load_resized(data, self.loaded.image_size, name) for name, data in images])
        probs = self.point.calibrate(self.batcher.probabilities(pixels))
        k = min(top_k, len(self.loaded.labels))
        out = []
        for (name, _), p in zip(images, probs):
            order = np.argsort(-p, kind="stable")[:k]
            top = [{"label": self.loaded.labels[i], "probability": float(p[i]), "index": int(i)} for i in order]
            out.append({"file": name, "label": top[0]["label"], "probability": top[0]["probability"],
                        "abstained": self.point.abstains(top[0]["probability"]), "top_k": top})
        return out


class Follower:
    """Serves the version a model's alias points at, and swaps to a new one when the alias moves."""

    def __init__(self, ref: str, store, poll_s: float = 2.0):
        from tlcore.deploy import model_registry

        self.name, _, alias = ref.partition("@")
        self.alias = alias or model_registry.PRODUCTION
        self.store, self.poll_s = store, poll_s
        version = model_registry.version_of(self.name, self.alias, store)
        self.current = ServedModel(version.run_id, store, version)
        self.swaps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="alias-follower", daemon=True)
        self._thread.start()

    def check(self) -> bool:
        """Look the alias up once; load and swap in its version if it moved. True when it swapped."""
        from tlcore.deploy import model_registry

        version = model_registry.version_of(self.name, self.alias, self.store)
        old = self.current
        if old.version is not None and version.version == old.version.version:
            return False
        new = ServedModel(version.run_id, self.store, version)  # loaded while the old one answers
        self.current = new  # one assignment: every later request gets the new model
        self.swaps += 1
        _log.warning("Serving %s@%s: v%s (run %s) replaces v%s.", self.name, self.alias, version.version,
                     version.run_id, old.version.version if old.version else "?")
        old.batcher.close()
        return True

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - keep serving the loaded version
                _log.warning("Could not follow %s@%s (%s); still serving the loaded version.",
                             self.name, self.alias, exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.current.batcher.close()


class _Fixed:
    """One run, served as it is (`serve --run`)."""

    def __init__(self, run_ref: str, store):
        self.current = ServedModel(run_ref, store)

    def close(self) -> None:
        self.current.batcher.close()


_log = logging.getLogger("tlcore.deploy.serve")

# ImageRejected reasons -> HTTP status.
_STATUS = {"too_large": 413, "not_image": 415}


def create_app(run_ref: str | None = None, *, model: str | None = None, poll_s: float = 2.0,
               token: str | None = None, store=None):
    """The FastAPI app serving run `run_ref`, or the version model alias `model` (`NAME[@ALIAS]`) points at,
    followed every `poll_s` seconds. Loads the model now (raises `NotFound`/`ModelLoadError`)."""
    from tlcore import __version__
    from tlcore.records.store import Store

    store = store or Store()
    source = Follower(model, store, poll_s) if model else _Fixed(run_ref, store)
    first = source.current

    @asynccontextmanager
    async def lifespan(_app):
        yield
        source.close()

    title = model or first.run_name
    app = FastAPI(title=f"Transfer Lab: {title}", version=__version__, lifespan=lifespan,
                  description=f"Classifies photos into: {', '.join(first.loaded.labels)}. "
                              f"The model card is at /v1/model.")
    app.state.source = source
    bearer = HTTPBearer(auto_error=False)

    class Refused(Exception):
        def __init__(self, status: int, message: str):
            self.status, self.message = status, message

    def check_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if token is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise Refused(401, "This server needs a token: send the header `Authorization: Bearer TOKEN`.")

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        fields = sorted({str(err.get("loc", ["", "?"])[-1]) for err in exc.errors()})
        return JSONResponse({"error": f"The request is not what /v1/predict takes ({', '.join(fields)}): send "
                                      "an image as multipart field `file`, or several as `files`, and "
                                      "`top_k` as a positive integer."}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception):
        return JSONResponse({"error": f"The server failed on this request ({type(exc).__name__}); "
                                      "the server log has the details."}, status_code=500)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness: the model is loaded and the server answers; which GPU (capped) it holds."""
        served = source.current
        return {"status": "ok", "run": served.run_id, "version": served.identity()["version"],
                "classes": len(served.loaded.labels), "device_policy": served.device_policy}

    @app.get("/v1/model", dependencies=[Depends(check_token)])
    def model_card() -> dict[str, Any]:
        """The model card (data, recipe, test metrics, calibration, threshold, intended use and limits) and
        `serving`: the run, and the model and version when the server follows an alias."""
        served = source.current
        return {**served.card, "serving": {**served.identity(), "alias": getattr(source, "alias", None)}}

    @app.post("/v1/predict", dependencies=[Depends(check_token)])
    def predict(file: Annotated[UploadFile | None, File(description="one image")] = None,
                files: Annotated[list[UploadFile] | None, File(description="several images")] = None,
                top_k: Annotated[int, Query(ge=1, description="classes per image, most likely first")] = 5,
                ) -> dict[str, Any]:
        """Top-k classes with probabilities for each image; `abstained` is true below the run's threshold."""
        uploads = ([file] if file is not None else []) + list(files or [])
        if not uploads:
            raise Refused(400, "No image in the request: send it as multipart field `file`, "
                               "or several as `files`.")
        if len(uploads) > MAX_FILES:
            raise Refused(413, f"{len(uploads)} images in one request; send at most {MAX_FILES}.")
        images = []
        for i, upload in enumerate(uploads):
            name = upload.filename or f"image {i + 1}"
            data = upload.file.read(MAX_UPLOAD_BYTES + 1)
            if len(data) > MAX_UPLOAD_BYTES:
                raise Refused(413, f"{name} is over {MAX_UPLOAD_BYTES // 2**20} MB; send a smaller image.")
            images.append((name, data))
        served = source.current  # this request's model, whatever the alias does meanwhile
        try:
            predictions = served.predict(images, top_k)
        except ImageRejected as exc:
            raise Refused(_STATUS.get(exc.reason, 400), exc.message) from None
        return {"run": served.run_id, "version": served.identity()["version"], "predictions": predictions}

    return app


def run_server(run_ref: str | None = None, *, model: str | None = None, poll_s: float = 2.0,
               host: str = "127.0.0.1", port: int = 8000, token: str | None = None) -> None:
    """Serve run `run_ref` (or follow model alias `model`) with uvicorn until interrupted."""
    import uvicorn

    app = create_app(run_ref, model=model, poll_s=poll_s, token=token)
    uvicorn.run(app, host=host, port=port, log_level="info")
