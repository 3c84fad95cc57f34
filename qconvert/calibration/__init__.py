"""Calibration: activations from real text, run through the model one decoder block at a time."""
