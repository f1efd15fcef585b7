"""The collector: one calibration pass through the model writes the statistics file (see run.collect)."""
