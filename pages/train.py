"""Train: a form that maps onto `TrainConfig`, presets, Launch (queues a job), and the live run.

The run trains in the worker process; this page only queues it and polls the store, so
leaving, refreshing or opening the page elsewhere shows the same live run (`?run=<id>`).
"""

import dataclasses

import streamlit as st

from tlcore.data import builtin
from tlcore.queue import jobs, sweeps
from tlcore.records.config import (
    AUGMENTATIONS,
    CLASS_WEIGHTS,
    HEAD_SEARCH_MODES,
    PRESETS,
    SWITCHES,
    TTA_MODES,
    TrainConfig,
)
from tlcore.records.store import RunStatus
from tlcore.train import lr_finder
from ui import charts, frame, sidebar, state
from ui import format as fmt

frame.require()

store = state.store()

LRS = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5]
BATCHES = [8, 16, 32, 64, 128]
DEFAULT_PRESET = "fast-offline"
FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


@st.cache_data(ttl=60, show_spinner="Reading the backbone registry…")
def backbones() -> list[dict]:
    """The registry as plain records (no Keras: the page paints without importing TensorFlow)."""
    from tlcore.backbones import list_backbones

    out = []
    for spec in list_backbones():
        out.append({"name": spec.name, "display_name": spec.display_name, "default_size": spec.default_size,
                    "min_size": spec.min_size, "weights_available": bool(spec.weights_available()),
                    "weights_origin": spec.weights_origin, "license": spec.license,
                    "imagenet_top1": spec.imagenet_top1, "params_m": spec.params_m, "offline": spec.offline})
    return out


def apply_preset() -> None:
    """Copy the chosen preset (over TrainConfig's defaults) into the form's widgets."""
    name = st.session_state.get("train.preset")
    if name not in PRESETS:
        return
    values = {**DEFAULTS, **PRESETS[name]}
    ss = st.session_state
    ss["train.backbone"] = values["backbone"]
    ss["train.weights"] = values["weights"]
    ss["train.size_default"] = values["image_size"] is None
    if values["image_size"]:
        ss["train.image_size"] = int(values["image_size"])
    ss["train.head_epochs"] = int(values["head_epochs"])
    ss["train.finetune_epochs"] = int(values["finetune_epochs"])
    ss["train.finetune_layers"] = int(values["finetune_layers"])
    ss["train.lr"] = min(LRS, key=lambda lr: abs(lr - values["lr"]))
    ss["train.finetune_lr_scale"] = float(values["finetune_lr_scale"])
    ss["train.augment"] = list(values["augment"])
    ss["train.head_augment"] = bool(values["head_augment"])
    ss["train.batch_size"] = int(values["batch_size"]) if values["batch_size"] in BATCHES else 32
    ss["train.dropout"] = float(values["dropout"])
    ss["train.patience"] = int(values["early_stopping_patience"])
    ss["train.seed"] = int(values["seed"])
    ss["train.batch_scope"] = values["batch_scope"]
    ss["train.mixed_precision"] = values["mixed_precision"]
    ss["train.xla"] = values["xla"]
    ss["train.class_weight"] = values["class_weight"]
    ss["train.tta"] = values["tta"]
    ss["train.head_search"] = values["head_search"]
    split = values.get("split")
    ss["train.resplit"] = split is not None
    ss.setdefault("train.split_train", 70)
    ss.setdefault("train.split_val", 15)
    if split:
        ss["train.split_train"], ss["train.split_val"] = int(round(split[0] * 100)), int(round(split[1] * 100))


def form_config(dataset_id: str) -> TrainConfig:
    """The form's values as a TrainConfig; ValueError (a plain sentence) when they don't fit."""
    ss = st.session_state
    split = None
    if ss["train.resplit"]:
        tr, va = ss["train.split_train"], ss["train.split_val"]
        split = (tr / 100, va / 100, round(1 - tr / 100 - va / 100, 6))
    values = dict(
        dataset=dataset_id,
        backbone=ss["train.backbone"],
        weights=ss["train.weights"],
        image_size=None if ss["train.size_default"] else int(ss["train.image_size"]),
        head_epochs=int(ss["train.head_epochs"]),
        finetune_epochs=int(ss["train.finetune_epochs"]),
        finetune_layers=int(ss["train.finetune_layers"]),
        augment=tuple(ss["train.augment"]),
        head_augment=bool(ss["train.head_augment"]),
        lr=float(ss["train.lr"]),
        finetune_lr_scale=float(ss["train.finetune_lr_scale"]),
        batch_size=int(ss["train.batch_size"]),
        batch_scope=ss["train.batch_scope"],
        mixed_precision=ss["train.mixed_precision"],
        xla=ss["train.xla"],
        dropout=float(ss["train.dropout"]),
        early_stopping_patience=int(ss["train.patience"]),
        seed=int(ss["train.seed"]),
        class_weight=ss["train.class_weight"],
        tta=ss["train.tta"],
        head_search=ss["train.head_search"],
        split=split,
        name=(ss.get("train.name") or "").strip() or None,
    )
    # Only the fields this engine's TrainConfig has (the form may know a few more).
    return TrainConfig(**{k: v for k, v in values.items() if k in FIELDS})


