"""The Train form: one widget per recipe field (`TrainConfig`), presets, and Launch.

Widget keys, labels, help and choices come from the recipe's field declarations
(`tlcore.records.config.recipe_fields`): the common fields have their place in the layout below,
and a field without one is drawn under More settings by its type, so a new recipe field needs no
edit here. `widget_values` (recipe -> widgets) and `recipe_from_widgets` (widgets -> recipe) are
each other's inverse for every field.
"""

from __future__ import annotations

from typing import Any, Mapping

import streamlit as st

from tlcore.queue import jobs
from tlcore.records.config import PRESETS, TrainConfig, recipe_field_named, recipe_fields
from ui import sidebar, state

LRS = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5]
BATCHES = [8, 16, 32, 64, 128]
DEFAULT_PRESET = "fast-offline"
DEFAULTS = {f.name: f.default for f in recipe_fields()}

# Widgets of fields shown as more than one widget.
SIZE_DEFAULT, RESPLIT, SPLIT_TRAIN, SPLIT_VAL = "train.size_default", "train.resplit", "train.split_train", \
    "train.split_val"
_SAVED = "saved.train_form"


def key(field: str) -> str:
    """The widget key of recipe field `field`."""
    return f"train.{field}"


def widget_keys() -> tuple[str, ...]:
    """Every value widget of the form: the dataset, the preset, the recipe's and the LR finder's phase."""
    keys = ["train.dataset", "train.preset"]
    for field in recipe_fields():
        keys += {"image_size": [SIZE_DEFAULT, key("image_size")],
                 "split": [RESPLIT, SPLIT_TRAIN, SPLIT_VAL]}.get(field.name, [key(field.name)])
    return (*keys, "train.lr_find_finetune")


def widget_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The widgets' values for recipe `values` (field -> value; a preset over the defaults)."""
    out: dict[str, Any] = {}
    for field in recipe_fields():
        value = values[field.name]
        if field.name == "image_size":
            out[SIZE_DEFAULT] = value is None
            if value:
                out[key("image_size")] = int(value)
        elif field.name == "split":
            out[RESPLIT] = value is not None
            if value:
                out[SPLIT_TRAIN], out[SPLIT_VAL] = int(round(value[0] * 100)), int(round(value[1] * 100))
        elif field.kind is tuple:
            out[key(field.name)] = list(value)
        elif field.name == "name":
            out[key(field.name)] = value or ""
        else:
            out[key(field.name)] = value
    return out


def recipe_from_widgets(widgets: Mapping[str, Any], dataset_id: str) -> TrainConfig:
    """The recipe the widgets hold; InvalidInput (a plain sentence) when it does not fit."""
    values: dict[str, Any] = {}
    for field in recipe_fields():
        if field.name == "image_size":
            value = None if widgets[SIZE_DEFAULT] else int(widgets[key("image_size")])
        elif field.name == "split":
            value = None
            if widgets[RESPLIT]:
                tr, va = widgets[SPLIT_TRAIN], widgets[SPLIT_VAL]
                value = (tr / 100, va / 100, round(1 - tr / 100 - va / 100, 6))
        elif field.name == "name":
            value = (widgets.get(key("name")) or "").strip() or None
        elif field.kind is tuple:
            value = tuple(widgets[key(field.name)])
        else:
            value = widgets[key(field.name)]
            value = value if value is None else field.kind(value)
        values[field.name] = value
    return TrainConfig(dataset=dataset_id, **values)


def form_recipe(dataset_id: str) -> TrainConfig:
    return recipe_from_widgets(st.session_state, dataset_id)


def apply_preset() -> None:
    """Copy the chosen preset (over TrainConfig's defaults) into the form's widgets."""
    name = st.session_state.get("train.preset")
    if name not in PRESETS:
        return
    st.session_state.update(widget_values({**DEFAULTS, **PRESETS[name]}))
    st.session_state.setdefault(SPLIT_TRAIN, 70)
    st.session_state.setdefault(SPLIT_VAL, 15)


