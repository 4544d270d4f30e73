"""Demo: a finished run's model (or the plain ImageNet EfficientNet-Lite0) on an uploaded photo or
a camera snapshot: top-k classes, a Grad-CAM overlay of where it looked, and the latency. A
calibrated run's confidences are temperature-scaled, and below the confidence its validation
split needs for the target precision (95 % unless the user moves it) it answers "not sure".
"What is it really?" files the photo in its dataset's feedback inbox: with the class the user
chooses (nothing is preselected), confirming or correcting the prediction, or as none of the
classes (recorded, never trained on).

Models load once per process (`ui.state.load_model`, `st.cache_resource`) and are shared by
every session; TensorFlow is imported only here, when a model is first needed. The prediction
and Grad-CAM of a photo are kept for the session, so a rerun that changes neither the photo nor
the model (another top k, any click) shows them again without a forward pass.
"""

import hashlib
import time

import numpy as np
import streamlit as st
from PIL import Image

from tlcore.data import feedback
from tlcore.data.images import ImageRejected, open_image
from tlcore.errors import TransferLabError
from tlcore.evaluate.calibration import retarget
from tlcore.records.store import RunStatus
from ui import charts, frame, images, state
from ui import format as fmt

frame.require()

MAX_SIDE = 512  # the photo is shown (and Grad-CAM drawn) at most this large
MAX_TOP_K = 10
NONE_CHOICE = "\u2014 none of these \u2014"  # the "not in any class" answer (no class can be named so)
store = state.store()

st.title("Demo")
finished = store.list_runs({RunStatus.SUCCEEDED})
by_id = {r.id: r for r in finished}
options = [r.id for r in finished] + [state.IMAGENET_REF]

wanted = st.query_params.get("run")
if wanted and wanted != st.session_state.get("demo.url_seen"):
    if wanted in options:
        st.session_state["demo.model"] = wanted
    else:
        try:
            other = store.get_run(wanted)
            st.warning(f"Run {other.name} is {other.status.value}; only finished runs can be demoed."
                       + (f" It failed: {other.error}" if other.status == RunStatus.FAILED and other.error else ""))
        except KeyError:
            st.warning(f"The link names a run ({wanted!r}) that is not in this data home.")
state.keep_choice("demo.model", options)


def model_label(ref: str) -> str:
    if ref == state.IMAGENET_REF:
        return "EfficientNet-Lite0 · plain ImageNet (1000 classes, no training)"
    r = by_id[ref]
    tta = " · flip TTA" if r.summary and r.summary.metrics.tta == "flip" else ""
    return f"{r.name} · {fmt.pct(r.accuracy)} (smallest class {fmt.pct(r.smallest_class_recall)}) · {r.backbone}{tta}"


c1, c2, c3 = st.columns([3, 1, 1])
ref = c1.selectbox("Model", options, key="demo.model", format_func=model_label)
top_k = c2.slider("Top k", 1, MAX_TOP_K, 5, key="demo.topk")
want_cam = c3.toggle("Grad-CAM", value=True, key="demo.gradcam", help="Show where the model looked.")
if ref != state.IMAGENET_REF:
    st.query_params["run"] = ref
elif "run" in st.query_params:
    del st.query_params["run"]
st.session_state["demo.url_seen"] = ref if ref != state.IMAGENET_REF else None
if not finished:
    st.caption("No finished run yet, so only the plain ImageNet model is offered. Train one on **Train**.")

source = st.segmented_control("Image from", ["Upload", "Camera"], default="Upload", key="demo.source")
if source == "Camera":
    shot = st.camera_input("Take a photo", key="demo.camera")
else:
    shot = st.file_uploader("Upload a photo", type=["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"],
                            key="demo.upload")
if shot is None:
    st.info("Upload a photo or take one with the camera to see what the model makes of it.")
    st.stop()

photo_bytes = shot.getvalue()
try:
    # The same checks as an import (corrupt, not an image, too small, decompression bombs).
    photo = open_image(photo_bytes, name=shot.name or "The photo")
except ImageRejected as exc:
    st.error(f"{exc.message} Try another photo (JPEG or PNG).")
    st.stop()
photo.thumbnail((MAX_SIDE, MAX_SIDE), Image.BILINEAR)
rgb = np.asarray(photo)

try:
    with st.spinner("Loading the model (once; later predictions reuse it)…"):
        model = state.load_model(ref)
except Exception as exc:  # noqa: BLE001 - ModelLoadError, KeyError, anything: said in words
    reason = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    st.error(f"This model could not be loaded, so it cannot be demoed: {(reason or type(exc).__name__).rstrip('.')}. "
             "Choose another run, or retrain this one.")
    st.stop()


def gradcam(model: state.CachedModel, rgb: np.ndarray) -> tuple[np.ndarray | None, float, str | None]:
    """The heat map, how long it took in ms, and why it is missing (None when it is there)."""
    start = time.perf_counter()
    try:
        heat = model.gradcam(rgb)
    except Exception as exc:  # noqa: BLE001 - the prediction still stands
        return None, 0.0, str(exc)
    return heat, (time.perf_counter() - start) * 1000, None


