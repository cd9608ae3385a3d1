"""Graceful stop: Ctrl+C or SIGTERM asks the loop to finish its step, save, and exit.

A second Ctrl+C while saving is ignored with a message: interrupting the save is what loses work.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType


class StopController:
    def __init__(self) -> None:
        self.requested: str | None = None  # the reason, e.g. "SIGINT"
        self._previous: dict[int, object] = {}
        self._announce: Callable[[str], None] = print

    def request(self, reason: str) -> None:
        if self.requested is None:
            self.requested = reason
            self._announce(
                f"{reason} received: finishing this step, then saving a checkpoint (do not press Ctrl+C again)."
            )
        else:
            self._announce(f"{reason} received again: already stopping, the checkpoint is being saved.")

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.request(signal.Signals(signum).name)

    def install(self, announce: Callable[[str], None]) -> None:
        self._announce = announce
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled on the main thread (e.g. runs inside a test thread)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def exit_code(self) -> int:
        return {"SIGINT": 130, "SIGTERM": 143}.get(self.requested or "", 0)
