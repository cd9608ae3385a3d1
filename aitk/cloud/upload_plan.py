"""Dataset folders uploaded to the volume, only what changed since the last upload.

The volume keeps a manifest per folder (manifests/<key>.json: size and mtime of every file as
uploaded). A file whose size or mtime differs from it, or that it lacks, is uploaded, and so is one
the volume's listing does not show with that size (removed there by hand); a file there that is
gone here is removed there, so the remote run sees the folder as it is now. The manifest is written
last: an upload cut short leaves the old one, and the next run sends again what may not have arrived.

The caches aitk writes beside the data (_latent_cache, _text_cache) are not sent: they are rebuilt
there (and kept in the volume for the next run), and hidden files (.DS_Store, ...) are not data.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aitk.cloud.layout import MANIFESTS
from aitk.cloud.volume_files import list_files, missing

MANIFEST_VERSION = 1
SKIPPED_FOLDERS = {"_latent_cache", "_text_cache"}

#: (size in bytes, mtime in ns) of a file
Stamp = tuple[int, int]


class UploadTarget(Protocol):
    """What of modal.Volume the upload uses (tests pass a folder-backed stand-in)."""

    def read_file(self, path: str) -> Iterable[bytes]: ...

    def remove_file(self, path: str, recursive: bool = False) -> None: ...

    def batch_upload(self, force: bool = False) -> Any: ...

    def listdir(self, path: str, *, recursive: bool = False) -> list[Any]: ...


def scan_folder(folder: Path) -> dict[str, Stamp]:
    """Every file under `folder` (links followed to files, not into folders) by its relative posix path."""
    found: dict[str, Stamp] = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_FOLDERS and not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            try:
                stat = path.stat()
            except OSError:  # a dangling link: nothing to send
                continue
            found[path.relative_to(folder).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return found


def manifest_path(remote_folder: str) -> str:
    return f"{MANIFESTS}/{remote_folder.rsplit('/', 1)[-1]}.json"


def manifest_bytes(source: Path, files: dict[str, Stamp]) -> bytes:
    body = {"version": MANIFEST_VERSION, "source": str(source),
            "files": {name: list(stamp) for name, stamp in sorted(files.items())}}
    return json.dumps(body, indent=1).encode()


def parse_manifest(raw: bytes | None) -> dict[str, Stamp]:
    """The files a manifest lists; an absent, unreadable or older-format manifest lists none (all is sent)."""
    if not raw:
        return {}
    try:
        body = json.loads(raw)
        if body.get("version") != MANIFEST_VERSION:
            return {}
        return {str(name): (int(stamp[0]), int(stamp[1])) for name, stamp in body["files"].items()}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return {}


@dataclass
class UploadPlan:
    local: Path
    remote: str
    """The folder in the volume, relative to its root (datasets/<key>)."""
    files: dict[str, Stamp]
    upload: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    unchanged: int = 0
    replace: bool = False
    """Remove the whole folder there first (a forced upload: what is there is not known)."""

    @property
    def upload_bytes(self) -> int:
        return sum(self.files[name][0] for name in self.upload)

    def summary(self) -> str:
        return (f"{self.local} -> {self.remote}: {len(self.upload)} file(s) to upload "
                f"({self.upload_bytes / 1e6:.1f} MB), {len(self.delete)} to remove, {self.unchanged} unchanged")


def plan_upload(local: Path, remote: str, uploaded: dict[str, Stamp], there: dict[str, int] | None = None,
                force: bool = False) -> UploadPlan:
    """What to send of `local` given what the manifest says was sent and, when known, the size of each
    file really there (`force`: everything, into an emptied folder)."""
    files = scan_folder(local)
    plan = UploadPlan(local=local, remote=remote, files=files, replace=force)
    for name, stamp in files.items():
        if force or uploaded.get(name) != stamp or (there is not None and there.get(name) != stamp[0]):
            plan.upload.append(name)
        else:
            plan.unchanged += 1
    if not force:
        plan.delete = sorted(set(uploaded if there is None else there) - set(files))
    return plan


def read_manifest(volume: UploadTarget, remote: str) -> dict[str, Stamp]:
    try:
        return parse_manifest(b"".join(volume.read_file(manifest_path(remote))))
    except Exception as exc:  # noqa: BLE001 - no manifest yet: nothing was sent
        if missing(exc):
            return {}
        raise


def apply_upload(volume: UploadTarget, plan: UploadPlan, log: Callable[[str], None] = lambda _m: None) -> None:
    """Remove what is gone, send what changed, then the new manifest (last, see the module doc)."""
    removals = [(plan.remote, True)] if plan.replace else [(f"{plan.remote}/{n}", False) for n in plan.delete]
    for path, recursive in removals:
        try:
            volume.remove_file(path, recursive=recursive)
        except Exception as exc:  # noqa: BLE001 - already gone there is what we want
            if not missing(exc):
                raise
    if plan.upload:
        with volume.batch_upload(force=True) as batch:
            for name in plan.upload:
                batch.put_file(plan.local / name, f"{plan.remote}/{name}")
    # the manifest records what was read when planning: a file changed since is sent again next time
    with volume.batch_upload(force=True) as batch:
        batch.put_file(io.BytesIO(manifest_bytes(plan.local, plan.files)), manifest_path(plan.remote))
    log(f"uploaded {plan.summary()}")


def sync_folders(volume: UploadTarget, folders: Iterable[tuple[Path, str]], force: bool = False,
                 log: Callable[[str], None] = lambda _m: None) -> list[UploadPlan]:
    """Plan and apply the upload of each (local folder, folder in the volume)."""
    plans = []
    for local, remote in folders:
        if force:
            plan = plan_upload(local, remote, {}, force=True)
        else:
            listed = list_files(volume, remote)
            there = {} if listed is None else {name: entry.size for name, entry in listed.items()}
            plan = plan_upload(local, remote, read_manifest(volume, remote), there)
        if plan.upload or plan.delete or plan.replace:
            apply_upload(volume, plan, log)
        else:
            log(f"up to date: {plan.summary()}")
        plans.append(plan)
    return plans
