"""Column formats the runs tables share, so every metric reads the same: "87.3 %"."""

import streamlit as st

PERCENT = "%.1f %%"
SPLIT_HELP = ("On the run's evaluation split (the split column): test, or validation when the dataset has no "
              "test split; validation also chose the early-stopping epoch.")


def metric_columns() -> dict:
    """`column_config` for the percent columns of `ui.format.runs_frame` (values 0-100)."""
    return {
        "accuracy": st.column_config.ProgressColumn("accuracy", min_value=0, max_value=100, format=PERCENT,
                                                    help=SPLIT_HELP),
        "macro F1": st.column_config.NumberColumn("macro F1", format=PERCENT, help=SPLIT_HELP),
        "smallest-class recall": st.column_config.NumberColumn(
            "smallest-class recall", format=PERCENT, help="Recall of the class with the fewest evaluation images"),
    }
