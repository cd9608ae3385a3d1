"""Image files: folder scanning, robust decoding, EXIF orientation, RGB conversion, crops.

Nothing in here raises on a bad image file: `scan_folder` skips it with one warning line and counts
the reason. Only a folder that cannot be used at all raises `DatasetError`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from aitk.data.captions import apply_trigger, read_caption

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_EXIF_ORIENTATION = 0x0112
_ROTATING_ORIENTATIONS = {5, 6, 7, 8}  # orientations that swap width and height


class DatasetError(Exception):
    """A dataset that cannot be used at all (missing/empty folder, no usable image)."""


@dataclass
class ImageRecord:
    """One usable image file. `width`/`height` are after EXIF orientation."""

    path: Path
    rel: str  # path relative to the dataset folder, '/'-separated
    width: int
    height: int
    caption: str  # trigger already applied; dropout is per draw
    _content_hash: str | None = field(default=None, repr=False)

    def content_hash(self) -> str:
        """sha256 of the file's bytes (computed once, on demand)."""
        if self._content_hash is None:
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._content_hash = h.hexdigest()
        return self._content_hash


@dataclass
class ScanResult:
    records: list[ImageRecord]
    skipped: Counter  # reason -> count
    num_files: int  # image files found (used + skipped)


def list_image_files(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (not recursive), sorted by name; hidden files ignored."""
    files = [
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    ]
    return sorted(files, key=lambda p: p.name)


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    w, h = img.size
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block must not make the image unusable
        orientation = 1
    return (h, w) if orientation in _ROTATING_ORIENTATIONS else (w, h)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparency is composited on white; 16-bit / float grey is rescaled to 8 bit."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() if arr.size else 0.0
        scale = 255.0 / 65535.0 if top > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: Path, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image fully: EXIF orientation applied, RGB. Raises on any decoding problem.

    `min_size` (oriented width, height) lets JPEG decoding downscale by a power of two while keeping
    at least that size (much faster for large photos; the result is resized afterwards anyway).
    """
    with Image.open(path) as img:
        if min_size is not None and img.format == "JPEG":
            ow, oh = _oriented_size(img)
            rw, rh = min_size
            if (ow, oh) != img.size:
                rw, rh = rh, rw
            img.draft(img.mode, (max(1, rw), max(1, rh)))
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)


def probe_image(path: Path) -> tuple[int, int]:
    """Check that `path` decodes completely; return its (width, height) after EXIF orientation.

    Raises ValueError with a short reason when it cannot be used.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ValueError(f"unreadable ({exc.strerror or exc})") from exc
    if size == 0:
        raise ValueError("empty file")
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError("not a readable image") from exc
    try:
        with img:
            w, h = _oriented_size(img)
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
            img.load()  # decodes everything: truncated / corrupt data fails here
    except Image.DecompressionBombError as exc:
        raise ValueError(f"too large ({exc})") from exc
    except Exception as exc:
        raise ValueError(f"corrupt or truncated ({exc})") from exc
    if w <= 0 or h <= 0:
        raise ValueError("corrupt or truncated (zero size)")
    return w, h


def reason_key(reason: str) -> str:
    """The counted category of a skip reason ("corrupt or truncated (...)" -> "corrupt or truncated")."""
    return reason.split(" (", 1)[0]


def scan_folder(
    folder: Path,
    *,
    caption_ext: str,
    default_caption: str,
    trigger_word: str | None,
    log: Callable[[str], None],
    label: str = "dataset",
) -> ScanResult:
    """Scan an image folder. Raises DatasetError when the folder is missing or holds no image file."""
    if not folder.exists():
        raise DatasetError(
            f"{label}: folder {folder} does not exist - set folder_path to a folder of images "
            f"({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})"
        )
    if not folder.is_dir():
        raise DatasetError(f"{label}: {folder} is not a folder - folder_path must name a folder of images")
    try:
        files = list_image_files(folder)
    except OSError as exc:
        raise DatasetError(
            f"{label}: folder {folder} cannot be read ({exc}) - check its permissions"
        ) from exc
    if not files:
        raise DatasetError(
            f"{label}: folder {folder} contains no images - add image files "
            f"({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) or fix folder_path"
        )
    records: list[ImageRecord] = []
    skipped: Counter = Counter()
    for path in files:
        try:
            w, h = probe_image(path)
        except ValueError as exc:
            log(f"warning: skipping {path}: {exc}")
            skipped[reason_key(str(exc))] += 1
            continue
        caption = read_caption(path, caption_ext, default_caption, warn=log)
        records.append(
            ImageRecord(
                path=path,
                rel=path.relative_to(folder).as_posix(),
                width=w,
                height=h,
                caption=apply_trigger(caption, trigger_word),
            )
        )
    return ScanResult(records=records, skipped=skipped, num_files=len(files))


def crop_to_bucket(
    img: Image.Image,
    scaled: tuple[int, int],
    box: tuple[int, int, int, int],
    flip_x: bool = False,
    flip_y: bool = False,
) -> Image.Image:
    """Resize `img` to `scaled` (never larger than the image) and crop `box` (left, top, right, bottom)."""
    if img.size != scaled:
        img = img.resize(scaled, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if box != (0, 0, scaled[0], scaled[1]):
        img = img.crop(box)
    if flip_x:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if flip_y:
        img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1] from an RGB image."""
    arr = np.array(img, dtype=np.uint8, copy=True)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
