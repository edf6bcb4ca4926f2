"""A run's bookkeeping: its directory and checkpoints' names, manifest, resume check,
metrics, progress line, curves and stop signals."""
