"""Train: the recipe form with presets, the LR finder and sweeps (left), and the run it launched (right).

The run trains in the worker process; this page only queues it and polls the store, so
leaving, refreshing or opening the page elsewhere shows the same live run (`?run=<id>`).
"""

import streamlit as st

from tlcore.data import builtin
from ui import frame, live_run, lr_finder_panel, state, sweep_form, train_form

frame.require()

store = state.store()

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

specs = train_form.backbones()
form_col, live_col = st.columns([2, 3], gap="large")
with form_col:
    st.subheader("New run")
    dataset_id = train_form.draw_start(datasets, specs)
    lr_finder_panel.draw(store, dataset_id)
    train_form.draw_rest()
    train_form.draw_launch(store, dataset_id)
    sweep_form.draw(store, dataset_id, specs)
    train_form.draw_flash()
    sweep_form.draw_link()
with live_col:
    live_run.draw(store)
