"""One dataset entry of a job: scan its folder, captions, masks, control images and buckets.

`scan_dataset` is shared by TrainingData (which raises when nothing is usable) and
`aitk dataset inspect` (which reports it). It never loads a model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aitk.config.schema import DatasetConfig
from aitk.data.buckets import choose_bucket
from aitk.data.captions import read_metadata_captions
from aitk.data.video import ClipPlan, plan_clip, short_clip_message, snap_frame_count, video_bucket
from aitk.data.images import (
    DatasetError,
    ImageRecord,
    SkippedFile,
    index_by_stem,
    probe_image,
    reason_key,
    scan_folder,
)

ASPECT_TOLERANCE = 0.02  # a mask / control image whose aspect differs more than this is warned about


@dataclass
class Placement:
    """One image at one resolution: the unit the sampler draws (times num_repeats)."""

    record: ImageRecord
    resolution: int
    bucket: tuple[int, int]  # (width, height)
    frames: int = 0  # video datasets: frames per draw (a still image: 1); image datasets: 0
    clip: ClipPlan | None = None  # how a video clip is sampled; None for a still image


@dataclass
class DatasetScan:
    index: int
    label: str  # "datasets[0]"
    cfg: DatasetConfig
    folder: Path
    trigger: str | None
    resolutions: list[int]
    num_files: int = 0  # entries named like images (used + skipped)
    records: list[ImageRecord] = field(default_factory=list)  # usable images
    placements: list[Placement] = field(default_factory=list)
    skipped_files: list[SkippedFile] = field(default_factory=list)
    without_mask: list[Path] = field(default_factory=list)  # images trained without a mask (mask_path set)
    frame_counts: Counter = field(default_factory=Counter)  # video datasets: frames -> number of clips

    @property
    def used(self) -> int:
        return len(self.records)

    @property
    def skipped(self) -> Counter:
        return Counter(s.reason for s in self.skipped_files)

    @property
    def is_video(self) -> bool:
        return self.cfg.num_frames > 1

    def bucket_counts(self) -> Counter:
        """(resolution, (w, h)) -> number of images."""
        return Counter((p.resolution, p.bucket) for p in self.placements)

    def summary_lines(self) -> list[str]:
        skipped = self.skipped
        n_skipped = sum(skipped.values())
        what = "files" if self.is_video else "images"
        line = f"dataset {self.folder}: {self.used} {what} used, {n_skipped} skipped"
        if n_skipped:
            line += " (" + ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items())) + ")"
        lines = [line]
        if self.used:
            parts = [f"{w}x{h}@{r}: {n}" for (r, (w, h)), n in sorted(self.bucket_counts().items())]
            lines.append(f"  buckets: {', '.join(parts)}")
        if self.frame_counts:
            row = ", ".join(f"{frames} frames: {n}" for frames, n in sorted(self.frame_counts.items()))
            lines.append(f"  frame counts: {row}")
        if self.cfg.is_reg:
            lines.append("  regularisation dataset (is_reg): mixed in, as many samples per epoch as the others")
        if self.cfg.mask_path:
            lines.append(
                f"  masks: {self.used - len(self.without_mask)} of {self.used} images have a mask "
                f"in {self.cfg.mask_path}"
            )
        if self.cfg.control_folders:
            lines.append(f"  control images: from {', '.join(self.cfg.control_folders)}")
        return lines

    def unusable_message(self) -> str:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items()))
        return (
            f"{self.label}: none of the {self.num_files} image files in {self.folder} can be used ({reasons}) - "
            "see the warnings above; replace or remove those files"
        )


def _user_path(value: str, key: str, label: str) -> Path:
    try:
        return Path(value).expanduser()
    except RuntimeError:  # ~name of a user this machine does not have
        raise DatasetError(
            f"{label}: {key} {value!r} starts with ~ but names no user of this machine - write the full path"
        ) from None


def _aux_folder(value: str | None, key: str, label: str) -> Path | None:
    if not value:
        return None
    folder = _user_path(value, key, label)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise DatasetError(f"{label}: {key} {folder} {what} - set {key} to a folder of images, or remove it")
    return folder


def _control_folders(cfg: DatasetConfig, label: str) -> list[Path]:
    """The dataset's control folders (control_path: one folder or a list), each checked."""
    many = len(cfg.control_folders) > 1
    keys = [f"control_path[{i}]" if many else "control_path" for i in range(len(cfg.control_folders))]
    folders = [_aux_folder(value, key, label) for value, key in zip(cfg.control_folders, keys)]
    return [folder for folder in folders if folder is not None]