def find_lr(dataset_id: str) -> None:
    """The LR range test for the form's recipe; its curve and suggestion are kept for the chart."""
    ss = st.session_state
    phase = "finetune" if ss.get("train.lr_find_finetune") else "head"
    ss.pop("train.lr_finding", None)
    try:
        config = form_config(dataset_id)
        with st.spinner("Learning-rate range test" + (" through the top layers (a minute or more on CPU)…"
                                                      if phase == "finetune" else " on cached features…")):
            state.declare_device_policy()
            finding = lr_finder.find_lr(config, store, phase=phase)
    except ValueError as exc:
        ss["train.lr_error"] = f"No learning rate found: {exc}"
        return
    except Exception as exc:  # noqa: BLE001 - in words, never a traceback
        ss["train.lr_error"] = f"No learning rate found: {type(exc).__name__}: {exc}"
        return
    ss["train.lr_finding"] = finding.to_dict()


def use_found_lr() -> None:
    """Fill the form with the suggestion: the head rate, or the fine-tune scale for a fine-tune test."""
    ss = st.session_state
    finding = ss["train.lr_finding"]
    suggested = float(f"{finding['suggested_lr']:.2g}")
    if finding["phase"] == "head":
        ss["train.lr"] = suggested
    else:
        ss["train.finetune_lr_scale"] = min(1.0, max(0.001, round(suggested / ss["train.lr"], 3)))
    ss["train.preset"] = "custom"


def launch(dataset_id: str) -> None:
    try:
        config = form_config(dataset_id)
        run = jobs.submit(config, store=store)
    except ValueError as exc:
        st.session_state["train.flash"] = ("error", f"Not launched: {exc}")
        return
    except Exception as exc:  # noqa: BLE001 - in words, never a traceback
        st.session_state["train.flash"] = ("error", f"Not launched: {type(exc).__name__}: {exc}")
        return
    st.session_state["train.flash"] = ("success", f"Queued **{run.name}**." + autostart())
    st.session_state["train.watch"] = run.id
    st.query_params["run"] = run.id


def autostart() -> str:
    """Start the worker if asked and needed; one sentence on what happened (or nothing)."""
    status = sidebar.worker_status()
    if not st.session_state.get("train.autostart", True) or (status is not None and status.alive):
        return ""
    try:
        pid = sidebar.start_worker_process()
    except Exception as exc:  # noqa: BLE001
        return f" The worker did not start ({exc}); start it from the sidebar."
    return f" Started the worker (pid {pid}); it picks the runs up in a moment."


def launch_sweep(dataset_id: str) -> None:
    """Queue the form's recipe over the chosen backbones × learning rates × seeds as one sweep."""
    ss = st.session_state
    try:
        base = form_config(dataset_id).to_dict()
        fixed = {k: v for k, v in base.items() if k not in ("dataset", "name", "backbone", "lr", "seed")}
        swept = {"backbone": list(ss["train.sweep_backbones"]) or [base["backbone"]],
                 "lr": sweeps.parse_values("lr", ss["train.sweep_lrs"])}
        queued = sweeps.submit_sweep(dataset_id, swept, sweeps.parse_values("seed", ss["train.sweep_seeds"]),
                                     fixed=fixed, store=store)
    except ValueError as exc:
        ss["train.flash"] = ("error", f"Sweep not launched: {exc}")
        return
    except Exception as exc:  # noqa: BLE001 - in words, never a traceback
        ss["train.flash"] = ("error", f"Sweep not launched: {type(exc).__name__}: {exc}")
        return
    ss["train.flash"] = ("success", f"Queued sweep **{queued.sweep_id}**: {len(queued.runs)} runs. "
                                    "Compare shows it grouped by configuration." + autostart())
    ss["train.sweep_launched"] = queued.sweep_id
    ss["train.watch"] = queued.runs[0].id
    st.query_params["run"] = queued.runs[0].id


