"""Captions: `<stem>.<caption_ext>` files, `metadata.jsonl`, trigger words, per-draw tag processing."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

TRIGGER_PLACEHOLDER = "[trigger]"
METADATA_FILE = "metadata.jsonl"
METADATA_TEXT_KEYS = ("text", "caption", "prompt")  # first one present wins

# Where an image's caption came from (ImageRecord.caption_source).
SOURCE_TXT = "txt"
SOURCE_METADATA = "metadata"
SOURCE_DEFAULT = "default"


def caption_path(image_path: Path, caption_ext: str) -> Path:
    """The caption file of an image: same folder, same stem, extension `caption_ext` ("txt" or ".txt")."""
    ext = caption_ext.strip().lstrip(".") or "txt"
    return image_path.with_name(f"{image_path.stem}.{ext}")


def _clean(text: str) -> str:
    # One caption per file: line breaks become spaces, runs of spaces collapse, ends are trimmed.
    return re.sub(r"[ \t]*[\r\n]+[ \t]*", " ", text).strip()


def _decode(raw: bytes, path: Path, warn: Callable[[str], None] | None, what: str = "caption file") -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if warn:
            warn(
                f"warning: {what} {path} is not valid UTF-8 (byte {exc.start}); "
                "undecodable bytes were replaced with U+FFFD - re-save it as UTF-8"
            )
        return raw.decode("utf-8-sig", errors="replace")


def leads_outside(path: Path, folder: Path) -> bool:
    """Whether `path`, an entry of `folder`, is a link (or under one) that resolves outside `folder`."""
    try:
        return not path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a link loop
        return True


def _read_caption_file(path: Path, warn: Callable[[str], None] | None, confine: Path | None = None) -> str:
    """Cleaned text of a caption file; "" when it is missing, unreadable or blank, or (with
    `confine`) a link leading outside that folder."""
    if confine is not None and leads_outside(path, confine):
        if warn:
            warn(f"warning: caption file {path} is a link leading outside {confine}; it is not read here")
        return ""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        if warn:
            warn(f"warning: caption file {path} could not be read ({exc}); using the default caption")
        return ""
    return _clean(_decode(raw, path, warn))


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
    return resolve_caption(image_path, image_path.name, caption_ext, default_caption, None, warn)[0]


def resolve_caption(
    image_path: Path,
    rel: str,
    caption_ext: str,
    default_caption: str,
    metadata: dict[str, str] | None,
    warn: Callable[[str], None] | None = None,
    confine: Path | None = None,
) -> tuple[str, str]:
    """(caption text, source) of one image; source is "txt", "metadata" or "default".

    Order: a non-blank `<stem>.<caption_ext>` file, then the image's line in metadata.jsonl (looked
    up by `rel`, the '/'-separated path relative to the dataset folder), then `default_caption`.
    With `confine` (a folder), a caption file that is a link leading outside it is not read.
    """
    text = _read_caption_file(caption_path(image_path, caption_ext), warn, confine)
    if text:
        return text, SOURCE_TXT
    if metadata:
        text = metadata.get(rel, "")
        if text:
            return text, SOURCE_METADATA
    return default_caption, SOURCE_DEFAULT


def _normalise_name(name: str) -> str:
    name = name.replace("\\", "/").strip()
    while name.startswith("./"):
        name = name[2:]
    return name


def read_metadata_captions(
    folder: Path, warn: Callable[[str], None] | None = None, confine: bool = False
) -> dict[str, str]:
    """Captions from `<folder>/metadata.jsonl` (Hugging Face imagefolder layout).

    One JSON object per line: {"file_name": "a.png", "text": "..."} ("caption" or "prompt" are
    accepted instead of "text"). `file_name` is relative to the folder. Bad lines are skipped with a
    warning naming the file and line; a missing file gives {}, and so does (with `confine`) a link
    leading outside the folder.
    """
    path = folder / METADATA_FILE
    if confine and path.is_symlink() and leads_outside(path, folder):
        if warn:
            warn(f"warning: {path} is a link leading outside {folder}; it is not read here")
        return {}
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        if warn:
            warn(f"warning: {path} could not be read ({exc}); its captions are not used")
        return {}
    text = _decode(raw, path, warn, what="caption metadata")
    captions: dict[str, str] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not valid JSON ({exc.msg})")
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            problems.append(f'line {number}: needs a "file_name" string')
            continue
        value = next((entry[k] for k in METADATA_TEXT_KEYS if k in entry), None)
        if value is None:
            problems.append(f'line {number}: has none of the keys {", ".join(METADATA_TEXT_KEYS)}')
            continue
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            value = value[0]  # several captions per image: the first one
        if not isinstance(value, str):
            problems.append(f"line {number}: the caption is not a string")
            continue
        name = _normalise_name(entry["file_name"])
        if name in captions:
            problems.append(f"line {number}: {name} is listed again (the later line wins)")
        captions[name] = _clean(value)
    if problems and warn:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        warn(f"warning: {path}: {len(problems)} line(s) not used: {shown}")
    return captions


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


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, trimmed, empty ones removed."""
    return [t.strip() for t in caption.split(",") if t.strip()]


def process_tags(
    raw_caption: str,
    trigger_word: str | None,
    *,
    shuffle: bool,
    keep_tokens: int,
    token_dropout_rate: float,
    rng: np.random.Generator,
) -> str:
    """One draw's caption with tag shuffling / dropout, trigger applied afterwards.

    The caption (before the trigger word is added) is split at commas. The first `keep_tokens` tags
    stay in place and are never dropped. Every other tag is dropped with probability
    `token_dropout_rate`, except a tag holding the trigger word or `[trigger]`, which is never
    dropped. With `shuffle` the remaining non-kept tags are put in random order. Then the trigger
    word is applied as usual (apply_trigger), so it is always in the result.
    """
    tags = split_tags(raw_caption)
    keep = max(0, int(keep_tokens))
    head, tail = tags[:keep], tags[keep:]
    if token_dropout_rate > 0 and tail:
        trigger = (trigger_word or "").strip()
        draws = rng.random(len(tail))
        tail = [
            t
            for t, u in zip(tail, draws)
            if u >= token_dropout_rate or TRIGGER_PLACEHOLDER in t or (trigger and trigger in t)
        ]
    if shuffle and len(tail) > 1:
        tail = [tail[i] for i in rng.permutation(len(tail))]
    return apply_trigger(", ".join(head + tail), trigger_word)
