"""One captioning run over a folder: plan (what needs a caption), load the model, caption in
batches with a progress bar, write each caption right after its batch, print a summary.

A file that cannot be read (a truncated image, a broken video) or whose caption fails is skipped
with its reason on a line of its own and counted; the run goes on. A batch that runs out of GPU
memory is split in halves and tried again, down to one file.

`progress_file` (the web UI) is a JSON file rewritten after every batch: state, done / total and
the counts, the last failures with their reasons.

AITK_CAPTION_KILL_AFTER=N (tests) kills the process with SIGKILL right after its N-th caption is
written, as a power cut would.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aitk.caption import folder as folder_files
from aitk.caption.families import CaptionModelError, Family, choose_model, family_of
from aitk.caption.media import MediaError, is_video, load_item
from aitk.caption.options import CaptionOptions

KILL_AFTER_ENV = "AITK_CAPTION_KILL_AFTER"
FAILURES_KEPT = 50  # in the progress file


class CaptionRunError(Exception):
    """The run cannot start (no folder, a model that cannot caption); str() is the one-line reason."""


@dataclass
class Summary:
    total: int = 0  # files in the folder
    todo: int = 0  # files that needed a caption
    written: int = 0
    done_before: int = 0  # already had a caption (kept)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    model: str = ""
    seconds: float = 0.0

    @property
    def done(self) -> int:
        return self.written + len(self.failed)

    def line(self) -> str:
        parts = [f"captioned {self.written} of {self.total} file{'' if self.total == 1 else 's'}"]
        if self.done_before:
            parts.append(f"{self.done_before} already had a caption")
        if self.failed:
            parts.append(f"{len(self.failed)} skipped")
        return ", ".join(parts) + f" in {self.seconds:.1f} s"


class Progress:
    """The progress file: written whole each time (temporary file + rename), never half."""

    def __init__(self, path: Path | None, summary: Summary) -> None:
        self.path = path
        self.summary = summary

    def write(self, state: str, message: str = "") -> None:
        if self.path is None:
            return
        s = self.summary
        data = {
            "state": state, "message": message, "pid": os.getpid(), "updated": time.time(), "model": s.model,
            "total": s.todo, "done": s.done, "written": s.written, "failed": len(s.failed),
            "files": s.total, "done_before": s.done_before,
            "failures": [{"file": name, "reason": reason} for name, reason in s.failed[-FAILURES_KEPT:]],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, self.path)


def _kill_after() -> int | None:
    value = os.environ.get(KILL_AFTER_ENV, "").strip()
    return int(value) if value.isdigit() else None


def caption_folder(options: CaptionOptions, *, log: Callable[[str], None] | None = None) -> Summary:
    """Caption the files of `options.folder` that need it. Raises CaptionRunError when the run
    cannot start; a file that fails is counted in the summary, never raised."""
    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    summary = Summary()
    progress = Progress(options.progress_file, summary)
    started = time.monotonic()
    try:
        return _run(options, summary, progress, say, started)
    except CaptionRunError as exc:
        progress.write("failed", str(exc))
        raise
    except KeyboardInterrupt:
        progress.write("stopped", "stopped; the captions written so far are kept")
        raise
    except BaseException as exc:
        progress.write("failed", f"{type(exc).__name__}: {exc}")
        raise


def _run(options: CaptionOptions, summary: Summary, progress: Progress, say: Callable[[str], None],
         started: float) -> Summary:
    folder = options.folder.expanduser()
    if not folder.is_dir():
        raise CaptionRunError(f"{options.folder}: no such folder")
    work = folder_files.plan(folder, caption_ext=options.caption_ext, overwrite=options.overwrite,
                             extensions=options.extensions)
    summary.total, summary.todo, summary.done_before = len(work.files), len(work.todo), len(work.done_before)
    model_id, note = choose_model(options.model, options.detailed)
    summary.model = model_id
    if note:
        say(f"note: {note}")
    if not work.files:
        raise CaptionRunError(f"{options.folder}: no images or videos to caption")
    if work.done_before:
        say(f"{len(work.done_before)} of {len(work.files)} files already have a caption: kept "
            "(--overwrite captions them again)")
    if not work.todo:
        progress.write("completed", "every file already has a caption")
        summary.seconds = time.monotonic() - started
        return summary
    progress.write("loading", f"loading {model_id}")
    try:
        family = family_of(model_id)
        from aitk.caption.models import load_captioner

        captioner = load_captioner(model_id, family, device=options.device, dtype=options.dtype, log=say)
    except CaptionModelError as exc:
        raise CaptionRunError(str(exc)) from None
    progress.write("running", f"captioning {len(work.todo)} files")
    _caption_all(options, family, captioner, work.todo, summary, progress)
    summary.seconds = time.monotonic() - started
    progress.write("completed", summary.line())
    return summary


def _caption_all(options: CaptionOptions, family: Family, captioner: Any, todo: Sequence[Path], summary: Summary,
                 progress: Progress) -> None:
    from tqdm import tqdm

    frames = options.video_frames or family.video_frames
    max_res = options.max_res if options.max_res is not None else family.max_res
    max_new_tokens = options.max_length or family.max_new_tokens
    kill_after = _kill_after()
    bar = tqdm(total=len(todo), desc="captioning", unit="file", file=sys.stderr, dynamic_ncols=True)

    def fail(path: Path, reason: str) -> None:
        summary.failed.append((path.name, reason))
        bar.write(f"skipped {path.name}: {reason}", file=sys.stderr)

    try:
        for start in range(0, len(todo), options.batch_size):
            batch: list[tuple[Path, list[Any], str]] = []
            for path in todo[start:start + options.batch_size]:
                try:
                    batch.append((path, load_item(path, video_frames=frames, max_res=max_res),
                                  _prompt(options, family, path)))
                except MediaError as exc:
                    fail(path, str(exc))
            for (path, _, _), answer in zip(batch, _captions(captioner, batch, max_new_tokens)):
                if isinstance(answer, Exception):
                    fail(path, _reason(answer))
                    continue
                text = folder_files.clean(answer)
                if not text:
                    fail(path, "the model gave an empty caption")
                    continue
                folder_files.write_caption(path, options.caption_ext, folder_files.compose(text, options.prefix,
                                                                                           options.suffix))
                summary.written += 1
                if kill_after is not None and summary.written >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
            bar.update(min(options.batch_size, len(todo) - start))
            progress.write("running", f"captioning {len(todo)} files")
    finally:
        bar.close()


def _prompt(options: CaptionOptions, family: Family, path: Path) -> str:
    if options.prompt:
        return options.prompt
    if is_video(path) and family.video_prompt:
        return family.video_prompt
    return family.image_prompt


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _captions(captioner: Any, batch: list[tuple[Path, list[Any], str]], max_new_tokens: int) -> list[str | Exception]:
    """One answer per item: its caption, or the exception that stopped it. Out of GPU memory, the
    batch is split in halves and each half tried again (one item alone fails with the reason)."""
    if not batch:
        return []
    import torch

    try:
        return list(captioner.caption([frames for _, frames, _ in batch], [p for _, _, p in batch], max_new_tokens))
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        if len(batch) == 1:
            return [RuntimeError("out of GPU memory for this file (try --max-res lower, fewer --video-frames or a "
                                 f"smaller model) ({_reason(exc)})")]
        half = len(batch) // 2
        return _captions(captioner, batch[:half], max_new_tokens) + _captions(captioner, batch[half:], max_new_tokens)
    except Exception as exc:  # noqa: BLE001 - a batch that fails costs its files, not the run
        if len(batch) == 1:
            return [exc]
        # one bad item (an odd image size the processor refuses) must not cost the others
        return [answer for item in batch for answer in _captions(captioner, [item], max_new_tokens)]
