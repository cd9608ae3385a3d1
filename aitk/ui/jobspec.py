"""Job files as the UI handles them: YAML text or form JSON in, a validated YAML text out.

The UI owns two things in every job it stores: `config.name` (checked with `check_name`, since it
becomes a folder) and each process's `training_folder` (set to the configured training folder, so
every file a job writes is inside a folder the server may serve). Everything else is the user's,
validated by the trainer's own loader so the messages are the same as `aitk validate`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aitk.config.errors import JobFileError
from aitk.config.loader import LoadedJob, parse_job_text
from aitk.config.text import parse_text, to_yaml
from aitk.ui.security import Refused, check_name


class JobInputError(Exception):
    """A job that cannot be stored; `problems` are the user-facing lines (as `aitk validate`)."""

    def __init__(self, problems: list[str], warnings: list[str] | None = None) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.warnings = warnings or []


@dataclass
class PreparedJob:
    name: str
    yaml: str
    data: dict[str, Any]
    loaded: LoadedJob
    warnings: list[str] = field(default_factory=list)


def read_input(yaml_text: str | None, config: dict[str, Any] | None) -> dict[str, Any]:
    """Plain job data from YAML/JSON text or from the form's JSON (exactly one of them)."""
    if (yaml_text is None) == (config is None):
        raise JobInputError(["send the job either as `yaml` (text) or as `config` (an object), not both"])
    if config is not None:
        if not isinstance(config, dict):
            raise JobInputError(["`config` must be an object: the job file as JSON"])
        return copy.deepcopy(config)
    warnings: list[str] = []
    try:
        data = parse_text(yaml_text, "job.yaml", None, warnings)
    except JobFileError as exc:
        raise JobInputError(exc.problems) from None
    if not isinstance(data, dict):
        raise JobInputError(["(top level): a job file is a mapping with `job:`, `config:` and optional `meta:`"])
    return data


def prepare(data: dict[str, Any], training_folder: Path, name: str | None = None) -> PreparedJob:
    """Set name and training folder, validate; JobInputError with every problem otherwise."""
    data = copy.deepcopy(data)
    config = data.setdefault("config", {})
    if config is None:
        config = data["config"] = {}
    if not isinstance(config, dict):
        raise JobInputError(["config: must be a mapping with `name` and `process`"])
    if name is not None:
        config["name"] = name
    job_name = config.get("name")
    try:
        check_name(job_name if isinstance(job_name, str) else str(job_name), "job name")
    except Refused as exc:
        raise JobInputError([f"config.name: {exc}"]) from None
    processes = config.get("process")
    if isinstance(processes, list):
        for process in processes:
            if isinstance(process, dict):
                process["training_folder"] = str(training_folder)
    text = to_yaml(data)
    try:
        loaded = parse_job_text(text, source="job")
    except JobFileError as exc:
        raise JobInputError(exc.problems) from None
    if len(loaded.job.config.process) != 1:
        # Each process would write to the same <training_folder>/<name>/ and resume from the other.
        raise JobInputError(["config.process: the UI runs one process per job; split the others into their own jobs"])
    return PreparedJob(name=job_name, yaml=text, data=data, loaded=loaded, warnings=list(loaded.warnings))


def validate(yaml_text: str | None, config: dict[str, Any] | None, training_folder: Path) -> dict[str, Any]:
    """The YAML editor's check: problems and warnings, plus the job as YAML and as JSON (the editor
    and the form switch between the two through this)."""
    try:
        data = read_input(yaml_text, config)
    except JobInputError as exc:
        return {"ok": False, "problems": exc.problems, "warnings": exc.warnings}
    try:
        prepared = prepare(data, training_folder)
    except JobInputError as exc:
        # the text parses: the form can show it, with each problem under its field
        return {"ok": False, "problems": exc.problems, "warnings": exc.warnings, "config": data}
    return {"ok": True, "problems": [], "warnings": prepared.warnings, "yaml": prepared.yaml, "config": prepared.data}


def summary(yaml_text: str) -> dict[str, Any]:
    """What the job list shows about a job's config (never raises: a stored job was valid once)."""
    try:
        loaded = parse_job_text(yaml_text, source="job")
    except Exception:  # noqa: BLE001 - e.g. a job stored by an older version with other rules
        return {}
    process = loaded.job.config.process[0]
    return {
        "arch": process.model.resolved_arch,
        "model": process.model.name_or_path,
        "steps": process.train.steps,
        "trigger_word": process.trigger_word,
        "device": process.device,
        "datasets": [d.folder_path for d in process.datasets],
        "sample_every": process.sample.sample_every if process.sample else None,
        "save_every": process.save.save_every,
    }
