"""The files of a folder to caption, which of them still need a caption, and writing one.

- Files: the images and videos directly in the folder (as a dataset's folder_path reads them:
  not recursive, hidden files skipped), sorted by name.
- Resume: a file needs a caption when its `<stem>.<caption_ext>` is missing or holds only white
  space; with `overwrite` every file does. A re-run after a stop or a crash so goes on where the
  last one was.
- Writing: the whole caption file appears at once (a temporary file, fsync, rename), so a killed
  run leaves each caption written whole or not at all.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Plan:
    """What a run will do: `todo` in order; `done_before`: files that already have a caption."""

    files: list[Path]
    todo: list[Path]
    done_before: list[Path]


def media_extensions() -> frozenset[str]:
    """Every extension the datasets read as an image or a video (with the dot, lower case)."""
    from aitk.data.images import IMAGE_EXTENSIONS
    from aitk.data.video import VIDEO_EXTENSIONS

    return frozenset(IMAGE_EXTENSIONS) | VIDEO_EXTENSIONS


def normalise_extensions(extensions: Iterable[str] | None) -> frozenset[str]:
    """"jpg", ".PNG" -> {".jpg", ".png"}; None -> every image and video extension."""
    if extensions is None:
        return media_extensions()
    return frozenset("." + e.strip().lower().lstrip(".") for e in extensions if e.strip().lstrip("."))


def list_media(folder: Path, extensions: frozenset[str]) -> list[Path]:
    """Files directly in `folder` with one of `extensions`, sorted by name (hidden files skipped)."""
    return sorted(
        (p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix.lower() in extensions and p.is_file()),
        key=lambda p: p.name,
    )


def caption_file(path: Path, caption_ext: str) -> Path:
    from aitk.data.captions import caption_path

    return caption_path(path, caption_ext)


def has_caption(path: Path, caption_ext: str) -> bool:
    """Whether the file's caption exists and holds more than white space."""
    try:
        return bool(caption_file(path, caption_ext).read_bytes().strip())
    except OSError:
        return False


def plan(folder: Path, *, caption_ext: str, overwrite: bool, extensions: Iterable[str] | None = None) -> Plan:
    files = list_media(folder, normalise_extensions(extensions))
    if overwrite:
        return Plan(files=files, todo=list(files), done_before=[])
    done = [p for p in files if has_caption(p, caption_ext)]
    seen = set(done)
    return Plan(files=files, todo=[p for p in files if p not in seen], done_before=done)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean(text: str) -> str:
    """A model's answer as one caption line: control characters dropped, white space (line
    breaks too) collapsed to single spaces, ends trimmed."""
    text = unicodedata.normalize("NFC", _CONTROL.sub("", text))
    return " ".join(text.split())


def compose(caption: str, prefix: str = "", suffix: str = "") -> str:
    """prefix + caption + suffix, with a space between where the prefix does not end in white space
    and where the suffix does not start with white space or punctuation."""
    out = caption
    if prefix:
        out = prefix + ("" if prefix[-1].isspace() else " ") + out
    if suffix:
        out = out + ("" if suffix[0].isspace() or suffix[0] in ",.;:!?)" else " ") + suffix
    return out.strip()


def write_caption(path: Path, caption_ext: str, text: str) -> Path:
    """Write the caption of `path` atomically (whole or not at all); returns the caption file."""
    from aitk.fsutil import atomic_write_bytes

    return atomic_write_bytes(caption_file(path, caption_ext), text.encode("utf-8"))