def keep_values() -> None:
    """Keep the form's values while the user is on other pages.

    Streamlit forgets a widget's value after a run that does not draw it (any other page);
    re-assigning the keys on every page keeps the user's recipe, and a copy under a non-widget
    key restores them when a page switch cleared them before this ran.
    """
    saved = st.session_state.setdefault(_SAVED, {})
    for name in widget_keys():
        if name in st.session_state:
            saved[name] = st.session_state[name]
        if name in saved:
            st.session_state[name] = saved[name]


@st.cache_data(ttl=60, show_spinner="Reading the backbone registry…")
def backbones() -> dict[str, dict]:
    """The registry as plain records by name (no Keras: the page paints without importing TensorFlow)."""
    from tlcore.backbones import list_backbones

    return {spec.name: {"name": spec.name, "display_name": spec.display_name, "default_size": spec.default_size,
                        "min_size": spec.min_size, "weights_available": bool(spec.weights_available()),
                        "weights_origin": spec.weights_origin, "license": spec.license,
                        "imagenet_top1": spec.imagenet_top1, "params_m": spec.params_m, "offline": spec.offline}
            for spec in list_backbones()}


# ------------------------------------------------------------------ drawing

def _field(name: str):
    return recipe_field_named(name)


def _widget(draw, name: str, *args, **kwargs):
    """`draw(label, *args, key=..., help=...)` for recipe field `name`, with its label and help."""
    field = _field(name)
    kwargs.setdefault("help", field.help)
    return draw(field.label, *args, key=key(name), **kwargs)


# The fields the layout places; every other field is drawn by `_by_type` under More settings.
PLACED = ("backbone", "weights", "image_size", "head_epochs", "finetune_epochs", "finetune_layers", "lr",
          "batch_size", "augment", "head_augment", "dropout", "early_stopping_patience", "finetune_lr_scale",
          "finetune_views", "finetune_result", "seed", "batch_scope", "mixed_precision", "xla", "class_weight",
          "head_search", "tta", "split", "name")


def draw_start(datasets: list, specs: dict[str, dict]) -> str:
    """The dataset, the preset, the backbone and the schedule; returns the chosen dataset's id."""
    if key("backbone") not in st.session_state:
        st.session_state["train.preset"] = DEFAULT_PRESET
        apply_preset()
    state.keep_choice(key("backbone"), specs)
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

    backbone = _widget(st.selectbox, "backbone", list(specs), format_func=backbone_label, help=None)
    spec = specs[backbone]
    top1 = f"ImageNet top-1 {spec['imagenet_top1']:.1%} · " if spec["imagenet_top1"] else ""
    st.caption(f"{top1}{spec['params_m']:.1f} M params · weights: {spec['weights_origin']} · {spec['license']}")
    weights = _widget(st.radio, "weights", _field("weights").choices, horizontal=True, help=None,
                      format_func=lambda w: "ImageNet (transfer)" if w == "imagenet" else "none (from scratch)")
    if weights == "imagenet" and not spec["weights_available"]:
        st.warning(f"{spec['display_name']}'s ImageNet weights are not on this server yet. The worker "
                   "downloads them on first use; without internet the run fails and says which file to "
                   "drop in the weights folder. EfficientNet-Lite0 works offline.")

    # Checkboxes get whole lines: in a half column their labels were cut off.
    st.checkbox(f"Backbone's size ({spec['default_size']} px)", key=SIZE_DEFAULT)
    st.session_state.setdefault(key("image_size"), spec["default_size"])
    c1, c2 = st.columns(2)
    _widget(c1.number_input, "image_size", min_value=32, max_value=1024, step=16, help=None,
            disabled=st.session_state[SIZE_DEFAULT])

    c1, c2, c3 = st.columns(3)
    _widget(c1.number_input, "head_epochs", 0, 500)
    _widget(c2.number_input, "finetune_epochs", 0, 500)
    _widget(c3.number_input, "finetune_layers", 0, 1000)
    c1, c2 = st.columns(2)
    # A suggestion from the LR finder (or a preset's rate) joins the usual rates.
    rates = sorted({*LRS, float(st.session_state[key("lr")])}, reverse=True)
    _widget(c1.select_slider, "lr", rates, format_func=lambda v: f"{v:g}", help=None)
    per_replica = st.session_state.get(key("batch_scope"), "replica") == "replica"
    batches = sorted({*BATCHES, int(st.session_state[key("batch_size")])})
    c2.selectbox("Batch size per GPU" if per_replica else "Batch size (global)", batches, key=key("batch_size"),
                 help="Images per training step on each GPU (replica): with 4 GPUs a step sees 4 × this many. "
                      "Change it to a global batch split across the GPUs under More settings." if per_replica
                 else "Images per training step across all GPUs, split evenly between them.")
    return dataset_id


