"""Transfer Lab's engine: import image datasets, fine-tune ImageNet backbones, keep every run.

Never imports Streamlit; everything the dashboard does, `python -m tlcore ...` does headless.
"""

__version__ = "0.1.0"
