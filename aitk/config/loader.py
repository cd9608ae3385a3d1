"""Reading a job file: text -> substitution -> YAML/JSON(C) -> schema -> warnings.

Every failure becomes a JobFileError whose text is complete and user-facing: the file, the key
path in ai-toolkit notation (config.process[0].train.lr), the bad value and what would be valid.
pydantic's own messages and tracebacks never reach the user.

The work is done in text.py (reading, substitution, parsing, YAML out), errors.py (JobFileError and
its messages) and keys.py (unknown keys); this module is the public entry point.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from aitk.config.caption import CaptionJobFile, caption_job_problem, is_caption_job, parse_caption_job
from aitk.config.errors import JobFileError, fmt_value, validation_problems
from aitk.config.keys import unknown_keys
from aitk.config.schema import JobFile
from aitk.config.start_warnings import run_start_warnings
from aitk.config.text import apply_name, parse_text, read_text, to_yaml

__all__ = ["JobFileError", "LoadedJob", "load_job_file", "parse_job_text", "dump_job"]


@dataclass
class LoadedJob:
    job: JobFile | CaptionJobFile  # a caption job only where the caller accepts one (caption_ok)
    warnings: list[str] = field(default_factory=list)
    path: Path = Path("<text>")


def parse_job_text(
    text: str,
    *,
    source: str = "<text>",
    strict: bool = False,
    environ: Mapping[str, str] | None = None,
    caption_ok: bool = False,
) -> LoadedJob:
    """Parse and validate a job given as text (YAML, JSON or JSONC, sniffed). A caption job
    (aitk/config/caption.py) is a CaptionJobFile with `caption_ok`, else refused with the command
    that runs it."""
    warnings: list[str] = []
    data = parse_text(text, source, environ, warnings)
    if data is None:
        raise JobFileError(source, ["the file has only comments; a job file needs `job: extension` and `config:` "
                                    "with name and process (see config/examples/sd15_lora.yaml)"])
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"the value {fmt_value(data)}"
        raise JobFileError(
            source, [f"(top level): found {kind}; a job file is a mapping with `job:`, `config:` and optional `meta:`"]
        )
    data = apply_name(data)
    if is_caption_job(data):
        if not caption_ok:
            raise JobFileError(source, [caption_job_problem(source)])
        caption_job, caption_warnings = parse_caption_job(data, source)
        unknown = unknown_keys(caption_job, strict=strict)
        if strict and unknown:
            raise JobFileError(source, unknown)
        return LoadedJob(job=caption_job, warnings=warnings + unknown + caption_warnings, path=Path(source))
    try:
        job = JobFile.model_validate(data)
    except ValidationError as exc:
        raise JobFileError(source, validation_problems(exc, data)) from None
    unknown = unknown_keys(job, strict=strict)
    if strict and unknown:
        raise JobFileError(source, unknown)
    warnings.extend(unknown)
    warnings.extend(run_start_warnings(job))
    return LoadedJob(job=job, warnings=warnings, path=Path(source))


def load_job_file(
    path: str | Path,
    *,
    strict: bool = False,
    environ: Mapping[str, str] | None = None,
    caption_ok: bool = False,
) -> LoadedJob:
    """Read, substitute, parse and validate a job file. Raises JobFileError with a complete message."""
    loaded = parse_job_text(read_text(path), source=str(path), strict=strict, environ=environ, caption_ok=caption_ok)
    loaded.path = Path(path)
    return loaded


def dump_job(job: JobFile) -> str:
    """The job after defaults as YAML (for <output>/config.yaml); load_job_file reads it back equal."""
    body = to_yaml(job.model_dump(mode="python"))
    return "# The job as run, with every default filled in (written by aitk).\n" + body