def draw_rest() -> None:
    """Augmentation, More settings (every field the layout does not place, too), Launch."""
    _widget(st.multiselect, "augment", list(_field("augment").choices))
    with st.expander("More settings"):
        _widget(st.checkbox, "head_augment", help=None)
        c1, c2 = st.columns(2)
        _widget(c1.slider, "dropout", 0.0, 0.8, step=0.05)
        _widget(c1.number_input, "early_stopping_patience", 0, 100)
        _widget(c2.number_input, "finetune_lr_scale", 0.001, 1.0, step=0.05, format="%.3f")
        _widget(c2.number_input, "finetune_views", 0, 16)
        _widget(c1.radio, "finetune_result", _field("finetune_result").choices, horizontal=True)
        _widget(c1.number_input, "seed", 0, 2**31 - 1, help=None)
        _widget(c2.radio, "batch_scope", _field("batch_scope").choices, horizontal=True,
                format_func=lambda v: "per GPU (replica)" if v == "replica" else "globally")
        _widget(c1.selectbox, "mixed_precision", _field("mixed_precision").choices)
        _widget(c2.selectbox, "xla", _field("xla").choices)
        _widget(c2.radio, "class_weight", _field("class_weight").choices, horizontal=True)
        _widget(c1.radio, "head_search", _field("head_search").choices, horizontal=True)
        _widget(c2.radio, "tta", _field("tta").choices, horizontal=True,
                format_func=lambda m: "flip (image + mirror averaged)" if m == "flip" else "none")
        for field in recipe_fields():
            if field.name not in PLACED:
                _by_type(field)
        st.checkbox(_field("split").label, key=RESPLIT, help="Only for datasets imported without given splits; "
                                                             "a given layout is always kept.")
        if st.session_state[RESPLIT]:
            st.session_state.setdefault(SPLIT_TRAIN, 70)
            st.session_state.setdefault(SPLIT_VAL, 15)
            c1, c2 = st.columns(2)
            tr = c1.number_input("Train %", 10, 95, key=SPLIT_TRAIN)
            va = c2.number_input("Val %", 0, 90, key=SPLIT_VAL)
            st.caption(f"Test: {max(0, 100 - tr - va)} %")
        _widget(st.text_input, "name", placeholder="a name is made for you", help=None)


def _by_type(field) -> None:
    """A widget for a recipe field the layout does not place, chosen by the field's type."""
    st.session_state.setdefault(key(field.name), field.default)
    if field.kind is bool:
        _widget(st.checkbox, field.name)
    elif field.kind is tuple:
        _widget(st.multiselect, field.name, list(field.choices))
    elif field.choices:
        _widget(st.selectbox, field.name, field.choices)
    elif field.kind in (int, float):
        _widget(st.number_input, field.name, step=1 if field.kind is int else None)
    else:
        _widget(st.text_input, field.name)


# ------------------------------------------------------------------ launching

def draw_launch(store, dataset_id: str) -> None:
    st.checkbox("Start the worker if it is not running", value=True, key="train.autostart")
    st.button("Train", key="train.launch", type="primary", icon=":material/rocket_launch:",
              on_click=_launch, args=(store, dataset_id), width="stretch")


def _launch(store, dataset_id: str) -> None:
    try:
        run = jobs.submit(form_recipe(dataset_id), store=store)
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


def draw_flash() -> None:
    """What Launch (or a sweep's launch) did, once."""
    flash = st.session_state.pop("train.flash", None)
    if flash:
        (st.error if flash[0] == "error" else st.success)(flash[1])

