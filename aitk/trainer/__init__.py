"""The training loop and its helpers (loss, checkpoints, sampling, reporting)."""
