"""Requests from outside a running job (the web UI's worker): save a checkpoint now, render
previews now. The worker creates an empty file `<run folder>/control/<request>`; the trainer
checks after each optimizer step, acts, and deletes the file. No database is touched."""

from __future__ import annotations

from pathlib import Path

CONTROL_REQUESTS = ("save_now", "sample_now")


class ControlRequests:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def pending(self) -> set[str]:
        if not self.folder.is_dir():
            return set()
        return {name for name in CONTROL_REQUESTS if (self.folder / name).exists()}

    def done(self, names: set[str]) -> None:
        for name in names:
            (self.folder / name).unlink(missing_ok=True)

    def request(self, name: str) -> Path:
        """What the worker does (and tests): ask the running job for `name`."""
        if name not in CONTROL_REQUESTS:
            raise ValueError(f"unknown request {name!r}; use one of {', '.join(CONTROL_REQUESTS)}")
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / name
        path.touch()
        return path
