"""Calibration of merged models (NeuralMerger §3.3): data loading, the trainer, the budgeted r/C search.

See docs/calibration.md. The entry point for users is ``neuralmerge.merge(..., calib=[...])``.
"""
