"""How good a model is and how far to trust it: metrics from stored predictions, calibration and
the "not sure" threshold (and their one reader), paired comparison of two runs, the data audit and
the model card."""
