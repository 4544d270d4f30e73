"""The Train page's sweep: the form's recipe over several backbones × learning rates × seeds."""

from __future__ import annotations

import streamlit as st

from tlcore.queue import sweeps
from ui import train_form


def draw(store, dataset_id: str, specs: dict[str, dict]) -> None:
    with st.expander("Sweep: several backbones × learning rates × seeds"):
        st.caption("Queues this recipe once per combination, as one sweep. The local worker trains them one "
                   "by one; a worker on a Ray cluster trains as many at once as the cluster fits.")
        st.multiselect("Backbones", list(specs), default=[st.session_state[train_form.key("backbone")]],
                       key="train.sweep_backbones", format_func=lambda n: specs[n]["display_name"])
        c1, c2 = st.columns(2)
        c1.text_input("Learning rates", "1e-3,3e-4", key="train.sweep_lrs", help="a comma list")
        c2.text_input("Seeds", "0,1,2", key="train.sweep_seeds", help="a comma list")
        st.button("Launch sweep", key="train.sweep_launch", icon=":material/grid_view:", on_click=_launch,
                  args=(store, dataset_id), width="stretch")


def draw_link() -> None:
    """A link to the sweep launched last, on the Compare page."""
    launched = st.session_state.get("train.sweep_launched")
    if launched:
        st.page_link("pages/compare.py", label=f"Compare sweep {launched}", icon=":material/compare_arrows:",
                     query_params={"sweep": launched})


def _launch(store, dataset_id: str) -> None:
    """Queue the form's recipe over the chosen backbones × learning rates × seeds as one sweep."""
    ss = st.session_state
    try:
        base = train_form.form_recipe(dataset_id).to_dict()
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
                                    "Compare shows it grouped by configuration." + train_form.autostart())
    ss["train.sweep_launched"] = queued.sweep_id
    ss["train.watch"] = queued.runs[0].id
    st.query_params["run"] = queued.runs[0].id
