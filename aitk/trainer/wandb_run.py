"""`logging.use_wandb`: the run's Weights & Biases side (main process only).

The W&B run lives in `<output>/wandb/` and its id in `<output>/wandb_run_id`, so a resumed run
(a checkpoint was found) continues the same W&B run (`resume="allow"`); a fresh start gets a new
id. Credentials and the mode come from the environment as W&B defines them (`wandb login` or
WANDB_API_KEY; WANDB_MODE=offline logs locally for a later `wandb sync`).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aitk.trainer.errors import TrainingAborted

RUN_ID_FILE = "wandb_run_id"
DEFAULT_PROJECT = "ai-toolkit"  # ai-toolkit's default for logging.project_name
_PREVIEW_NAME = re.compile(r"^\d+_(\d+)$")  # samples/<step:09d>_<i>.<ext>


def _run_id(root: Path, resumed: bool) -> str:
    path = root / RUN_ID_FILE
    if resumed and path.is_file():
        kept = path.read_text(encoding="utf-8").strip()
        if kept:
            return kept
    run_id = secrets.token_hex(4)
    path.write_text(run_id + "\n", encoding="utf-8")
    return run_id


class WandbRun:
    """One W&B run: metrics at the log_every cadence, previews with their prompts, the exit code."""

    def __init__(self, run: Any, wandb: Any, log: Callable[[str], None]) -> None:
        self.run = run
        self.wandb = wandb
        self.log = log
        self.warned = False

    @classmethod
    def start(
        cls, *, root: Path, job_name: str, project: str | None, run_name: str | None,
        config: dict[str, Any], resumed: bool, log: Callable[[str], None],
    ) -> "WandbRun":
        try:
            import wandb
        except ImportError as exc:
            raise TrainingAborted(
                "logging.use_wandb: the wandb library is not installed. Fix: pip install wandb"
            ) from exc
        run_id = _run_id(root, resumed)
        try:
            run = wandb.init(
                project=project or DEFAULT_PROJECT, name=run_name or job_name, config=config,
                dir=str(root), id=run_id, resume="allow", reinit="finish_previous",
            )
        except Exception as exc:  # noqa: BLE001 - no key, no network, a refused project: say how to fix
            raise TrainingAborted(
                f"logging.use_wandb: Weights & Biases could not start ({type(exc).__name__}: {exc}). "
                "Run `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to log into the "
                "output folder and `wandb sync` later"
            ) from exc
        log(f"W&B run {run.id} ({'continued' if resumed else 'new'}): project {run.project}, "
            f"files in {Path(run.dir).parent}")
        return cls(run, wandb, log)

    def _guarded(self, what: str, action: Callable[[], None]) -> None:
        """A logging failure is a warning (once), never a reason to lose the run."""
        try:
            action()
        except Exception as exc:  # noqa: BLE001
            if not self.warned:
                self.warned = True
                self.log(f"warning: W&B {what} failed ({type(exc).__name__}: {exc}); training goes on")

    def log_metrics(self, values: dict[str, Any], step: int) -> None:
        """`values` at W&B step `step` (completed optimizer steps); None values are left out."""
        clean = {key: value for key, value in values.items() if isinstance(value, (int, float))}
        self._guarded("logging", lambda: self.run.log(clean, step=step))

    def log_previews(self, paths: list[Path], captions: list[str], step: int) -> None:
        """Preview files as `sample_<i>` (images; videos as mp4), captioned with their prompt."""
        media: dict[str, Any] = {}
        for path in paths:
            match = _PREVIEW_NAME.match(path.stem)
            if match is None or path.suffix not in (".jpg", ".mp4"):
                continue  # the .webp twin of a video
            index = int(match.group(1))
            caption = captions[index] if index < len(captions) else None
            kind = self.wandb.Image if path.suffix == ".jpg" else self.wandb.Video
            media[f"sample_{index}"] = kind(str(path), caption=caption)
        if media:
            self._guarded("preview logging", lambda: self.run.log(media, step=step))

    def finish(self, exit_code: int, state: str) -> None:
        """End the W&B run: `state` (completed, stopped, error) in its summary; exit code 0 marks
        it finished, anything else failed."""
        def end() -> None:
            self.run.summary["aitk_state"] = state
            self.run.finish(exit_code=exit_code)

        self._guarded("finish", end)
