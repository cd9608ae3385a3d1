"""`aitk cloud modal-pull NAME`: a run's folder copied from the volume (output/NAME) to
<dest>/NAME here: LoRA files, checkpoints, samples, metrics, log.

Only what is new or changed is downloaded: a file here with the size of the one there and its
mtime (set from the volume's after each download) is skipped, so pulling during a run and again
after it fetches only the new files. Files are written beside their final name and renamed when
complete, so an interrupted pull never leaves a truncated LoRA file under its real name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from aitk.cloud.layout import OUTPUT
from aitk.cloud.volume_files import list_files


class PullSource(Protocol):
    """What of modal.Volume the pull uses (tests pass a folder-backed stand-in)."""

    def listdir(self, path: str, *, recursive: bool = False) -> list[Any]: ...

    def read_file(self, path: str) -> Iterable[bytes]: ...


@dataclass
class PullResult:
    folder: Path
    downloaded: list[str]
    skipped: int
    bytes: int


class NothingToPull(Exception):
    pass


def _same(local: Path, size: int, mtime: int) -> bool:
    try:
        stat = local.stat()
    except OSError:
        return False
    return stat.st_size == size and int(stat.st_mtime) == int(mtime)


def pull_run(volume: PullSource, name: str, dest: Path, log: Callable[[str], None] = lambda _m: None) -> PullResult:
    if name in ("", ".", "..") or PurePosixPath(name).name != name or "\\" in name:
        raise NothingToPull(f"{name!r} is not a run name (the job's config.name, one folder)")
    remote_root = f"{OUTPUT}/{name}"
    listed = list_files(volume, remote_root)
    if listed is None:
        raise NothingToPull(f"no run {name!r} in the volume (looked in {remote_root}/)")
    folder = dest / name
    result = PullResult(folder=folder, downloaded=[], skipped=0, bytes=0)
    for relative_name, entry in sorted(listed.items()):
        relative = PurePosixPath(relative_name)
        local = folder.joinpath(*relative.parts)
        if _same(local, entry.size, entry.mtime):
            result.skipped += 1
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(local.name + ".partial")
        with partial.open("wb") as out:
            for chunk in volume.read_file(f"{remote_root}/{relative_name}"):
                out.write(chunk)
        os.replace(partial, local)
        os.utime(local, (entry.mtime, entry.mtime))
        result.downloaded.append(relative_name)
        result.bytes += entry.size
    log(f"{folder}: {len(result.downloaded)} file(s) downloaded ({result.bytes / 1e6:.1f} MB), "
        f"{result.skipped} already here")
    return result
