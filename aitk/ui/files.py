"""Reading what a run wrote (docs/outputs.md) and what a dataset folder holds, for the API.

Every path here comes from a folder the caller already resolved safely (security.safe_join); the
helpers only list and read.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from aitk.trainer.checkpoint import MANIFEST, list_checkpoints
from aitk.fsutil import atomic_write_bytes
from aitk.ui.security import inside, media_kind

SAMPLE_RE = re.compile(r"^(\d{9})_(\d+)\.(jpg|jpeg|png|webp|mp4)$")
STEP_FILE_RE = re.compile(r"_(\d{9})(?:_[a-z_]+)?\.safetensors$")


def read_status(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "status.json"
    if not inside(run_dir, path):
        return None  # a link leading outside the run folder is not read
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not there yet, or caught between writes on a file system without atomic rename
    return data if isinstance(data, dict) else None


def tail_lines(path: Path, lines: int = 200, max_bytes: int = 1 << 20) -> list[str]:
    """The last `lines` lines of a text file, reading at most `max_bytes` from its end."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            start = max(0, size - max_bytes)
            handle.seek(start)
            data = handle.read()
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace")
    # tqdm redraws its bar with carriage returns; the last state of each line is what a terminal shows
    out = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    if start > 0:
        out = out[1:]  # the first line was cut in the middle
    if out and out[-1] == "":
        out = out[:-1]
    return out[-lines:]


def samples(run_dir: Path) -> list[dict[str, Any]]:
    """Preview files grouped by step: images (jpg) and videos (mp4, with a webp beside each)."""
    folder = run_dir / "samples"
    by_step: dict[int, list[dict[str, Any]]] = {}
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            match = SAMPLE_RE.match(entry.name)
            if not match or not entry.is_file():
                continue
            step, index, ext = int(match[1]), int(match[2]), match[3]
            kind = "video" if ext == "mp4" else ("animation" if ext == "webp" else "image")
            by_step.setdefault(step, []).append({
                "name": entry.name, "path": f"samples/{entry.name}", "index": index, "kind": kind,
                "size": entry.stat().st_size,
            })
    return [{"step": step, "files": files} for step, files in sorted(by_step.items())]


def lora_files(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    if run_dir.is_dir():
        for entry in sorted(run_dir.glob("*.safetensors")):
            match = STEP_FILE_RE.search(entry.name)
            st = entry.stat()
            out.append({
                "name": entry.name, "path": entry.name, "size": st.st_size, "modified": st.st_mtime,
                "step": int(match[1]) if match else None, "final": match is None,
            })
    return out


def checkpoint_folders(run_dir: Path) -> list[dict[str, Any]]:
    """Checkpoint folders, newest first. `complete` means the manifest is there (written last);
    checking every checksum is left to resume, as it reads gigabytes."""
    out = []
    for info in list_checkpoints(run_dir / "checkpoints"):
        files = sorted(p.name for p in info.path.iterdir() if p.is_file())
        out.append({
            "step": info.step, "name": info.path.name, "complete": (info.path / MANIFEST).is_file(),
            "files": [{"name": f, "path": f"checkpoints/{info.path.name}/{f}"} for f in files],
        })
    return out


# ------------------------------------------------------------------------------------ datasets


def _own_file(folder: Path, entry: Path) -> bool:
    """A regular file of `folder` that is not a link leading outside it (never listed nor read)."""
    return entry.is_file() and inside(folder, entry)


def read_caption(item: Path) -> str | None:
    """The caption file beside a dataset item (`<stem>.txt`), as text; None when there is none or
    it is a link leading outside the dataset folder. Bytes that are not UTF-8 are replaced."""
    path = item.with_suffix(".txt")
    if not _own_file(item.parent, path):
        return None
    try:
        return path.read_bytes().decode("utf-8-sig", errors="replace")
    except OSError:
        return None


def dataset_items(folder: Path) -> list[dict[str, Any]]:
    items = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
        if entry.name.startswith(".") or not _own_file(folder, entry):
            continue
        kind = media_kind(entry.name)
        if kind is None:
            continue
        caption = read_caption(entry)
        st = entry.stat()
        items.append({
            "name": entry.name, "kind": kind, "size": st.st_size, "modified": st.st_mtime,
            "caption": caption, "has_caption": caption is not None,
        })
    return items


def dataset_summary(folder: Path) -> dict[str, Any]:
    images = videos = captions = size = 0
    for entry in folder.iterdir():
        if entry.name.startswith(".") or not _own_file(folder, entry):
            continue
        kind = media_kind(entry.name)
        if kind == "image":
            images += 1
        elif kind == "video":
            videos += 1
        elif entry.suffix == ".txt":
            captions += 1
        size += entry.stat().st_size
    return {"name": folder.name, "images": images, "videos": videos, "captions": captions, "bytes": size}


def write_caption(item: Path, caption: str) -> Path:
    path = item.with_suffix(".txt")
    atomic_write_bytes(path, caption.encode("utf-8"))
    return path


def thumbnail(source: Path, cache: Path, size: int = 256) -> Path:
    """A small JPEG of an image or of a video's first frame, cached by file, size and mtime."""
    st = source.stat()
    target = cache / f"{source.name}.{st.st_mtime_ns}.{st.st_size}.{size}.jpg"
    if target.is_file():
        return target
    from PIL import Image, ImageOps

    if media_kind(source.name) == "video":
        image = _first_frame(source)
    else:
        with Image.open(source) as opened:
            w, h = opened.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and w * h > limit:  # Pillow itself refuses only above twice its limit
                raise ValueError(f"too large ({w}x{h} pixels, over Pillow's decompression-bomb limit of {limit})")
            image = ImageOps.exif_transpose(opened)
            image.load()
    image = image.convert("RGB")
    image.thumbnail((size, size))
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob(f"{source.name}.*.jpg"):  # an older version of the same file
        old.unlink(missing_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    image.save(tmp, "JPEG", quality=82)
    os.replace(tmp, target)
    return target


def _first_frame(path: Path) -> Any:
    from aitk.data.video import read_frames

    frames = read_frames(path, [0])
    if not frames:
        raise ValueError(f"{path.name}: no frame could be decoded")
    return frames[0]