# ------------------------------------------------------------------ the form

st.title("Train")
datasets = store.list_datasets()
if not datasets:
    st.info("There is no dataset yet. Import one first — the built-in offline sets need no internet.")
    if builtin.BUILTIN:
        name = next(iter(builtin.BUILTIN))
        if st.button(f"Import the built-in '{name}' dataset", key="train.import_builtin", type="primary"):
            with st.spinner(f"Importing {name}…"):
                try:
                    builtin.import_builtin(name, store=store)
                except Exception as exc:  # noqa: BLE001
                    st.error(f"The built-in dataset could not be imported: {exc}")
                else:
                    st.rerun()
    st.page_link("pages/datasets.py", label="Go to Datasets", icon=":material/photo_library:")
    st.stop()

if "train.backbone" not in st.session_state:
    st.session_state["train.preset"] = DEFAULT_PRESET
    apply_preset()

specs = {b["name"]: b for b in backbones()}
state.keep_choice("train.backbone", specs)

form_col, live_col = st.columns([2, 3], gap="large")

with form_col:
    st.subheader("New run")
    by_id = {d.id: d for d in datasets}
    state.keep_choice("train.dataset", by_id)
    dataset_id = st.selectbox("Dataset", list(by_id), key="train.dataset",
                              format_func=lambda i: f"{by_id[i].label} · {len(by_id[i].classes)} classes · "
                                                    f"{by_id[i].num_images} images")
    st.selectbox("Preset", [*PRESETS, "custom"], key="train.preset", on_change=apply_preset,
                 help="fast-offline: EfficientNet-Lite0, head only, no internet needed. "
                      "lite0-finetune: adds a short fine-tune with augmentation. "
                      "seed-vgg16: the seed project's VGG16 recipe (needs its ImageNet weights).")

    def backbone_label(name: str) -> str:
        b = specs[name]
        mark = "weights offline ✓" if b["offline"] else ("weights cached ✓" if b["weights_available"]
                                                         else "weights need internet")
        return f"{b['display_name']} · {mark}"

    backbone = st.selectbox("Backbone", list(specs), key="train.backbone", format_func=backbone_label)
    spec = specs[backbone]
    top1 = f"ImageNet top-1 {spec['imagenet_top1']:.1%} · " if spec["imagenet_top1"] else ""
    st.caption(f"{top1}{spec['params_m']:.1f} M params · weights: {spec['weights_origin']} · {spec['license']}")
    weights = st.radio("Weights", ["imagenet", "none"], key="train.weights", horizontal=True,
                       format_func=lambda w: "ImageNet (transfer)" if w == "imagenet" else "none (from scratch)")
    if weights == "imagenet" and not spec["weights_available"]:
        st.warning(f"{spec['display_name']}'s ImageNet weights are not on this server yet. The worker "
                   "downloads them on first use; without internet the run fails and says which file to "
                   "drop in the weights folder. EfficientNet-Lite0 works offline.")

    # Checkboxes get whole lines: in a half column their labels were cut off.
    st.checkbox(f"Backbone's size ({spec['default_size']} px)", key="train.size_default")
    if "train.image_size" not in st.session_state:
        st.session_state["train.image_size"] = spec["default_size"]
    c1, c2 = st.columns(2)
    c1.number_input("Image size (px)", min_value=32, max_value=1024, step=16, key="train.image_size",
                    disabled=st.session_state["train.size_default"])

    c1, c2, c3 = st.columns(3)
    c1.number_input("Head epochs", 0, 500, key="train.head_epochs",
                    help="Phase 1: backbone frozen, only the new classifier head trains.")
    c2.number_input("Fine-tune epochs", 0, 500, key="train.finetune_epochs",
                    help="Phase 2: the top of the backbone trains too, at a lower learning rate.")
    c3.number_input("Fine-tune depth", 0, 1000, key="train.finetune_layers",
                    help="Layers from the top of the backbone unfrozen in phase 2.")
    c1, c2 = st.columns(2)
    # A suggestion from the LR finder joins the usual rates.
    rates = sorted({*LRS, float(st.session_state["train.lr"])}, reverse=True)
    c1.select_slider("Learning rate", rates, key="train.lr", format_func=lambda v: f"{v:g}")
    per_replica = st.session_state.get("train.batch_scope", "replica") == "replica"
    c2.selectbox("Batch size per GPU" if per_replica else "Batch size (global)", BATCHES, key="train.batch_size",
                 help="Images per training step on each GPU (replica): with 4 GPUs a step sees 4 × this many. "
                      "Change it to a global batch split across the GPUs under More settings." if per_replica
                 else "Images per training step across all GPUs, split evenly between them.")
    st.button("Find a learning rate", key="train.lr_find", icon=":material/query_stats:", on_click=find_lr,
              args=(dataset_id,), help="An exponential learning-rate range test: seconds on the cached backbone "
                                       "features (the first time extracts them).")
    st.checkbox("Through the top layers (fine-tune rate)", key="train.lr_find_finetune",
                help="Test the fine-tune phase instead: slower, it trains the backbone's top layers on pixels.")
    lr_error = st.session_state.pop("train.lr_error", None)
    if lr_error:
        st.error(lr_error)
    finding = st.session_state.get("train.lr_finding")
    if finding:
        which = "head" if finding["phase"] == "head" else "fine-tune"
        st.plotly_chart(charts.lr_finder_curve(finding["curve"], finding["suggested_lr"]), key="train.lr_curve",
                        config={"displayModeBar": False})
        st.caption(f"Suggested {which} rate **{finding['suggested_lr']:.2g}**: a tenth of where the smoothed loss "
                   f"is lowest ({finding['min_loss_lr']:.2g}); {len(finding['curve'])} steps in "
                   f"{finding['seconds']:.1f} s.")
        st.button(f"Use {finding['suggested_lr']:.2g}", key="train.lr_use", on_click=use_found_lr,
                  icon=":material/check:")
    st.multiselect("Augmentation", list(AUGMENTATIONS), key="train.augment",
                   help="Random transforms of training images in the fine-tune phase. A flip also reaches "
                        "the cached head phase: the mirrored images' features are cached too.")
    with st.expander("More settings"):
        st.checkbox("Augment in the head phase too (features then cannot be cached; slower)",
                    key="train.head_augment")
        c1, c2 = st.columns(2)
        c1.slider("Dropout", 0.0, 0.8, step=0.05, key="train.dropout")
        c1.number_input("Early-stopping patience (epochs)", 0, 100, key="train.patience")
        c2.number_input("Fine-tune LR scale", 0.001, 1.0, step=0.05, format="%.3f", key="train.finetune_lr_scale")
        c1.number_input("Seed", 0, 2**31 - 1, key="train.seed")
        c2.radio("Batch size counts", ["replica", "global"], key="train.batch_scope", horizontal=True,
                 format_func=lambda v: "per GPU (replica)" if v == "replica" else "globally",
                 help="Per GPU (default): the global batch grows with the number of GPUs. Globally: the batch "
                      "size is split across them.")
        c1.selectbox("Mixed precision", SWITCHES, key="train.mixed_precision",
                     help="float16 compute with float32 weights. auto: on with a GPU, off on the CPU. The saved "
                          "model always computes in float32.")
        c2.selectbox("XLA compilation", SWITCHES, key="train.xla",
                     help="auto: on with exactly one GPU; off with several (it does not work under "
                          "MirroredStrategy) and on the CPU.")
        c2.radio("Class weighting", CLASS_WEIGHTS, key="train.class_weight", horizontal=True,
                 help="auto: the head is fitted both ways on the cached features and the better validation "
                      "macro F1 is kept (a tie keeps none). balanced: a rare class's images weigh more in the "
                      "loss (both phases), so a small class is not ignored. none: every image weighs the same.")
        c1.radio("Head search", HEAD_SEARCH_MODES, key="train.head_search", horizontal=True,
                 help="auto: with a validation split, the head tries a small fixed grid (learning rate, dropout, "
                      "label smoothing, class weighting) on the cached features, keeps the best on validation "
                      "macro F1 and fine-tunes with its settings. off: the settings above only.")
        c2.radio("Evaluation TTA", TTA_MODES, key="train.tta", horizontal=True,
                 format_func=lambda m: "flip (image + mirror averaged)" if m == "flip" else "none",
                 help="Test-time augmentation: twice the prediction cost. The Demo and predict then use it "
                      "for this run too.")
        st.checkbox("Re-split the dataset (train / val / test)", key="train.resplit",
                    help="Only for datasets imported without given splits; a given layout is always kept.")
        if st.session_state["train.resplit"]:
            st.session_state.setdefault("train.split_train", 70)
            st.session_state.setdefault("train.split_val", 15)
            c1, c2 = st.columns(2)
            tr = c1.number_input("Train %", 10, 95, key="train.split_train")
            va = c2.number_input("Val %", 0, 90, key="train.split_val")
            st.caption(f"Test: {max(0, 100 - tr - va)} %")
        st.text_input("Run name (optional)", key="train.name", placeholder="a name is made for you")
    st.checkbox("Start the worker if it is not running", value=True, key="train.autostart")
    st.button("Train", key="train.launch", type="primary", icon=":material/rocket_launch:",
              on_click=launch, args=(dataset_id,), width="stretch")
    with st.expander("Sweep: several backbones × learning rates × seeds"):
        st.caption("Queues this recipe once per combination, as one sweep. The local worker trains them one "
                   "by one; a worker on a Ray cluster trains as many at once as the cluster fits.")
        st.multiselect("Backbones", list(specs), default=[backbone], key="train.sweep_backbones",
                       format_func=lambda n: specs[n]["display_name"])
        c1, c2 = st.columns(2)
        c1.text_input("Learning rates", "1e-3,3e-4", key="train.sweep_lrs", help="a comma list")
        c2.text_input("Seeds", "0,1,2", key="train.sweep_seeds", help="a comma list")
        st.button("Launch sweep", key="train.sweep_launch", icon=":material/grid_view:", on_click=launch_sweep,
                  args=(dataset_id,), width="stretch")
    flash = st.session_state.pop("train.flash", None)
    if flash:
        (st.error if flash[0] == "error" else st.success)(flash[1])
    launched = st.session_state.get("train.sweep_launched")
    if launched:
        st.page_link("pages/compare.py", label=f"Compare sweep {launched}", icon=":material/compare_arrows:",
                     query_params={"sweep": launched})


