"""Cached resources shared by every session (the store, the device probe, loaded models) and
results this session keeps for itself.

`st.cache_resource` objects are shared across sessions and threads, so each one here is safe
to use concurrently: `Store` opens a connection per call, the device probe is written once by
its own thread, and each loaded model carries a lock that serialises its predictions.
TensorFlow is imported only when a model is loaded (Demo page), never at import time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Hashable, Iterable, TypeVar

import streamlit as st

from tlcore.errors import NotFound, TransferLabError
from tlcore.records import home
from tlcore.records.run_folder import RunFolder
from tlcore.records.store import Store

IMAGENET_REF = "imagenet:efficientnet_lite0"
T = TypeVar("T")


# ------------------------------------------------------------------- the store

def keep_choice(key: str, options: Iterable[Hashable], default: Hashable | None = None) -> None:
    """Before drawing the select widget `key`: keep the user's choice while it is one of `options`.

    A choice that is gone (a deleted run, another data home) becomes `default`, else the first option.
    """
    options = list(options)
    if st.session_state.get(key) not in options:
        st.session_state[key] = options[0] if default is None else default


def run_from_url(page: str, choices: list[str], label: Callable[[str], str]) -> str:
    """The page's run selectbox (`{page}.run`), following `?run=` when the link changes and
    writing the choice back to the URL, so a page with its run can be shared."""
    wanted = st.query_params.get("run")
    if wanted and wanted != st.session_state.get(f"{page}.url_seen"):
        st.session_state[f"{page}.run"] = wanted
    keep_choice(f"{page}.run", choices)
    run_id = st.selectbox("Run", choices, key=f"{page}.run", format_func=label)
    st.query_params["run"] = run_id
    st.session_state[f"{page}.url_seen"] = run_id
    return run_id


@st.cache_resource(show_spinner=False)
def _store_at(path: str) -> Store:
    return Store(path)


def store() -> Store:
    """The store of the current data home (one cached `Store` per `$TLCORE_HOME`)."""
    return _store_at(str(home.store_path()))


# ------------------------------------------------------------------ the device

@dataclasses.dataclass
class DeviceProbe:
    """`tlcore.train.devices.describe()` run once in a child process, so that no page waits for
    TensorFlow to import just to say which device the server has."""

    result: dict[str, Any] | None = None
    error: str | None = None
    started_at: float = dataclasses.field(default_factory=time.time)

    def start(self) -> "DeviceProbe":
        threading.Thread(target=self._run, name="tlab-device-probe", daemon=True).start()
        return self

    def _run(self) -> None:
        # Let the first pages paint before TensorFlow's import competes for the CPU, and run
        # the check at the lowest priority: on a 2-core server it must not slow the UI.
        time.sleep(float(os.environ.get("TLAB_DEVICE_PROBE_DELAY", "6")))
        code = ("import json; from tlcore.train.devices import describe; "
                "print('TLAB-DEVICE ' + json.dumps(describe(), default=str))")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        try:
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 timeout=300, env=env, cwd=_project_root(),
                                 preexec_fn=lambda: os.nice(19))
        except Exception as exc:  # noqa: BLE001 - any failure is just "unknown device"
            self.error = f"The device check did not finish ({type(exc).__name__})."
            return
        for line in out.stdout.splitlines():
            if line.startswith("TLAB-DEVICE "):
                self.result = json.loads(line[len("TLAB-DEVICE "):])
                return
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        self.error = f"The device check failed: {last[:200]}"

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


def _project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@st.cache_resource(show_spinner=False)
def _device_probe() -> DeviceProbe:
    if os.environ.get("TLAB_DEVICE_PROBE", "on") == "off":
        return DeviceProbe(error="Device check switched off (TLAB_DEVICE_PROBE=off).")
    return DeviceProbe().start()


def device_probe() -> DeviceProbe:
    return _device_probe()


def device_summary(probe: DeviceProbe) -> str:
    """One line: 'GPU · 1 × NVIDIA A10 · mixed precision' or 'CPU · 2 cores'."""
    if probe.result is None:
        return probe.error or "checking…"
    info = probe.result
    if info.get("summary"):
        return str(info["summary"])
    kind = str(info.get("kind") or "?")
    devices = info.get("devices") or []
    names = []
    for d in devices:
        names.append(d.get("name") if isinstance(d, dict) else str(d))
    bits = [kind]
    if kind.upper() == "GPU" and names:
        bits.append(f"{len(names)} × {names[0]}")
    elif kind.upper() == "CPU":
        bits.append(f"{os.cpu_count()} cores")
    if info.get("mixed_precision"):
        bits.append("mixed precision")
    if info.get("xla"):
        bits.append("XLA")
    return " · ".join(str(b) for b in bits)


# ---------------------------------------------------------------------- models

@dataclasses.dataclass
class CachedModel:
    """A loaded model plus the lock that serialises its predictions across sessions."""

    ref: str
    loaded: Any
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def predict(self, image: Any, top_k: int):
        with self.lock:
            return self.loaded.predict_image(image, top_k)

    def gradcam(self, image_uint8: Any):
        from tlcore.deploy import inference

        with self.lock:
            return inference.gradcam(self.loaded, image_uint8)


_LOAD_LOCK = threading.Lock()


def declare_device_policy() -> str:
    """At most one GPU, capped, for the dashboard process (`tlcore.train.devices.declare_process`, which
    applies it once): called before every path that may start TensorFlow (model loading, the LR
    finder, the audit, export)."""
    from tlcore.train import devices

    return devices.declare_process("dashboard")


@st.cache_resource(show_spinner=False, max_entries=6)
def _load_model(data_home: str, ref: str) -> CachedModel:
    # One model load at a time: two sessions asking for the same run wait for one load.
    with _LOAD_LOCK:
        from tlcore.deploy import inference

        declare_device_policy()
        if ref.startswith("imagenet:"):
            loaded = inference.load_imagenet_model(ref.split(":", 1)[1])
        else:
            loaded = inference.load_run_model(ref)
        loaded.warm_up()  # under the loading spinner, not in the first photo's latency
        return CachedModel(ref=ref, loaded=loaded)


def load_model(ref: str) -> CachedModel:
    """The model for a run id (or `IMAGENET_REF`), loaded once per data home and cached."""
    return _load_model(str(home.data_home()), ref)


# ------------------------------------------------------- this session's results

def remembered(slot: str, key: Hashable, compute: Callable[[], T]) -> T:
    """`compute()`'s result, computed again only when `key` changes.

    For results made from what this user gave (an uploaded photo): they stay in this session,
    out of the caches every session shares, and each `slot` holds only the latest one.
    """
    state_key = f"remembered:{slot}"  # apart from widget keys, which may share the slot's name
    held = st.session_state.get(state_key)
    if held is not None and held[0] == key:
        return held[1]
    value = compute()
    st.session_state[state_key] = (key, value)
    return value


# ------------------------------------------------------------------ evaluation

def _predictions_stamp(run_id: str) -> float:
    try:
        return RunFolder(run_id).predictions.stat().st_mtime
    except OSError:
        return 0.0


@st.cache_data(show_spinner=False, max_entries=64)
def _eval_report(data_home: str, run_id: str, stamp: float):
    from tlcore.evaluate.evaluation import evaluate_run

    return evaluate_run(run_id)


class NoEvaluation(TransferLabError):
    """A run has no evaluation to show (not finished, or no predictions were saved)."""


def eval_report(run_id: str):
    """The run's `EvalReport`, cached until its predictions file changes.

    Raises `NoEvaluation` with a plain sentence when there is nothing to evaluate."""
    stamp = _predictions_stamp(run_id)
    if not stamp:
        raise NoEvaluation("This run has no saved predictions (it did not finish its evaluation).")
    try:
        return _eval_report(str(home.data_home()), run_id, stamp)
    except NotFound as exc:
        raise NoEvaluation(f"This run's evaluation files are incomplete: {exc}") from exc
    except (ValueError, KeyError) as exc:
        raise NoEvaluation(f"This run's predictions cannot be read: {exc}") from exc


@st.cache_data(show_spinner=False, max_entries=32)
def _paired_comparison(data_home: str, run_a: str, run_b: str, stamps: tuple[float, float]):
    from tlcore.evaluate.comparison import compare_runs

    return compare_runs(run_a, run_b, store())


def paired_comparison(run_a: str, run_b: str):
    """The `PairedComparison` of run B against run A, cached until either run's predictions change.

    Raises `InvalidInput` (a plain sentence) when the two runs cannot be compared."""
    stamps = (_predictions_stamp(run_a), _predictions_stamp(run_b))
    return _paired_comparison(str(home.data_home()), run_a, run_b, stamps)
