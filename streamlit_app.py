"""Transfer Lab: the dashboard's frame. `streamlit run streamlit_app.py`

One `st.navigation` over `pages/`, the optional access gate (see `ui/gate.py`) and the shared
sidebar (worker, job training now, device, data home). Pages are thin: they read the store,
call `tlcore` and draw. Nothing trains in this process; a worker process does.
"""

import streamlit as st

from ui import frame, gate, sidebar, state

st.set_page_config(page_title="Transfer Lab", page_icon=":material/model_training:", layout="wide")

if not gate.check():
    st.stop()

PAGES = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/datasets.py", title="Datasets", icon=":material/photo_library:"),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("pages/errors.py", title="Errors", icon=":material/error:"),
    st.Page("pages/demo.py", title="Demo", icon=":material/photo_camera:"),
]

state.keep_train_form()  # before st.navigation, which drops the widget state of the page left
page = st.navigation(PAGES)
sidebar.draw()
with frame.running():
    page.run()
