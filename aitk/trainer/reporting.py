"""What a run tells the outside world: log.txt, metrics_<name>.jsonl and status.json (docs/outputs.md)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from collections.abc import Callable
from typing import Any, TextIO

from aitk.fsutil import atomic_write_bytes

STATES = ("starting", "caching", "training", "sampling", "saving", "completed", "stopped", "error")


def _plain(value: Any) -> Any:
    """JSON-safe: tensors to numbers, NaN/inf to null."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    """Writes each message to the terminal (stderr, so it does not fight the progress bar) and log.txt."""

    def __init__(self, path: Path | None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = path
        self._failing = False
        self._file: TextIO | None = None
        if path is not None and enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
        if self._file is not None:
            stamp = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S")
            try:
                for line in message.splitlines() or [""]:
                    self._file.write(f"{stamp} {line}\n")
            except OSError as exc:  # a full disk: the terminal still gets every message
                if not self._failing:
                    tqdm.write(f"warning: cannot write {self.path} ({exc.strerror or exc})", file=sys.stderr)
                self._failing = True
            else:
                self._failing = False

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # said when the write failed
            self._file = None


class MetricsWriter:
    """One JSON object per optimizer step, appended and flushed as the step ends."""

    def __init__(self, path: Path, resume_step: int | None, warn: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.warn = warn
        self._failing = False  # a failed write is said once, until writes succeed again
        if resume_step is None:
            path.write_text("")
        else:
            self._truncate_after(resume_step)
        self._file = open(path, "a", encoding="utf-8")

    def _truncate_after(self, completed_steps: int) -> None:
        """Keep the lines of steps the checkpoint already contains (0-based step < completed)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", -1) < completed_steps:
                    kept.append(line)
            except ValueError:
                continue  # a line cut short by a crash
        atomic_write_bytes(self.path, "".join(f"{line}\n" for line in kept).encode())

    def rewind(self, completed_steps: int) -> None:
        """Drop the lines of steps a rollback undid (train.nan_policy rollback)."""
        self._file.close()
        self._truncate_after(completed_steps)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        record = {key: _plain(value) for key, value in record.items()}
        # docs/outputs.md: plain JSON numbers only; a non-finite value (a skipped NaN step) is null
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            self._file.write(json.dumps(clean, allow_nan=False) + "\n")
            self._file.flush()
        except OSError as exc:  # metrics are a view of the run: a full disk here is a warning, not a lost run
            if not self._failing and self.warn is not None:
                self.warn(f"warning: cannot write {self.path} ({exc.strerror or exc}); training goes on")
            self._failing = True
        else:
            self._failing = False

    def close(self) -> None:
        self._file.close()


class StatusFile:
    """status.json, rewritten atomically at most every `interval_s` (always on a state change)."""

    def __init__(self, path: Path, total_steps: int, interval_s: float = 2.0,
                 warn: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.warn = warn
        self._failing = False
        self.interval_s = interval_s
        self._last_write = 0.0
        self.data: dict[str, Any] = {
            "state": "starting",
            "step": 0,
            "total_steps": total_steps,
            "speed": None,
            "eta_s": None,
            "last_checkpoint": None,
            "error": None,  # the message, kept for readers of earlier versions
            "reason": None,  # when the state is error: aitk.trainer.failure.REASONS
            "message": None,
            "fix": None,
            "pid": os.getpid(),
            "updated": None,
        }

    def update(self, *, force: bool = False, **fields: Any) -> None:
        state = fields.get("state")
        if state is not None and state not in STATES:
            raise ValueError(f"unknown run state {state!r}")
        changed_state = state is not None and state != self.data["state"]
        self.data.update({key: _plain(value) for key, value in fields.items()})
        now = time.monotonic()
        if force or changed_state or now - self._last_write >= self.interval_s:
            self._last_write = now
            self.data["updated"] = datetime.now().astimezone().isoformat()
            try:
                atomic_write_bytes(self.path, json.dumps(self.data, indent=1).encode())
            except OSError as exc:  # the old status stays readable (atomic): say it once, go on
                if not self._failing and self.warn is not None:
                    self.warn(f"warning: cannot write {self.path} ({exc.strerror or exc}); training goes on")
                self._failing = True
            else:
                self._failing = False


def iso_now() -> str:
    return datetime.now().astimezone().isoformat(timespec="milliseconds")
