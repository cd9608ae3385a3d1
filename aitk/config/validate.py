"""`aitk validate job.yaml ...`: check job files without loading any model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from aitk.config.caption import CaptionJobFile
from aitk.config.loader import JobFileError, LoadedJob, load_job_file
from aitk.config.support import render_path, unsupported_failures


def _local_checks(loaded: LoadedJob) -> list[str]:
    """Hints that only make sense on the machine that validates (never errors)."""
    notes: list[str] = []
    if isinstance(loaded.job, CaptionJobFile):
        for i, process in enumerate(loaded.job.config.process):
            if not Path(process.caption.path_to_caption).expanduser().is_dir():
                where = render_path(("config", "process", i, "caption", "path_to_caption"))
                notes.append(f"{where}: folder {process.caption.path_to_caption!r} does not exist here "
                             "(fine if it exists on the machine that captions)")
        return notes
    for i, process in enumerate(loaded.job.config.process):
        for j, dataset in enumerate(process.datasets):
            folder = Path(dataset.folder_path).expanduser()
            if not folder.is_dir():
                where = render_path(("config", "process", i, "datasets", j, "folder_path"))
                notes.append(
                    f"{where}: folder {dataset.folder_path!r} does not exist here "
                    "(fine if it exists on the machine that trains)"
                )
        notes.extend(_missing_ctrl_image_notes(i, process))
    return notes


def _missing_ctrl_image_notes(index: int, process: Any) -> list[str]:
    """A preview control image (ctrl_img, --ctrl_img) that is not a file here, naming its prompt."""
    from aitk.config.prompts import build_preview_requests, missing_ctrl_images, request_key

    if process.sample is None:
        return []
    requests = build_preview_requests(process.sample, process.trigger_word)
    by_file: dict[str, list[int]] = {}
    for j, path in missing_ctrl_images(requests, process.model.resolved_arch).items():
        by_file.setdefault(path, []).append(j)
    notes = []
    for path, indices in by_file.items():  # one note per file, at its first preview
        where = render_path(("config", "process", index, "sample", *request_key(process.sample, indices[0])))
        named = ", ".join(repr(requests[j].prompt) for j in indices[:2])
        more = f" and {len(indices) - 2} more" if len(indices) > 2 else ""
        notes.append(f"{where}: control image {path!r} does not exist here (fine if it exists on the machine that "
                     f"trains; else the run skips the previews that use it: {named}{more})")
    return notes


def validate_command(paths: list[str], strict: bool = False) -> int:
    """Validate each job file; print `OK path` and its warnings, or its errors.

    Returns 0 when every file is valid and would start, else 1 (a setting this version refuses
    at start counts as a failure; with `strict`, so does any warning). Never raises for a bad file.
    """
    if not paths:
        print("aitk validate: give one or more job files, e.g. aitk validate job.yaml", file=sys.stderr)
        return 1
    failed = 0
    for path in paths:
        try:
            loaded = load_job_file(path, strict=strict, caption_ok=True)
        except JobFileError as exc:
            failed += 1
            print(str(exc), file=sys.stderr)
            continue
        except Exception as exc:  # noqa: BLE001 - a bad file must never print a traceback
            failed += 1
            print(f"{path}: 1 problem\n  could not be checked: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        try:
            notes = _local_checks(loaded)
        except Exception:  # noqa: BLE001 - hints are best effort
            notes = []
        warnings = loaded.warnings
        refused = unsupported_failures(loaded.job)
        if refused:
            failed += 1
            print(f"{path}: the run would stop at start ({len(refused)} setting{'' if len(refused) == 1 else 's'}):",
                  file=sys.stderr)
            for line in refused:
                print(f"  {line}", file=sys.stderr)
            warnings = [w for w in warnings if w not in refused]
        elif strict and warnings:
            failed += 1
            print(f"{path}: {len(warnings)} warning{'' if len(warnings) == 1 else 's'}, errors with --strict:",
                  file=sys.stderr)
        else:
            suffix = f" ({len(warnings)} warning{'' if len(warnings) == 1 else 's'})" if warnings else ""
            print(f"OK {path}{suffix}")
        for warning in warnings:
            print(f"  {'error' if strict else 'warning'}: {warning}", file=sys.stderr if strict else sys.stdout)
        for note in notes:
            print(f"  note: {note}")
    if len(paths) > 1:
        print(f"{len(paths) - failed} of {len(paths)} job files valid")
    return 1 if failed else 0
