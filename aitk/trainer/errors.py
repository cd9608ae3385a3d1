"""Errors that end a run cleanly (the last good checkpoint is kept)."""

from __future__ import annotations


class TrainingAborted(RuntimeError):
    """The run cannot go on (e.g. the loss stays NaN); the last good checkpoint is kept."""