# -------------------------------------------------------------- the live run

def run_panel(run_id: str, live: bool = False) -> None:
    try:
        run = store.get_run(run_id)
    except KeyError:
        st.warning(f"There is no run {run_id!r} in this data home.")
        return
    if live and run.status.is_terminal:
        st.rerun()  # the whole page: stop polling, show the finished run and its new status
    st.markdown(f"**{run.name}** · {fmt.STATUS_ICON[run.status]} · {run.backbone} · "
                f"created {fmt.ago(run.created_at)}")
    if run.executor:
        st.caption(f"Ran on: {run.executor.describe()}" if run.status.is_terminal
                   else f"Running on: {run.executor.describe()}")
    if run.status in (RunStatus.QUEUED, RunStatus.RUNNING):
        st.progress(fmt.progress_fraction(run), text=fmt.progress_text(run))
        c1, c2 = st.columns([1, 3])
        if run.cancel_requested:
            c2.caption("Cancel requested: the worker stops after the current batch.")
        elif c1.button("Cancel", key="train.cancel", icon=":material/stop:"):
            try:
                jobs.cancel(run.id, store=store)
            except (KeyError, ValueError) as exc:
                st.warning(str(exc))
            st.rerun(scope="fragment")
        status = sidebar.worker_status()
        if run.status == RunStatus.QUEUED and status is not None and not status.alive:
            st.warning("This run waits for the worker, which is not running.")
            sidebar.start_worker("train.start_worker")
    elif run.status == RunStatus.SUCCEEDED:
        # Two by two: four metrics in this half of the page cut their labels and values off.
        m1, m2 = st.columns(2)
        m3, m4 = st.columns(2)
        on_val = run.summary.eval_split == "val"
        m1.metric("Validation accuracy" if on_val else "Test accuracy", fmt.pct(run.accuracy))
        m2.metric("Macro F1", fmt.pct(run.macro_f1))
        metrics = run.summary.metrics
        m3.metric("Smallest class recall", fmt.pct(metrics.smallest_class_recall),
                  help=f"Recall of {metrics.smallest_class}, the class with the fewest evaluation images"
                  if metrics.smallest_class else "Not recorded for this run")
        m4.metric("Took", fmt.duration(fmt.run_duration(run)))
        if on_val:
            st.caption("The dataset has no test split, so these are on the validation split, which also chose "
                       "the early-stopping epoch: expect new photos to score a little lower.")
        if metrics.tta != "none":
            st.caption(f"Evaluated with {metrics.tta} TTA; the Demo and predict use it too.")
        if run.summary.device_record:
            st.caption(f"Trained on {run.summary.device_record.describe()}.")
        head_choice(run.summary)
        l1, l2 = st.columns(2)
        l1.page_link("pages/errors.py", label="See its errors", icon=":material/error:", query_params={"run": run.id})
        l2.page_link("pages/demo.py", label="Try it in the demo", icon=":material/photo_camera:",
                     query_params={"run": run.id})
    elif run.status == RunStatus.FAILED:
        st.error(f"This run failed: {run.error or 'no reason was recorded.'}")
        if st.button("Resume from its last checkpoint", key="train.resume"):
            try:
                new = jobs.resume(run.id, store=store)
            except (KeyError, ValueError) as exc:
                st.warning(str(exc))
            else:
                st.session_state["train.watch"] = new.id
                st.query_params["run"] = new.id
                st.rerun()
    else:
        st.warning(f"This run was cancelled. {run.error or ''}")

    epochs = store.epochs(run.id)
    if epochs:
        records = [{"step": e.step, "phase": e.phase, "metrics": e.metrics} for e in epochs]
        head = sum(1 for e in epochs if e.phase == "head")
        boundary = head if 0 < head < len(epochs) else None
        st.plotly_chart(charts.run_curves(records, boundary), key="train.curves",
                        config={"displayModeBar": False})
        st.caption(f"{len(epochs)} epoch(s) logged.")
    elif not run.status.is_terminal:
        st.caption("Curves appear here after the first epoch.")
    logs = store.logs(run.id, tail=8)
    if logs:
        with st.expander("Log (last lines)", expanded=run.status == RunStatus.FAILED):
            st.code("\n".join(line.message for line in logs), language=None)


