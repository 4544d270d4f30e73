"""Transfer Lab: the dashboard. `streamlit run streamlit_app.py`

The frame (`ui/frame.py`) draws the optional access gate (see `ui/gate.py`), one `st.navigation`
over `pages/` and the shared sidebar (worker, job training now, device, data home), then the
page. Pages are thin: they read the store, call `tlcore` and draw. Nothing trains in this
process; a worker process does.
"""

from ui import frame

frame.run()
