"""The Train form's learning-rate finder: run the range test for the form's recipe, draw its curve,
and fill the form with the suggestion."""

from __future__ import annotations

import streamlit as st

from tlcore.train import lr_finder
from ui import charts, state, train_form


def draw(store, dataset_id: str) -> None:
    st.button("Find a learning rate", key="train.lr_find", icon=":material/query_stats:", on_click=_find,
              args=(store, dataset_id), help="An exponential learning-rate range test: seconds on the cached "
                                             "backbone features (the first time extracts them).")
    st.checkbox("Through the top layers (fine-tune rate)", key="train.lr_find_finetune",
                help="Test the fine-tune phase instead: slower, it trains the backbone's top layers on pixels.")
    error = st.session_state.pop("train.lr_error", None)
    if error:
        st.error(error)
    finding = st.session_state.get("train.lr_finding")
    if finding:
        which = "head" if finding["phase"] == "head" else "fine-tune"
        st.plotly_chart(charts.lr_finder_curve(finding["curve"], finding["suggested_lr"]), key="train.lr_curve",
                        config={"displayModeBar": False})
        st.caption(f"Suggested {which} rate **{finding['suggested_lr']:.2g}**: a tenth of where the smoothed loss "
                   f"is lowest ({finding['min_loss_lr']:.2g}); {len(finding['curve'])} steps in "
                   f"{finding['seconds']:.1f} s.")
        st.button(f"Use {finding['suggested_lr']:.2g}", key="train.lr_use", on_click=_use_found,
                  icon=":material/check:")


def _find(store, dataset_id: str) -> None:
    """The LR range test for the form's recipe; its curve and suggestion are kept for the chart."""
    ss = st.session_state
    phase = "finetune" if ss.get("train.lr_find_finetune") else "head"
    ss.pop("train.lr_finding", None)
    try:
        config = train_form.form_recipe(dataset_id)
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


def _use_found() -> None:
    """Fill the form with the suggestion: the head rate, or the fine-tune scale for a fine-tune test."""
    ss = st.session_state
    finding = ss["train.lr_finding"]
    suggested = float(f"{finding['suggested_lr']:.2g}")
    if finding["phase"] == "head":
        ss[train_form.key("lr")] = suggested
    else:
        ss[train_form.key("finetune_lr_scale")] = min(1.0, max(0.001, round(suggested / ss[train_form.key("lr")],
                                                                             3)))
    ss["train.preset"] = "custom"
