"""`aitk dataset inspect job.yaml`: what training would see, without loading any model.

Per dataset: images used, skipped files by reason (with names), the bucket histogram, caption
statistics and (for video datasets) the frame-count histogram. Returns 0, or 1 when a job file is
invalid or a dataset has nothing usable.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable

from aitk.data.captions import SOURCE_DEFAULT, SOURCE_METADATA, SOURCE_TXT, split_tags
from aitk.data.dataset import DatasetScan, scan_dataset
from aitk.data.images import DatasetError

MAX_NAMES = 20  # file names listed per skip reason


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _caption_lines(scan: DatasetScan) -> list[str]:
    records = scan.records
    sources = Counter(r.caption_source for r in records)
    empty = sum(1 for r in records if not (r.raw_caption if r.raw_caption is not None else r.caption).strip())
    lines = [
        f"captions: {sources[SOURCE_TXT]} from .{scan.cfg.caption_ext.lstrip('.') or 'txt'} files, "
        f"{sources[SOURCE_METADATA]} from metadata.jsonl, {sources[SOURCE_DEFAULT]} default "
        f"(default_caption {scan.cfg.default_caption!r}); {empty} without caption text"
        + (f" (trained on the trigger word {scan.trigger!r} alone)" if empty and scan.trigger else "")
    ]
    lengths = [len(r.caption.split()) for r in records]
    if lengths:
        lines.append(
            f"caption length (words, trigger included): mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}"
        )
    tags: Counter = Counter()
    for r in records:
        raw = r.raw_caption if r.raw_caption is not None else r.caption
        tags.update(set(split_tags(raw)))
    if tags:
        top = ", ".join(f"{tag!r} ({n})" for tag, n in tags.most_common(10))
        lines.append(f"top tags (images per tag): {top}")
    cfg = scan.cfg
    per_draw = []
    if cfg.caption_dropout_rate > 0:
        per_draw.append(f"caption dropout {cfg.caption_dropout_rate:g}")
    if cfg.shuffle_tokens:
        per_draw.append(f"tags shuffled after the first {cfg.keep_tokens}")
    if cfg.token_dropout_rate > 0:
        per_draw.append(f"tag dropout {cfg.token_dropout_rate:g}")
    if per_draw:
        lines.append("per draw: " + ", ".join(per_draw))
    return lines


def _dataset_lines(scan: DatasetScan) -> list[str]:
    cfg = scan.cfg
    skipped = scan.skipped
    lines = [
        f"{scan.label} {scan.folder}" + (" (regularisation, is_reg)" if cfg.is_reg else ""),
        f"  items: {_plural(scan.used, 'image')} used of {scan.num_files} named like images, "
        f"{sum(skipped.values())} skipped; {len(scan.placements) * cfg.num_repeats} samples per epoch "
        f"(resolutions {', '.join(map(str, scan.resolutions))}, num_repeats {cfg.num_repeats})",
    ]
    if skipped:
        lines.append("  skipped:")
        by_reason: dict[str, list[str]] = {}
        for s in scan.skipped_files:
            by_reason.setdefault(s.reason, []).append(s.path.name)
        for reason in sorted(by_reason):
            names = by_reason[reason]
            shown = ", ".join(names[:MAX_NAMES]) + (f", ... and {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else "")
            lines.append(f"    {reason} ({len(names)}): {shown}")
    buckets = scan.bucket_counts()
    if buckets:
        lines.append("  buckets (width x height: images):")
        for r in scan.resolutions:
            row = [f"{w}x{h}: {n}" for (res, (w, h)), n in sorted(buckets.items()) if res == r]
            if row:
                lines.append(f"    @{r}: " + ", ".join(row))
    if scan.frame_counts:
        row = ", ".join(f"{frames}: {n}" for frames, n in sorted(scan.frame_counts.items()))
        lines.append(f"  frames (frame count: clips): {row}")
    if scan.records:
        lines.extend("  " + line for line in _caption_lines(scan))
    if cfg.mask_path:
        lines.append(f"  masks: {scan.used - len(scan.without_mask)} of {scan.used} images have one")
        for path in scan.without_mask[:MAX_NAMES]:
            lines.append(f"    no usable mask: {path.name}")
    return lines


def inspect_job(path: str, out: Callable[[str], None] = print, *, confine: bool = False) -> int:
    """Inspect the datasets of one job file. 0 when every dataset has usable images, else 1.

    `confine` (the web UI): links leading outside a dataset folder are reported, not followed."""
    from aitk.config.loader import JobFileError, load_job_file
    from aitk.models.archs import data_facts

    try:
        loaded = load_job_file(path)
    except JobFileError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bad file must never print a traceback
        print(f"{path}: could not be read: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for warning in loaded.warnings:
        out(f"warning: {warning}")
    status = 0
    for p_index, process in enumerate(loaded.job.config.process):
        arch = process.model.resolved_arch
        divisibility, frame_rule = data_facts(arch)
        frames_note = f", frame counts {frame_rule}" if frame_rule else ""
        out(
            f"{path}: process[{p_index}] ({loaded.job.config.name}), model {arch}, "
            f"bucket size multiple {divisibility}{frames_note}"
        )
        for index, cfg in enumerate(process.datasets):
            notes: list[str] = []
            try:
                scan = scan_dataset(
                    index, cfg, process_trigger=process.trigger_word, divisibility=divisibility,
                    log=notes.append, frame_rule=frame_rule, confine=confine,
                )
            except DatasetError as exc:
                out(f"datasets[{index}] {cfg.folder_path}")
                out(f"  error: {exc}")
                status = 1
                continue
            except Exception as exc:  # noqa: BLE001 - report, never a traceback
                out(f"datasets[{index}] {cfg.folder_path}")
                out(f"  error: could not be inspected: {type(exc).__name__}: {exc}")
                status = 1
                continue
            for line in _dataset_lines(scan):
                out(line)
            other = [n for n in notes if not n.startswith("warning: skipping ")]
            if other:
                out("  notes:")
                for note in other:
                    out(f"    {note}")
            if scan.used == 0:
                out(f"  error: {scan.unusable_message()}")
                status = 1
        if process.datasets and all(d.is_reg for d in process.datasets):
            out("error: every dataset is a regularisation dataset (is_reg: true); add one to train on")
            status = 1
    return status


def inspect_command(job_paths: list[str]) -> int:
    """`aitk dataset inspect job.yaml ...`: print each job's dataset report; 0 when all are usable."""
    if not job_paths:
        print("aitk dataset inspect: give one or more job files, e.g. aitk dataset inspect job.yaml", file=sys.stderr)
        return 1
    status = 0
    for i, path in enumerate(job_paths):
        if i:
            print()
        status = max(status, inspect_job(path))
    return status
