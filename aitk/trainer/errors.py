"""Errors that end a run cleanly (the last good checkpoint is kept)."""

from __future__ import annotations


class TrainingAborted(RuntimeError):
    """The run cannot go on; the last good checkpoint is kept.

    `reason` is one of aitk.trainer.failure.REASONS (what status.json and the exit code say);
    `fix`, when given, replaces the reason's general advice."""

    def __init__(self, message: str, *, reason: str = "config", fix: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.fix = fix