def head_choice(summary) -> None:
    """What the head chose on the cached features (class weighting, search trials) and whether the
    fine-tune was kept."""
    search = summary.head_search
    if search and search.class_weight:
        st.caption(search.class_weight.describe())
    elif summary.class_weight:
        st.caption(f"Class weighting: {summary.class_weight}.")
    if summary.finetune:
        caption = st.warning if summary.finetune.kept == "head" else st.caption
        caption(summary.finetune.describe())
    if search and len(search.trials) > 2:
        chosen = search.trials[search.chosen]
        with st.expander(f"Head search: {len(search.trials)} trials, kept {chosen.settings()}"):
            st.dataframe(
                [{"kept": "✓" if k == search.chosen else "", "lr": t.lr, "dropout": t.dropout,
                  "label smoothing": t.label_smoothing, "class weight": t.class_weight,
                  "val macro F1": round(t.val_macro_f1, 4), "val accuracy": round(t.val_accuracy, 4),
                  "best epoch": t.best_epoch, "epochs": t.epochs}
                 for k, t in sorted(enumerate(search.trials), key=lambda kt: -kt[1].val_macro_f1)],
                hide_index=True, key="train.head_trials")
            st.caption(f"All trials trained at once on the cached features in {search.seconds or 0:.1f} s; the "
                       "weaker half stopped after every few epochs, each trial also on its own early stop. "
                       "The fine-tune continued with the kept settings.")


