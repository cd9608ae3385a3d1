"""A job file pointed at the volume: every process's training_folder becomes /workspace/output and
every dataset folder (folder_path, control_path, mask_path) its uploaded copy in the volume.

Rewritten whatever the job said, and each change is reported: output written anywhere else in a
container is lost when the container ends (upstream's Modal example overrode its users'
training_folder without a word, and their runs vanished), and a path on this machine means nothing
there. Relative paths mean what they mean to `aitk run` started here: relative to the working folder.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aitk.cloud.layout import DATASETS, MOUNT, OUTPUT, in_container
from aitk.config.loader import JobFileError, parse_job_text
from aitk.config.text import apply_name, parse_text, read_text, to_yaml

#: dataset keys whose values are folders the run reads (control_path may be a list of them)
FOLDER_KEYS = ("folder_path", "control_path", "mask_path")


class CloudJobError(Exception):
    """A job that cannot run remotely as it is; `problems` are the user-facing lines."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}:\n" + "\n".join(f"  {p}" for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class Change:
    """One value of the job file replaced: where (ai-toolkit notation), what it was, what it is."""

    where: str
    before: Any
    after: str

    def describe(self) -> str:
        shown = "(not set)" if self.before is None else repr(self.before)
        return f"{self.where}: {shown} -> {self.after!r}"


@dataclass
class DatasetFolder:
    """A local folder the job reads, and where its copy lives in the volume (relative to its root)."""

    local: Path
    remote: str
    used_at: list[str] = field(default_factory=list)


@dataclass
class RewrittenJob:
    name: str
    yaml: str
    changes: list[Change]
    folders: list[DatasetFolder]
    warnings: list[str] = field(default_factory=list)

    @property
    def training_folder_changes(self) -> list[Change]:
        return [c for c in self.changes if c.where.endswith(".training_folder")]


def folder_key(folder: Path) -> str:
    """The folder's name in the volume: its own name (readable in the Modal dashboard) plus a hash of
    its absolute path, so two local folders both called `images` never share a copy."""
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", folder.name).strip("._-")[:60] or "dataset"
    return f"{stem}-{digest}"


def _local_path_warnings(process: Mapping[str, Any], where: str, base: Path) -> list[str]:
    """Model / LoRA paths that exist on this machine: not uploaded, so the container will not find them."""
    out: list[str] = []
    for section in ("model", "network"):
        values = process.get(section)
        if not isinstance(values, Mapping):
            continue
        for key, value in values.items():
            if not isinstance(value, str) or not (key.endswith("_path") or key == "name_or_path"):
                continue
            path = Path(value).expanduser()
            if (path if path.is_absolute() else base / path).exists():
                out.append(f"{where}.{section}.{key}: {value!r} is a path on this machine; the remote run cannot "
                           "read it (only dataset folders are uploaded): use a Hugging Face id or put it in the volume")
    return out


def _device_warnings(process: Mapping[str, Any], where: str) -> list[str]:
    """A job written for a CPU (device: cpu) would leave the rented GPU idle."""
    device = process.get("device")
    if isinstance(device, str) and device.strip().lower().startswith("cpu"):
        return [f"{where}.device: {device!r}: the run would train on the container's CPU and leave the GPU "
                "idle; remove the key (the GPU is the default) or set it to cuda"]
    return []


class _Rewriter:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.folders: dict[Path, DatasetFolder] = {}
        self.changes: list[Change] = []
        self.problems: list[str] = []

    def folder(self, value: Any, where: str) -> Any:
        if not isinstance(value, str) or not value.strip():
            return value  # the schema check reports it
        path = Path(value).expanduser()
        local = (path if path.is_absolute() else self.base / path).resolve()
        if local.is_dir():
            entry = self.folders.get(local)
            if entry is None:
                entry = self.folders[local] = DatasetFolder(local, f"{DATASETS}/{folder_key(local)}")
            entry.used_at.append(where)
            after = in_container(entry.remote)
            self.changes.append(Change(where, value, after))
            return after
        if value.startswith(f"{MOUNT}/"):
            return value  # already a folder in the volume (uploaded before, or put there by hand)
        self.problems.append(f"{where}: folder {value!r} does not exist on this machine ({local}); the job's "
                             "datasets are uploaded from here")
        return value

    def dataset(self, dataset: dict[str, Any], where: str) -> None:
        for key in FOLDER_KEYS:
            value = dataset.get(key)
            if isinstance(value, list):
                dataset[key] = [self.folder(v, f"{where}.{key}[{k}]") for k, v in enumerate(value)]
            elif value is not None:
                dataset[key] = self.folder(value, f"{where}.{key}")

    def process(self, process: dict[str, Any], where: str) -> None:
        after = in_container(OUTPUT)
        before = process.get("training_folder")
        if before != after:
            self.changes.append(Change(f"{where}.training_folder", before, after))
        process["training_folder"] = after
        datasets = process.get("datasets")
        if isinstance(datasets, list):
            for j, dataset in enumerate(datasets):
                if isinstance(dataset, dict):
                    self.dataset(dataset, f"{where}.datasets[{j}]")


def rewrite_job(path: str | Path, environ: Mapping[str, str] | None = None, base: Path | None = None) -> RewrittenJob:
    """The job file at `path` validated, then rewritten for the volume. Raises JobFileError (the job
    itself is invalid) or CloudJobError (a dataset folder is missing here)."""
    source = str(path)
    text = read_text(path)
    loaded = parse_job_text(text, source=source, environ=environ)  # the same messages as `aitk validate`
    data = apply_name(copy.deepcopy(parse_text(text, source, environ, [])))  # ${VAR} substituted here, not there
    rewriter = _Rewriter((base or Path.cwd()).absolute())
    warnings = list(loaded.warnings)
    for i, process in enumerate(data["config"]["process"]):
        where = f"config.process[{i}]"
        rewriter.process(process, where)
        warnings.extend(_local_path_warnings(process, where, rewriter.base))
        warnings.extend(_device_warnings(process, where))
    if rewriter.problems:
        raise CloudJobError(source, rewriter.problems)
    out = to_yaml(data)
    try:
        parse_job_text(out, source=f"{source} (rewritten for the volume)")
    except JobFileError as exc:  # a rewrite that breaks a valid job is our bug; say so plainly
        raise CloudJobError(source, [f"the rewritten job is not valid: {p}" for p in exc.problems]) from None
    return RewrittenJob(name=str(loaded.job.config.name), yaml=out, changes=rewriter.changes,
                        folders=list(rewriter.folders.values()), warnings=warnings)
