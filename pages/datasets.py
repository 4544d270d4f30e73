"""Datasets: import (built-in offline sets, a zip upload, a server folder under the allowed roots,
camera snapshots per class, the download catalog), then the import report, class balance, the
feedback inbox the Demo fills (folded into a new version on request) and a sample grid per class
for any dataset version."""

import dataclasses
import shutil
import tempfile
from pathlib import Path

import streamlit as st

from tlcore.data import builtin, feedback, fixes, importer, manifest, snapshots, sources
from tlcore.evaluate import audit, evaluation
from tlcore.queue import jobs
from tlcore.records import home
from ui import charts, frame, state
from ui import format as fmt

frame.require()

store = state.store()

SAMPLES_PER_CLASS = 8


def server_roots() -> list[Path]:
    """Folders open for server imports: `$TLCORE_DATA_ROOTS` plus `[data] roots` in secrets."""
    extra = []
    try:
        extra = list((st.secrets.to_dict().get("data") or {}).get("roots") or [])
    except Exception:  # no secrets.toml: only the environment variable counts
        pass
    return sources.allowed_roots(extra)


def done(result, what: str) -> None:
    """Remember a finished import so the page shows it (and selects it) after the rerun."""
    ds, report = result.dataset, result.report
    skipped = len(report.get("skipped") or [])
    if result.unchanged:
        msg = f"No changes: **{ds.label}** already holds exactly the images of {what}."
    else:
        msg = (f"Imported **{ds.label}** from {what}: {ds.num_images} images in {len(ds.classes)} classes"
               + (f"; {skipped} file(s) skipped (see the report below)." if skipped else "."))
    st.session_state["datasets.flash"] = ("success", msg, None)
    st.session_state["datasets.selected"] = ds.id


def failed(exc: Exception, what: str) -> None:
    report = getattr(exc, "report", None) or None
    if isinstance(exc, ValueError):
        text = f"Could not import {what}: {exc}"
    elif isinstance(exc, FileNotFoundError):
        text = f"Could not import {what}: {exc}"
    else:
        text = f"Could not import {what} ({type(exc).__name__}): {exc}"
    st.session_state["datasets.flash"] = ("error", text, report)


def run_import(what: str, fn, *args, **kwargs) -> None:
    with st.spinner(f"Importing {what}… every image is decoded and checked."):
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure is shown in words
            failed(exc, what)
        else:
            done(result, what)


def skipped_table(report: dict, key: str) -> None:
    skipped = report.get("skipped") or []
    if skipped:
        st.markdown(f"**Skipped files ({len(skipped)})**")
        st.dataframe([{"file": s.get("file"), "reason": s.get("reason"), "message": s.get("message")}
                      for s in skipped], hide_index=True, key=key)


# ------------------------------------------------------------------- import

st.title("Datasets")
tab_builtin, tab_zip, tab_folder, tab_camera, tab_catalog = st.tabs(
    ["Built-in (offline)", "Upload a zip", "Server folder", "Camera", "Download catalog"])

with tab_builtin:
    st.caption("Real images shipped inside Python packages: work on a machine without internet.")
    names = list(builtin.BUILTIN)
    choice = st.radio("Built-in dataset", names, key="datasets.builtin",
                      format_func=lambda n: f"{n} — {builtin.BUILTIN[n]}")
    if st.button("Import", key="datasets.import_builtin", type="primary"):
        run_import(f"the built-in '{choice}' set", builtin.import_builtin, choice, store=store)

