"""Captions: reading `<stem>.<caption_ext>` next to an image, and trigger-word handling."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

TRIGGER_PLACEHOLDER = "[trigger]"


def caption_path(image_path: Path, caption_ext: str) -> Path:
    """The caption file of an image: same folder, same stem, extension `caption_ext` ("txt" or ".txt")."""
    ext = caption_ext.strip().lstrip(".") or "txt"
    return image_path.with_name(f"{image_path.stem}.{ext}")


def _clean(text: str) -> str:
    # One caption per file: line breaks become spaces, runs of spaces collapse, ends are trimmed.
    return re.sub(r"[ \t]*[\r\n]+[ \t]*", " ", text).strip()


def read_caption(
    image_path: Path,
    caption_ext: str,
    default_caption: str,
    warn: Callable[[str], None] | None = None,
) -> str:
    """The caption text of one image (trigger not yet applied).

    A missing, unreadable or blank caption file gives `default_caption`. A file that is not valid
    UTF-8 is decoded with replacement characters and `warn` is called once naming the file. A UTF-8
    byte-order mark is ignored.
    """
    path = caption_path(image_path, caption_ext)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return default_caption
    except OSError as exc:
        if warn:
            warn(f"warning: caption file {path} could not be read ({exc}); using the default caption")
        return default_caption
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8-sig", errors="replace")
        if warn:
            warn(
                f"warning: caption file {path} is not valid UTF-8 (byte {exc.start}); "
                "undecodable bytes were replaced with U+FFFD - re-save it as UTF-8"
            )
    text = _clean(text)
    return text if text else default_caption


def apply_trigger(caption: str, trigger_word: str | None) -> str:
    """Insert the trigger word.

    `[trigger]` is replaced by the trigger word; when a trigger word is set and the caption does not
    contain it, it is prepended ("trigger, caption", or just "trigger" for an empty caption).
    Without a trigger word, `[trigger]` placeholders are removed.
    """
    trigger = (trigger_word or "").strip()
    if TRIGGER_PLACEHOLDER in caption:
        caption = caption.replace(TRIGGER_PLACEHOLDER, trigger)
        if not trigger:
            # tidy what the removed placeholder leaves behind: ", ," / leading commas / double spaces
            caption = re.sub(r"\s*,(\s*,)+", ",", caption)
            caption = re.sub(r"\s{2,}", " ", caption).strip().strip(",").strip()
    if trigger and trigger not in caption:
        caption = f"{trigger}, {caption}" if caption else trigger
    return caption