@st.fragment(run_every=2)
def live_panel(run_id: str) -> None:
    run_panel(run_id, live=True)


static_panel = st.fragment(run_panel)

with live_col:
    st.subheader("Run")
    recent = store.list_runs(limit=50)
    if not recent:
        st.info("No runs yet. Choose a dataset and a preset, then press **Train**.")
    else:
        by_run = {r.id: r for r in recent}
        wanted = st.query_params.get("run")
        if wanted and wanted not in by_run:
            try:
                extra = store.get_run(wanted)
                by_run[extra.id] = extra
                wanted = extra.id
            except KeyError:
                st.warning(f"The link names a run ({wanted!r}) that is not in this data home.")
                wanted = None
        # A new ?run= (a shared link, a page link, a refresh) chooses the run shown.
        if wanted and wanted != st.session_state.get("train.url_seen"):
            st.session_state["train.watch"] = wanted
        active = [r for r in recent if r.status in (RunStatus.RUNNING, RunStatus.QUEUED)]
        state.keep_choice("train.watch", by_run, default=(active[-1] if active else recent[0]).id)
        # Names only: Streamlit keeps showing a keyed selectbox's old label when its text changes,
        # so a status in the label would read "running" after the run finished (shown below instead).
        watch = st.selectbox("Watch run", list(by_run), key="train.watch", format_func=lambda i: by_run[i].name)
        st.query_params["run"] = watch
        st.session_state["train.url_seen"] = watch
        if by_run[watch].status.is_terminal:
            static_panel(watch)
        else:
            live_panel(watch)
