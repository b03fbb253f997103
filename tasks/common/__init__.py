"""Shared machinery of the task scripts: flags, the training loop, data sets, models, plots and
benchmark helpers."""
