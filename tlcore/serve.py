"""A run's model behind HTTP: `python -m tlcore serve --run RUN`.

FastAPI app with `POST /v1/predict` (multipart image field `file`, or several as `files`),
`GET /v1/model` (the model card), `GET /healthz` and OpenAPI docs at `/docs`. The model is
loaded once per server. Request threads decode their images (through `tlcore.data.images`,
the one way pixels are made); one batching thread runs the model on whatever images are
waiting, so concurrent requests share forward passes. Every refusal is a 4xx with one plain
sentence in `{"error": ...}`, never a traceback.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, and
# `Depends(bearer)` names a variable local to `create_app`.
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
        self._thread = threading.Thread(target=self._loop, name="predict-batcher", daemon=True)
        self._thread.start()

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities for a uint8 batch `(n, size, size, 3)`, computed with other callers' images."""
        future: Future = Future()
        self._queue.put((pixels, future))
        return future.result()

    def close(self) -> None:
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

    def __init__(self, run_ref: str, store=None):
        from tlcore import devices, inference
        from tlcore.model_card import build_card, find_run
        from tlcore.operating_point import read_operating_point

        self.device_policy = devices.declare_process("serve")
        self.loaded = inference.load_run_model(run_ref, store)
        run, folder = find_run(run_ref, store)
        self.run_id, self.run_name = run.id, run.name
        self.card = build_card(run.id, store)
        self.point = read_operating_point(folder)
        self.loaded.warm_up(inference.BATCH_BUCKETS)  # the batcher sends any size up to MAX_BATCH
        self.batcher = Batcher(self.loaded)

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


# ImageRejected reasons -> HTTP status.
_STATUS = {"too_large": 413, "not_image": 415}


def create_app(run_ref: str, *, token: str | None = None, store=None):
    """The FastAPI app serving run `run_ref`; loads the model now (raises `NotFound`/`ModelLoadError`)."""
    from tlcore import __version__

    served = ServedModel(run_ref, store)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        served.batcher.close()

    app = FastAPI(title=f"Transfer Lab: {served.run_name}", version=__version__, lifespan=lifespan,
                  description=f"Classifies photos into: {', '.join(served.loaded.labels)}. "
                              f"The model card is at /v1/model.")
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
        return {"status": "ok", "run": served.run_id, "classes": len(served.loaded.labels),
                "device_policy": served.device_policy}

    @app.get("/v1/model", dependencies=[Depends(check_token)])
    def model_card() -> dict[str, Any]:
        """The model card: data, recipe, test metrics, calibration, threshold, intended use and limits."""
        return served.card

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
        try:
            predictions = served.predict(images, top_k)
        except ImageRejected as exc:
            raise Refused(_STATUS.get(exc.reason, 400), exc.message) from None
        return {"run": served.run_id, "predictions": predictions}

    return app


def run_server(run_ref: str, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None) -> None:
    """Serve run `run_ref` with uvicorn until interrupted."""
    import uvicorn

    app = create_app(run_ref, token=token)
    uvicorn.run(app, host=host, port=port, log_level="info")