photo_key = (ref, hashlib.sha256(photo_bytes).hexdigest())
try:
    # The file itself (pixels made as for evaluation), with every class the slider can show.
    pred = state.remembered("demo.prediction", photo_key, lambda: model.predict(photo_bytes, MAX_TOP_K))
except Exception as exc:  # noqa: BLE001
    st.error(f"The model could not classify this image: {exc}")
    st.stop()
shown = pred.top_k[:top_k]

heat, cam_ms = None, None
if want_cam:
    heat, cam_ms, cam_error = state.remembered("demo.gradcam", photo_key, lambda: gradcam(model, rgb))
    if cam_error:
        st.caption(f"Grad-CAM is not available for this model: {cam_error}")

left, right = st.columns([1, 1], gap="large")
with left:
    if heat is not None:
        st.image(images.overlay(rgb, heat), caption="Grad-CAM: warm colours are where the model looked",
                 width="stretch")
        with st.expander("Original photo"):
            st.image(rgb, width="stretch")
    else:
        st.image(rgb, caption=shot.name, width="stretch")
run = by_id.get(ref)
summary = run.summary if run else None
threshold = summary.threshold if summary else None
with right:
    label, prob = shown[0]
    not_sure = False
    if threshold is not None:
        stored_target = round(100 * threshold.target_precision)
        target = st.slider("Target precision", 50, 100, stored_target, key="demo.target", format="%d %%",
                           help="How often an answer must be right on validation; below the confidence that "
                                "gives it, the model answers \"not sure\".")
        active = threshold if target == stored_target else retarget(threshold, target / 100)
        not_sure = active.usable and pred.confidence < active.threshold
    m1, m2 = st.columns(2)
    if not_sure:
        m1.metric("Prediction", "Not sure", help="Below the run's confidence threshold: the top guesses follow.")
    else:
        m1.metric("Prediction", label, help="The most likely class")
    m2.metric("Confidence", f"{prob:.1%}")
    if not_sure:
        guesses = ", ".join(f"{name} {p:.0%}" for name, p in pred.top_k[:3])
        st.caption(f"Not sure: {target} % precision on validation needs a confidence of at least "
                   f"{active.threshold:.0%}. Top guesses: {guesses}.")
    elif threshold is not None and not active.usable:
        st.caption(f"No usable \"not sure\" threshold: no confidence below 100 % reached {target} % precision on "
                   "validation, so every photo gets an answer. A lower target may give one.")
    calibration = summary.calibration if summary else None
    if calibration is not None and calibration.temperature:
        st.caption(f"Confidences are temperature-scaled (T = {calibration.temperature:.2f}, fitted on validation).")
    elif calibration is not None:
        st.caption(f"Confidences are raw softmax, not temperature-scaled. {calibration.reason}")
    m3, m4 = st.columns(2)
    m3.metric("Latency", f"{pred.latency_ms:.0f} ms", help="Decode, resize and forward pass for this image")
    if cam_ms is not None and heat is not None:
        m4.metric("Grad-CAM", f"{cam_ms:.0f} ms")
    st.plotly_chart(charts.topk_bar(shown), key="demo.topk_chart", config={"displayModeBar": False})

# ------------------------------------------------------------------ feedback

if run is not None:
    try:
        dataset = store.get_dataset(run.dataset_id)
    except KeyError:
        st.caption("This run's dataset is not in this data home, so the photo cannot be filed for it.")
        st.stop()
    st.markdown("**What is it really?**")
    st.caption(f"File this photo for {dataset.name}: its class confirms or corrects the answer and can be folded "
               "into the training data on **Datasets**; \"none of these\" is only recorded.")

    def answer_label(choice: str) -> str:
        if choice == NONE_CHOICE:
            return "None of these: it is not in any class"
        return f"{choice} (the model said so)" if choice == label else choice

    f1, f2 = st.columns([3, 1], vertical_alignment="bottom")
    # Keyed by the photo, so a new photo starts with nothing chosen: the prediction is never the silent default.
    answer = f1.selectbox("What is it really?", [*dataset.classes, NONE_CHOICE], index=None,
                          key=f"demo.feedback_label.{photo_key[1][:16]}", format_func=answer_label,
                          placeholder="Choose its class, or none of these", label_visibility="collapsed")
    if f2.button("File it", key="demo.feedback_file", disabled=answer is None):
        truth = feedback.NONE_OF_THESE if answer == NONE_CHOICE else answer
        try:
            item = feedback.add_feedback(dataset.name, photo_bytes, truth, dataset.classes, run_id=run.id,
                                         predicted=label)
        except TransferLabError as exc:
            st.error(f"The photo could not be filed: {exc}")
        else:
            what = {feedback.CONFIRMED: f"**{truth}**, confirming the answer",
                    feedback.CORRECTED: f"**{truth}**, correcting the answer {label}",
                    feedback.NOT_IN_ANY_CLASS: f"**none of these** (the model said {label}); it is recorded and "
                                               "never added to the training data"}[item.answer]
            st.success(f"Filed as {what}, in the feedback inbox of {dataset.name}."
                       + ("" if item.answer == feedback.NOT_IN_ANY_CLASS else
                          " The **Datasets** page shows what folding the inbox adds before it does."))