with tab_zip:
    st.caption("A .zip with one folder per class (`ants/…`, `bees/…`), or `train/` `val/` [`test/`] "
               "folders each holding the class folders. Corrupt, tiny and duplicate images are skipped "
               "and listed.")
    upload = st.file_uploader("Zip of class folders", type=["zip"], key="datasets.zip")
    zip_name = st.text_input("Dataset name (optional)", key="datasets.zip_name",
                             placeholder="defaults to the zip's name")
    if st.button("Import zip", key="datasets.import_zip", type="primary", disabled=upload is None):
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=home.uploads_dir()))
        try:
            stem = Path(upload.name).stem or "upload"
            path = folder / f"{stem}.zip"
            path.write_bytes(upload.getvalue())
            run_import(f"'{upload.name}'", importer.import_dataset, str(path),
                       zip_name.strip() or stem, store=store, source_label=f"upload {upload.name}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)

with tab_folder:
    roots = server_roots()
    if roots:
        st.caption("Folders open for import on this server: " + ", ".join(f"`{r}`" for r in roots))
    else:
        st.info("No server folders are open for import. An administrator can list them in "
                "`$TLCORE_DATA_ROOTS` or as `[data] roots = [...]` in `.streamlit/secrets.toml`.")
    folder_path = st.text_input("Folder on the server", key="datasets.folder",
                                placeholder=str(roots[0] / "my-images") if roots else "/data/my-images")
    folder_name = st.text_input("Dataset name (optional)", key="datasets.folder_name",
                                placeholder="defaults to the folder's name")
    if st.button("Import folder", key="datasets.import_folder", type="primary",
                 disabled=not folder_path.strip()):
        run_import(f"'{folder_path.strip()}'", importer.import_dataset, folder_path.strip(),
                   folder_name.strip() or None, store=store, roots=roots)

with tab_camera:
    st.caption("Teachable-Machine style: name a class, take a few snapshots of it, repeat for each "
               "class, then build the dataset. Ten or more per class work best.")
    snaps: dict[str, list[bytes]] = st.session_state.setdefault("datasets.snaps", {})
    cls = st.text_input("Class name", key="datasets.cam_class", placeholder="e.g. mug")
    photo = st.camera_input("Snapshot", key="datasets.camera")
    if st.button("Add snapshot to this class", key="datasets.cam_add", disabled=photo is None):
        try:
            label = snapshots.check_class_name(cls)
        except ValueError as exc:
            label = None
            st.warning(f"{exc} Name the class, then add the snapshot.")
        if label is None:
            pass
        elif photo is not None and st.session_state.get("datasets.cam_last") == photo.file_id:
            st.info("This snapshot is already added; take a new one.")
        else:
            snaps.setdefault(label, []).append(photo.getvalue())
            st.session_state["datasets.cam_last"] = photo.file_id
    if snaps:
        st.markdown(" · ".join(f"**{c}**: {len(v)}" for c, v in snaps.items()))
        c1, c2 = st.columns(2)
        cam_name = c1.text_input("Dataset name", value="camera", key="datasets.cam_name")
        if c2.button("Clear snapshots", key="datasets.cam_clear"):
            snaps.clear()
            st.rerun()
        if st.button("Build dataset", key="datasets.cam_build", type="primary"):
            run_import("the camera snapshots", snapshots.import_snapshots, snaps,
                       cam_name.strip() or "camera", store=store)
            if st.session_state.get("datasets.flash", ("",))[0] == "success":
                snaps.clear()

with tab_catalog:
    st.caption("Public datasets, downloaded to this server when it has internet.")
    catalog = builtin.CATALOG
    pick = st.selectbox("Dataset", list(catalog), key="datasets.catalog",
                        format_func=lambda n: f"{n} — {catalog[n].description} (~{catalog[n].size_mb} MB)")
    limit = st.number_input("Images per class and split (0 = all)", 0, 100000, value=200, step=50,
                            key="datasets.catalog_limit")
    if st.button("Download and import", key="datasets.download", type="primary"):
        run_import(f"the catalog dataset '{pick}'", builtin.download_catalog, pick,
                   int(limit) or None, store=store)

flash = st.session_state.pop("datasets.flash", None)
if flash:
    kind, text, report = flash
    (st.error if kind == "error" else st.success)(text)
    if report:
        skipped_table(report, "datasets.flash_skipped")
        for w in report.get("warnings") or []:
            st.warning(w)

# ---------------------------------------------------------------- datasets

st.divider()
st.subheader("Your datasets")
datasets = store.list_datasets()
if not datasets:
    st.info("No datasets yet. The built-in ones above import in a few seconds without internet.")
    st.stop()

by_id = {d.id: d for d in datasets}
if st.session_state.get("datasets.select_next") in by_id:  # a version just made below the selector
    st.session_state["datasets.selected"] = st.session_state.pop("datasets.select_next")
state.keep_choice("datasets.selected", by_id)
ds_id = st.selectbox("Dataset", list(by_id), key="datasets.selected",
                     # No "created ... ago" here: a label that changes with time loses the selection.
                     format_func=lambda i: f"{by_id[i].label} · {by_id[i].num_images} images")
ds = by_id[ds_id]
report = ds.report or {}

m1, m2, m3, m4 = st.columns(4)
m1.metric("Images", ds.num_images)
m2.metric("Classes", len(ds.classes))
m3.metric("Skipped files", len(report.get("skipped") or []))
split_counts = {s: sum(c.values()) for s, c in ds.counts.items()}
m4.metric("Train / val / test", " / ".join(str(split_counts.get(s, 0)) for s in ("train", "val", "test")))
st.caption(f"Source: `{ds.source}` · id `{ds.id}` · created {fmt.ago(ds.created_at)}"
           + (" · splits as given" if report.get("given_splits") else ""))

left, right = st.columns([3, 2])
with left:
    st.plotly_chart(charts.class_balance(ds.counts), key="datasets.balance", config={"displayModeBar": False})
with right:
    st.markdown("**Import report**")
    warnings = report.get("warnings") or []
    conflicts = report.get("conflicts") or []
    if not warnings and not report.get("skipped") and not conflicts:
        st.success("Every file was a usable image; no warnings.")
    for w in warnings:
        st.warning(w)
    if conflicts:
        st.warning(f"{len(conflicts)} image(s) appeared in two classes (label conflict) and were left out.")
    skipped_table(report, "datasets.skipped")


# ------------------------------------------------------------------ feedback

def feedback_photos(items, key: str) -> None:
    """Filed photos with what was answered for each (the first 48)."""
    with st.container(key=key):
        st.image([i.file for i in items[:48]], width=96, caption=[caption(i) for i in items[:48]])


def caption(item) -> str:
    """'blue (corrected; said red)', 'none of these (said blue)'."""
    said = f"said {item.predicted}" if item.predicted else ""
    if not item.trainable:
        return "none of these" + (f" ({said})" if said else "")
    return f"{item.label} ({item.answer}" + (f"; {said})" if said else ")")


st.markdown("**Feedback inbox**")
filed = feedback.inbox(ds.name)
if not filed:
    st.caption(f"No photo filed for {ds.name} yet. Under a prediction on the **Demo** page, \"What is it really?\" "
               "files the photo here with its right class.")
else:
    plan = feedback.fold_plan(ds.name, store)
    st.caption(f"{len(filed)} photo(s) filed from the Demo for {ds.name}. Folding adds the labelled ones to the "
               f"train split of a new version, {plan.next_label}; {plan.dataset_label} stays as it is.")
    if plan.added:
        st.markdown(f"**Folding adds {len(plan.added)} photo(s) to train:** "
                    + ", ".join(f"{label} +{n}" for label, n in plan.added_per_class().items()))
        feedback_photos(plan.added, "datasets.fold_added")
    else:
        st.info(f"Folding would add nothing: no labelled photo that {plan.dataset_label} lacks.")
    if plan.already_in:
        st.warning(f"{len(plan.already_in)} labelled photo(s) are already in {plan.dataset_label} (perhaps under "
                   "another class); folding leaves them in the inbox.")
    if plan.not_in_any_class:
        st.caption(f"{len(plan.not_in_any_class)} photo(s) filed as none of these classes: kept here as a "
                   "record, never added to the data.")
        feedback_photos(plan.not_in_any_class, "datasets.fold_none")
    st.button(f"Fold {len(plan.added)} photo(s) into {plan.next_label}", key="datasets.fold", type="primary",
              disabled=not plan.added,
              on_click=lambda: run_import(f"the feedback inbox of {ds.name}", feedback.fold_inbox, ds.name,
                                          store=store))


@st.cache_data(show_spinner=False, max_entries=16)
def samples(data_home: str, dataset_id: str) -> dict[str, list]:
    """Up to SAMPLES_PER_CLASS manifest entries per class whose files exist (a version never changes)."""
    by_class: dict[str, list] = {}
    for e in manifest.load_manifest(dataset_id):
        chosen = by_class.setdefault(e.label, [])
        if len(chosen) < SAMPLES_PER_CLASS and Path(e.path).is_file():
            chosen.append(e)
    return by_class


st.markdown("**Samples per class**")
try:
    by_class = samples(str(home.data_home()), ds.id)
except FileNotFoundError as exc:
    st.warning(f"The images of this dataset are not in this data home: {exc}")
    by_class = {}
for label in ds.classes:
    items = by_class.get(label, [])
    if not items:
        continue
    st.caption(f"{label} · {sum(ds.counts.get(s, {}).get(label, 0) for s in ds.counts)} images")
    st.image([str(e.path) for e in items], width=96, caption=[Path(e.source).name[:18] for e in items])

# -------------------------------------------------------------------- audit

st.divider()
st.subheader("Audit")
log = fixes.change_log(ds)
if log:
    st.info(f"Fixed from **{log['parent_label']}** by {log['author']} {fmt.ago(log['at'])}"
            + (f": {log['reason']}" if log.get("reason") else "") + f" · {len(log['changes'])} change(s).")
    st.dataframe([{"image": c["source"], "change": c["action"], "from": c["old_label"], "to": c["new_label"]}
                  for c in log["changes"]], hide_index=True, key="datasets.audit.changes")
    parent_runs = [r for r in store.list_runs() if r.dataset_id == log["parent"] and r.summary is not None]
    if parent_runs:
        st.markdown(f"**Retrain** on {ds.label} with the recipe of a run on {log['parent_label']}")
        runs_by_id = {r.id: r for r in parent_runs}
        pick_run = st.selectbox("Run", list(runs_by_id), key="datasets.audit.retrain_run",
                                format_func=lambda i: f"{runs_by_id[i].name} · accuracy {runs_by_id[i].accuracy:.3f}")
        if st.button(f"Retrain on {ds.label} with the same recipe", key="datasets.audit.retrain"):
            queued = jobs.retrain_on(pick_run, ds.id, store)
            st.success(f"Queued **{queued.name}**; the Train page shows it running.")
        after_runs = [r for r in store.list_runs() if r.dataset_id == ds.id and r.summary is not None]
        if after_runs:
            after = after_runs[0]
            judged = evaluation.compare_before_after(pick_run, after.id, log["parent"], ds.id)
            st.markdown(f"**Before / after** on the {judged.images} images both runs evaluated (matched by content, "
                        f"judged by {ds.label}'s labels)")
            b1, b2, b3 = st.columns(3)
            b1.metric(f"Before: {runs_by_id[pick_run].name}", f"{judged.before_accuracy:.3f}")
            b2.metric(f"After: {after.name}", f"{judged.after_accuracy:.3f}",
                      delta=f"{judged.after_accuracy - judged.before_accuracy:+.3f}")
            b3.metric("Fixed / broken images", f"{judged.fixed} / {judged.broken}")

st.caption("Likely label errors (out-of-fold heads on the backbone features, ranked by cleanlab), "
           "near-duplicates (copies across splits first: they inflate test accuracy), outliers and a map "
           "of the images. The first audit extracts the features; later ones reuse them.")
if st.button("Run audit", key="datasets.audit.run"):
    with st.spinner("Auditing… the first audit of a dataset runs the backbone over every image."):
        try:
            state.declare_device_policy()
            audit.audit_dataset(ds.id, store=store)
        except ValueError as exc:
            st.error(f"Could not audit {ds.label}: {exc}")
report_audit = audit.saved_audit(ds.id)
if report_audit is None:
    st.stop()

ACTIONS = ["keep", "relabel", "exclude"]
cross = [d for d in report_audit.near_duplicates if d.cross_split]
a1, a2, a3, a4 = st.columns(4)
a1.metric("Likely label errors", len(report_audit.label_issues))
if report_audit.duplicate_pairs is None:  # an audit saved before copies were grouped
    a2.metric("Near-duplicate pairs (across splits)", f"{len(report_audit.near_duplicates)} ({len(cross)})")
else:
    groups = report_audit.duplicate_groups
    a2.metric("Groups of near-duplicates (across splits)", f"{len(groups)} ({sum(g.cross_split for g in groups)})",
              help=f"{report_audit.duplicate_pairs} pairs in all; the table lists the first "
                   f"{len(report_audit.near_duplicates)}, cross-split first.")
a3.metric("Outliers", len(report_audit.outliers))
a4.metric("Largest / smallest class", f"{report_audit.class_balance['ratio']}×")
st.caption(f"{report_audit.backbone} at {report_audit.image_size} px · {report_audit.images} images · "
           f"{report_audit.timings['total_s']:.1f} s")

flagged = {i.source: f"given {i.given}, looks like {i.suggested}" for i in report_audit.label_issues}
flagged.update({o.source: "outlier" for o in report_audit.outliers})
flagged.update({d.b: f"near-duplicate of {d.a}" for d in report_audit.near_duplicates})
st.plotly_chart(charts.embedding_map([dataclasses.asdict(p) for p in report_audit.embedding_map], flagged),
                key="datasets.audit.map")

st.markdown("**Fix**: choose an action per image (or for all rows of a table at once), then Apply: a new "
            "version is created and this one stays as it is.")


def action_table(title: str, rows: list[dict], key: str, default_action: str = "keep"):
    """An editable table of findings with `action` and `relabel to` columns; returns the edited rows."""
    if not rows:
        return []
    st.markdown(f"**{title}** ({len(rows)})")
    bulk = st.selectbox("Action for every row", ["(per row)", *ACTIONS], key=f"{key}.bulk")
    for row in rows:
        row["action"] = default_action if bulk == "(per row)" else bulk
    edited = st.data_editor(
        rows, key=f"{key}.{bulk}", hide_index=True, disabled=[c for c in rows[0] if c not in ("action", "relabel to")],
        column_config={"action": st.column_config.SelectboxColumn(options=ACTIONS, required=True),
                       "relabel to": st.column_config.SelectboxColumn(options=list(ds.classes))})
    return edited


label_rows = action_table("Likely label errors", [
    {"image": i.source, "split": i.split, "given": i.given, "suggested": i.suggested, "score": i.score,
     "relabel to": i.suggested} for i in report_audit.label_issues], "datasets.audit.labels")
duplicate_rows = action_table("Near-duplicates (the second image is the one acted on)", [
    {"image": d.b, "duplicate of": d.a, "splits": " / ".join(d.splits), "similarity": d.similarity,
     "relabel to": None} for d in report_audit.near_duplicates], "datasets.audit.duplicates")
outlier_rows = action_table("Outliers", [
    {"image": o.source, "split": o.split, "label": o.label, "neighbour similarity": o.score, "relabel to": None}
    for o in report_audit.outliers], "datasets.audit.outliers")

relabel = {r["image"]: r["relabel to"] for r in [*label_rows, *outlier_rows]
           if r["action"] == "relabel" and r["relabel to"]}
exclude = list(dict.fromkeys(r["image"] for r in [*label_rows, *duplicate_rows, *outlier_rows]
                             if r["action"] == "exclude"))
reason = st.text_input("Why (for the change log)", key="datasets.audit.reason", placeholder="audit of " + ds.label)
if st.button(f"Apply: relabel {len(relabel)}, exclude {len(exclude)}", key="datasets.audit.apply", type="primary",
             disabled=not (relabel or exclude)):
    try:
        fixed = fixes.fix_dataset(ds.id, relabel=relabel, exclude=exclude, reason=reason.strip(), store=store)
    except ValueError as exc:
        st.error(f"Nothing was changed: {exc}")
    else:
        st.session_state["datasets.flash"] = (
            "success", f"Created **{fixed.dataset.label}** from {ds.label}: {len(fixed.changes)} change(s). "
                       f"{ds.label} is unchanged.", None)
        st.session_state["datasets.select_next"] = fixed.dataset.id
        st.rerun()
