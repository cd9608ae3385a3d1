"""Full-state checkpoints: written to a temp folder, fsynced, manifest last, then renamed.

A folder counts as a checkpoint only when its manifest exists and every sha256 in it matches;
anything else (a run killed mid-write, a damaged file) is skipped with a warning on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aitk.fsutil import fsync_dir, fsync_file

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_dir_name(step: int) -> str:
    return f"{step:09d}"


@dataclass
class CheckpointInfo:
    path: Path
    step: int


def write_checkpoint(
    root: Path,
    step: int,
    write_files: Callable[[Path], None],
    *,
    pause_hook: Callable[[Path], None] | None = None,
) -> Path:
    """Create `root/<step>/` atomically. `write_files(tmp_dir)` writes the state files into it."""
    tmp = begin_checkpoint(root, step)
    try:
        write_files(tmp)
        return commit_checkpoint(root, step, tmp, pause_hook=pause_hook)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint never stays (the previous ones do)
        raise


def begin_checkpoint(root: Path, step: int) -> Path:
    """The empty temp folder a checkpoint is written into (several processes may write into it,
    as FSDP's sharded checkpoints do); `commit_checkpoint` makes it the checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{checkpoint_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_checkpoint(
    root: Path, step: int, tmp: Path, *, pause_hook: Callable[[Path], None] | None = None
) -> Path:
    """Checksum every file of `tmp` into its manifest (written last), then rename it to `root/<step>/`."""
    final = root / checkpoint_dir_name(step)
    if pause_hook is not None:
        pause_hook(tmp)
    files = {}
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
        fsync_file(file)
        files[str(file.relative_to(tmp))] = _sha256(file)
    manifest = {"format": FORMAT_VERSION, "step": step, "created": time.time(), "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    fsync_file(tmp / MANIFEST)
    fsync_dir(tmp)
    previous = None
    if final.exists():  # a re-save of the same step (e.g. stop right after a scheduled save)
        previous = final.with_name(f"{TMP_PREFIX}{final.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)  # kept until the new one is in place: never no checkpoint
    os.replace(tmp, final)
    fsync_dir(root)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint is complete, else the reason it cannot be used."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the run stopped while writing it)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest ({exc})"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"missing file {name}"
        if _sha256(file) != expected:
            return f"file {name} does not match its checksum"
    return None


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Checkpoint folders (complete or not), newest first; temp folders are not listed."""
    if not root.is_dir():
        return []
    found = [
        CheckpointInfo(entry, int(entry.name))
        for entry in root.iterdir()
        if entry.is_dir() and entry.name.isdigit()
    ]
    return sorted(found, key=lambda info: info.step, reverse=True)


def latest_complete_checkpoint(root: Path, warn: Callable[[str], None]) -> CheckpointInfo | None:
    for info in list_checkpoints(root):
        problem = verify_checkpoint(info.path)
        if problem is None:
            return info
        warn(f"checkpoint {info.path} is skipped: {problem}; trying the previous one")
    return None


def remove_stale_temp_dirs(root: Path) -> None:
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)


FAULT_PAUSE_ENV = "AITK_FAULT_PAUSE_CHECKPOINT"


def pause_hook_from_env() -> Callable[[Path], None] | None:
    """Fault injection for tests: `AITK_FAULT_PAUSE_CHECKPOINT=<step>` makes the writer of that
    step's checkpoint drop a PAUSED marker into its temp folder and sleep, so a test can kill
    the process in the middle of writing a checkpoint."""
    value = os.environ.get(FAULT_PAUSE_ENV)
    if not value:
        return None
    target = checkpoint_dir_name(int(value))

    def pause(tmp: Path) -> None:
        if target in tmp.name:
            (tmp / "PAUSED").write_text(str(os.getpid()))
            time.sleep(600)

    return pause
