"""Small shared pieces of the dashboard: cached resources, Plotly figure builders, formatting.

Nothing here trains or knows SQL; it reads what `tlcore` returns and shapes it for drawing.
Importing `ui` never imports TensorFlow.
"""
