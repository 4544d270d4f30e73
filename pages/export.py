"""Export: a finished run's model as files to download, each made once and kept in the run folder.

Keras is the run's own file; every other format is prepared on request (with progress), then
offered for download. What the export checks found (ONNX against Keras, int8 against float32)
is shown beside it. The work is `tlcore.deploy.export`'s; this page only draws it.
"""

import streamlit as st

from tlcore.deploy import export, inference
from tlcore.errors import TransferLabError, plain_message
from tlcore.evaluate.model_card import FLIP_TTA
from tlcore.evaluate.operating_point import read_operating_point
from tlcore.records.store import RunStatus
from ui import format as fmt
from ui import frame, state

frame.require()

store = state.store()
st.title("Export")
finished = store.list_runs({RunStatus.SUCCEEDED})
if not finished:
    st.info("No finished run yet. When a run finishes, its model can be exported here.")
    st.page_link("pages/train.py", label="Go to Train", icon=":material/model_training:")
    st.stop()
by_id = {r.id: r for r in finished}
choices = list(by_id)
run_id = state.run_from_url("export", choices,
                            lambda i: f"{by_id[i].name} · {fmt.pct(by_id[i].accuracy)} · {by_id[i].backbone}")
run = by_id[run_id]

folder, _ = inference.run_model_folder(run.id)
if not folder.has_model():
    st.warning(f"Run {run.name} has no saved model file in {folder.path}, so there is nothing to export. "
               "Train it again.")
    st.stop()

st.caption("Every model takes RGB 0-255 pixels at the run's image size: the preprocessing is inside it. "
           f"Files are kept in {folder.path / 'export'}.")
if folder.tta() == "flip":
    st.caption(f"This run was evaluated with test-time augmentation {FLIP_TTA}")
def prepare(key: str, title: str) -> None:
    """Make one format; its failure is kept for the session, so every rerun (the first included)
    shows it until the next attempt."""
    failures = st.session_state.setdefault("export.failures", {})
    failures.pop((run.id, key), None)
    bar = st.progress(0.0, text=f"Preparing {title}")
    try:
        state.declare_device_policy()
        export.download_file(run.id, key, progress=lambda f, m: bar.progress(min(max(f, 0.0), 1.0), text=m))
    except Exception as exc:  # noqa: BLE001 - whatever went wrong is said in words
        reason = plain_message(exc) if isinstance(exc, (TransferLabError, OSError)) else f"{type(exc).__name__}: {exc}"
        failures[(run.id, key)] = f"{title} could not be made: {reason}"
    st.rerun()


# The checks run on the run's evaluation split: test, or validation when the dataset has no test split.
eval_split = run.summary.eval_split if run.summary else ""
split_words = {"test": "test", "val": "validation (the dataset has no test split)"}.get(eval_split, "evaluation")
try:
    st.caption("Calibration (in the bundle, the card and the endpoint): "
               f"{read_operating_point(folder).describe_calibration()}")
except TransferLabError as exc:
    st.warning(plain_message(exc))
for form in export.FORMATS:
    key = form.name
    left, right = st.columns([4, 1], vertical_alignment="center")
    left.markdown(f"**{form.title}** · {form.describe(split_words)}")
    path = export.cached_download(run.id, key)
    if path is None:
        if right.button("Prepare", key=f"export.make.{key}", width="stretch"):
            prepare(key, form.title)
        failure = st.session_state.get("export.failures", {}).get((run.id, key))
        if failure:
            left.error(failure)
        continue
    right.download_button("Download", data=lambda p=path: p.read_bytes(),
                          file_name=fmt.file_name(run.name, form.download_suffix), mime=form.mime,
                          key=f"export.download.{key}", on_click="ignore", width="stretch",
                          icon=":material/download:")
    report = export.read_report(path)
    for line in export.describe_report(report) if report else []:
        (left.warning if line.startswith("Warning:") else left.caption)(line)
