"""Reading a Modal volume's listing: which files are in a folder of it, by path relative to the
folder, and which error means "not there". Shared by the upload (what is really there) and the pull."""

from __future__ import annotations

import sys
from pathlib import PurePosixPath
from typing import Any, Protocol

FILE = 1  # modal.volume.FileEntryType.FILE


class Listable(Protocol):
    def listdir(self, path: str, *, recursive: bool = False) -> list[Any]: ...


def missing(exc: BaseException) -> bool:
    """Whether `exc` says the path is not in the volume: modal's NotFoundError (FileNotFoundError from
    stand-ins). Read from sys.modules: when modal is not imported, no error can be its."""
    errors = sys.modules.get("modal.exception")
    return isinstance(exc, FileNotFoundError) or (errors is not None and isinstance(exc, errors.NotFoundError))


def list_files(volume: Listable, folder: str) -> dict[str, Any] | None:
    """The files under `folder` (modal FileEntry: size, mtime) by relative posix path; None when the
    folder is not in the volume."""
    try:
        entries = volume.listdir(folder, recursive=True)
    except Exception as exc:  # noqa: BLE001 - only "not there" is an answer; the rest is raised
        if missing(exc):
            return None
        raise
    found: dict[str, Any] = {}
    for entry in entries:
        if int(entry.type) != FILE:
            continue
        path = PurePosixPath(entry.path.lstrip("/"))
        # Modal lists paths from the volume's root; accept them relative to the folder too
        relative = path.relative_to(folder) if path.is_relative_to(folder) else path
        if relative.parts and ".." not in relative.parts:
            found[relative.as_posix()] = entry
    return found