def _control_files(
    record: ImageRecord, folders: list[tuple[Path, dict[str, Path]]], log: Callable[[str], None]
) -> tuple[Path, ...] | str:
    """The image's control file in each control folder (same file stem), or why it is skipped."""
    found = []
    for folder, files in folders:
        control = files.get(record.path.stem)
        if control is None:
            return f"no control image (no file named {record.path.stem}.<image extension> in {folder})"
        try:
            size = probe_image(control)
        except ValueError as exc:
            return f"bad control image ({control.name}: {exc})"
        if _aspect_differs(size, (record.width, record.height)):
            log(
                f"warning: control image {control} is {size[0]}x{size[1]} but {record.path.name} is "
                f"{record.width}x{record.height}; it is stretched to the image's shape"
            )
        found.append(control)
    return tuple(found)


def _aspect_differs(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(a[0] * b[1] - a[1] * b[0]) > ASPECT_TOLERANCE * a[1] * b[0]


def plan_frames(record: ImageRecord, cfg: DatasetConfig, frame_rule: str) -> tuple[int, ClipPlan | None] | str:
    """(frames, clip plan) of one file of a video dataset, or the reason to skip it.

    A still image is a one-frame clip. Clips: with `fps` set, frames are taken at that rate (a
    clip that is too short is used shorter when shrink_video_to_frames, else skipped); without
    `fps`, shrink_video_to_frames: true spreads num_frames over the whole clip (ai-toolkit's
    meaning) and false takes consecutive frames at the clip's own rate, skipping short clips.
    Counts are snapped down to what the model accepts (`frame_rule`, e.g. 4k+1).
    """
    if record.video is None:
        return 1, None
    info = record.video
    spread = cfg.fps is None and cfg.shrink_video_to_frames
    plan = plan_clip(
        info, num_frames=cfg.num_frames, target_fps=cfg.fps, shrink=cfg.shrink_video_to_frames,
        frame_rule=frame_rule, spread=spread,
    )
    if plan is None:
        if info.frame_count >= 1 and snap_frame_count(info.frame_count, frame_rule) < 1:
            return f"too short ({info.frame_count} frames; the model needs {frame_rule} frames)"
        return short_clip_message(info, num_frames=cfg.num_frames, target_fps=cfg.fps)
    return plan.frames, plan


def scan_dataset(
    index: int,
    cfg: DatasetConfig,
    *,
    process_trigger: str | None,
    divisibility: int,
    log: Callable[[str], None],
    frame_rule: str | None = None,
    confine: bool = False,
) -> DatasetScan:
    """Scan one dataset entry. Raises DatasetError for a missing/empty folder (or mask/control folder)
    and for a resolution below `divisibility`; a folder whose files are all unusable is returned with
    `used == 0` (the caller decides).

    `frame_rule` is the model's accepted frame counts ("4k+1"; None for an image model). A dataset
    with num_frames > 1 is a video dataset: its clips (and still images, as one-frame clips) are
    planned with `plan_frames` and bucketed by a per-frame pixel budget.

    `confine` (the web UI): links leading outside the dataset folder are not followed (see scan_folder).
    """
    label = f"datasets[{index}]"
    folder = _user_path(cfg.folder_path, "folder_path", label)
    if cfg.num_frames > 1 and frame_rule is None:
        raise DatasetError(
            f"{label}: num_frames {cfg.num_frames} asks for video training, but this model trains on "
            "images - use a video model (arch: wan21, wan22_14b, ...) or set num_frames: 1"
        )
    trigger = cfg.trigger_word if cfg.trigger_word else process_trigger
    resolutions = list(dict.fromkeys(int(r) for r in cfg.resolutions))
    for r in resolutions:
        if r < divisibility:
            raise DatasetError(
                f"{label} ({folder}): resolution {r} is smaller than the model's bucket size "
                f"multiple {divisibility} - use a resolution of at least {divisibility}"
            )
    metadata = read_metadata_captions(folder, warn=log, confine=confine) if folder.is_dir() else {}
    scan = scan_folder(
        folder,
        caption_ext=cfg.caption_ext,
        default_caption=cfg.default_caption,
        trigger_word=trigger,
        log=log,
        label=label,
        metadata=metadata,
        videos=cfg.num_frames > 1,
        confine=confine,
    )
    if cfg.num_frames > 1 and (cfg.mask_path or cfg.control_path):
        raise DatasetError(
            f"{label}: mask_path and control_path are for image datasets; remove them from this "
            f"video dataset (num_frames {cfg.num_frames})"
        )
    mask_dir = _aux_folder(cfg.mask_path, "mask_path", label)
    control_dirs = _control_folders(cfg, label)
    masks = index_by_stem(mask_dir) if mask_dir else {}
    controls = [(folder, index_by_stem(folder)) for folder in control_dirs]

    out = DatasetScan(
        index=index, label=label, cfg=cfg, folder=folder, trigger=trigger, resolutions=resolutions,
        num_files=scan.num_files, skipped_files=list(scan.skipped_files),
    )

    def skip(record: ImageRecord, reason: str) -> None:
        log(f"warning: skipping {record.path}: {reason}")
        out.skipped_files.append(SkippedFile(record.path, reason_key(reason), reason))

    for record in scan.records:
        frames, clip = 0, None
        if cfg.num_frames > 1:
            assert frame_rule is not None
            planned = plan_frames(record, cfg, frame_rule)
            if isinstance(planned, str):
                skip(record, planned)
                continue
            frames, clip = planned
        placements = []
        for r in resolutions:
            if cfg.num_frames > 1:
                budget = cfg.max_pixels_per_frame or r * r
                bucket = video_bucket(record.width, record.height, max_pixels=budget, divisibility=divisibility)
            else:
                bucket = choose_bucket(record.width, record.height, r, divisibility, cfg.buckets)
            if bucket is None:
                break
            placements.append(Placement(record, r, bucket, frames, clip))
        if len(placements) != len(resolutions):
            skip(
                record,
                f"too small ({record.width}x{record.height}, each side must be at least {divisibility})",
            )
            continue
        if cfg.num_frames > 1:
            out.frame_counts[frames] += 1
        if controls:
            found = _control_files(record, controls, log)
            if isinstance(found, str):
                skip(record, found)
                continue
            record.controls = found
        if mask_dir is not None:
            mask = masks.get(record.path.stem)
            problem = None
            if mask is None:
                problem = f"no mask file named {record.path.stem}.<image extension> in {mask_dir}"
            else:
                try:
                    size = probe_image(mask)
                except ValueError as exc:
                    problem = f"its mask {mask} cannot be used: {exc}"
                else:
                    if _aspect_differs(size, (record.width, record.height)):
                        log(
                            f"warning: mask {mask} is {size[0]}x{size[1]} but {record.path.name} is "
                            f"{record.width}x{record.height}; it is stretched to the image's shape"
                        )
                    record.mask = mask
            if problem is not None:
                log(f"warning: {record.path}: {problem} - it trains without a mask (every pixel counts)")
                out.without_mask.append(record.path)
        out.records.append(record)
        out.placements.extend(placements)
    return out
