"""The model: networks, the training recipe, evaluation, OOD scores, calibration, the gate, plots."""
