"""Image files: folder scanning, robust decoding, EXIF orientation, RGB conversion, crops.

Nothing in here raises on a bad image file: `scan_folder` skips it with one warning line and counts
the reason. Only a folder that cannot be used at all raises `DatasetError`.
"""

from __future__ import annotations

import hashlib
import io
import stat
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from aitk.data.captions import SOURCE_DEFAULT, apply_trigger, leads_outside, resolve_caption

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_EXIF_ORIENTATION = 0x0112
_ROTATING_ORIENTATIONS = {5, 6, 7, 8}  # orientations that swap width and height
# EXIF orientation -> the transposition that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION_METHOD = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
    raw_caption: str | None = None  # caption text before the trigger word (None: same as caption)
    trigger: str | None = None  # trigger word of its dataset
    caption_source: str = SOURCE_DEFAULT  # "txt", "metadata" or "default"
    mask: Path | None = None  # loss mask file (mask_path)
    controls: tuple[Path, ...] = ()  # control image files, one per control_path folder, in its order
    video: Any | None = None  # aitk.data.video.VideoInfo for a clip; None for a still image

    def content_hash(self) -> str:
        """sha256 of the file's bytes (computed once, on demand)."""
        if self._content_hash is None:
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._content_hash = h.hexdigest()
        return self._content_hash


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str  # the counted category ("corrupt or truncated")
    detail: str  # the full reason ("corrupt or truncated (image file is truncated)")


@dataclass
class ScanResult:
    records: list[ImageRecord]
    skipped: Counter  # reason -> count
    num_files: int  # image files found (used + skipped)
    skipped_files: list[SkippedFile] = field(default_factory=list)


def _has_image_extension(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_image_files(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (not recursive), sorted by name; hidden files ignored."""
    return [p for p in list_image_candidates(folder) if p.is_file()]


def list_image_candidates(folder: Path) -> list[Path]:
    """Every entry named like an image directly inside `folder` (files, folders, links), sorted by name."""
    return sorted((p for p in folder.iterdir() if _has_image_extension(p.name)), key=lambda p: p.name)


def _has_video_extension(name: str) -> bool:
    from aitk.data.video import VIDEO_EXTENSIONS

    return Path(name).suffix.lower() in VIDEO_EXTENSIONS and not name.startswith(".")


def list_video_candidates(folder: Path) -> list[Path]:
    """Every entry named like a video clip directly inside `folder`, sorted by name."""
    return sorted((p for p in folder.iterdir() if _has_video_extension(p.name)), key=lambda p: p.name)


def _probe_video_file(path: Path) -> tuple[int, int, Any]:
    """(width, height, VideoInfo) of a clip; ValueError("<category> (<detail>)") when unusable."""
    from aitk.data.video import VideoError, probe_video

    try:
        info = probe_video(path)
    except VideoError as exc:
        category = exc.reason.split(" (", 1)[0].split(":", 1)[0].strip()
        raise ValueError(f"video {category} ({exc.reason})") from exc
    return info.width, info.height, info


def index_by_stem(folder: Path) -> dict[str, Path]:
    """Image files of a folder by file stem (mask / control folders). On a clash the first name wins."""
    found: dict[str, Path] = {}
    for p in list_image_files(folder):
        found.setdefault(p.stem, p)
    return found


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not make the image unusable
        return 1
    return value if value in _ORIENTATION_METHOD else 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparency is composited on white; 16-bit / 32-bit / float grey is rescaled to 8 bit."""
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit grey (PNG): full range 0..65535 -> 0..255, whatever the image's own maximum is.
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
        arr = np.nan_to_num(arr * scale, nan=0.0)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _open_upright(img: Image.Image, min_size: tuple[int, int] | None) -> Image.Image:
    if img.format == "JPEG":
        orientation = _orientation(img)  # EXIF sits before the image data: known before decoding
        if min_size is not None:
            rw, rh = min_size
            if orientation in _ROTATING_ORIENTATIONS:
                rw, rh = rh, rw
            img.draft(img.mode, (max(1, rw), max(1, rh)))
        img.load()
    else:
        img.load()  # a PNG may keep its EXIF after the image data
        orientation = _orientation(img)
    out = _to_rgb(img)
    method = _ORIENTATION_METHOD.get(orientation)
    return out.transpose(method) if method is not None else out


def load_image(path: Path, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image fully: EXIF orientation applied, RGB. Raises on any decoding problem.

    `min_size` (oriented width, height) lets JPEG decoding downscale by a power of two while keeping
    at least that size (much faster for large photos; the result is resized afterwards anyway).
    """
    with Image.open(path) as img:
        return _open_upright(img, min_size)


def load_mask_image(path: Path, min_size: tuple[int, int] | None = None) -> Image.Image:
    """A loss mask as 8-bit grey ("L"): EXIF orientation applied, transparency composited on white."""
    return load_image(path, min_size).convert("L")


def _check_png_chunks(data: bytes) -> None:
    """Walk the chunks of a PNG and check every CRC (Pillow skips the CRCs of the image data)."""
    pos = len(_PNG_SIGNATURE)
    end = len(data)
    while True:
        if pos + 8 > end:
            raise ValueError("corrupt or truncated (PNG ends before its IEND chunk)")
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        body_end = pos + 8 + length
        if body_end + 4 > end:
            raise ValueError(f"corrupt or truncated (PNG chunk {ctype!r} is cut off)")
        crc = struct.unpack(">I", data[body_end : body_end + 4])[0]
        if zlib.crc32(data[pos + 4 : body_end]) & 0xFFFFFFFF != crc:
            name = ctype.decode("latin-1", "replace")
            raise ValueError(f"corrupt or truncated (bad CRC in the PNG {name} chunk)")
        pos = body_end + 4
        if ctype == b"IEND":
            return


def probe_image(path: Path) -> tuple[int, int]:
    """Check that `path` decodes completely; return its (width, height) after EXIF orientation.

    Raises ValueError with a short reason when it cannot be used. The reason starts with its
    category: "unreadable", "not a file", "broken link", "empty file", "not a readable image",
    "corrupt or truncated", "too large", "too small".
    """
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        if path.is_symlink():
            raise ValueError(f"broken link (points to {_link_target(path)}, which does not exist)") from exc
        raise ValueError("unreadable (the file disappeared)") from exc
    except OSError as exc:
        raise ValueError(f"unreadable ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(st.st_mode):
        raise ValueError("not a file (a folder named like an image)")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a file (not a regular file)")
    if st.st_size == 0:
        raise ValueError("empty file")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ValueError(f"unreadable ({exc.strerror or exc})") from exc
    if not data:
        raise ValueError("empty file")
    if data.startswith(_PNG_SIGNATURE):
        _check_png_chunks(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 12:
        declared = int.from_bytes(data[4:8], "little") + 8
        if declared > len(data):
            raise ValueError(f"corrupt or truncated (WebP file cut off: {len(data)} of {declared} bytes)")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit; the explicit check below skips those too.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ValueError(f"too large ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise ValueError("not a readable image (no known image format in the data)") from exc
    except Exception as exc:
        raise ValueError(f"not a readable image ({exc})") from exc
    try:
        with img:
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ValueError(f"too small ({w}x{h} pixels)")
            if limit is not None and w * h > limit:
                raise ValueError(
                    f"too large ({w}x{h} = {w * h} pixels, over Pillow's decompression-bomb limit of "
                    f"{limit} pixels)"
                )
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))
            img.load()  # decodes everything: truncated / corrupt data fails here
            if _orientation(img) in _ROTATING_ORIENTATIONS:
                w, h = h, w
    except ValueError as exc:
        if str(exc).startswith(("too small", "too large")):
            raise
        raise ValueError(f"corrupt or truncated ({exc})") from exc
    except Image.DecompressionBombError as exc:
        raise ValueError(f"too large ({exc})") from exc
    except Exception as exc:
        raise ValueError(f"corrupt or truncated ({exc})") from exc
    return w, h


def _link_target(path: Path) -> str:
    try:
        return str(path.readlink())
    except OSError:
        return "?"


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
    metadata: dict[str, str] | None = None,
    videos: bool = False,
    confine: bool = False,
) -> ScanResult:
    """Scan an image folder. Raises DatasetError when the folder is missing or holds no image file.

    Entries named like images that are not usable (folders, broken links, bad files) are skipped
    with one warning each and counted by reason. `metadata` is the folder's metadata.jsonl captions.
    With `videos`, clips (mp4, webm, mov, mkv, gif) are scanned too and carry their VideoInfo;
    without it, clips in the folder are skipped with a reason that says how to use them.
    With `confine` (the web UI), links leading outside the folder are skipped unread, images and
    caption files alike; the command line follows them (a dataset of links is a common layout).
    """
    if not folder.exists():
        raise DatasetError(
            f"{label}: folder {folder} does not exist - set folder_path to a folder of images "
            f"({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})"
        )
    if not folder.is_dir():
        raise DatasetError(f"{label}: {folder} is not a folder - folder_path must name a folder of images")
    try:
        clips = list_video_candidates(folder)
        files = sorted(list_image_candidates(folder) + clips, key=lambda p: p.name)
    except OSError as exc:
        raise DatasetError(
            f"{label}: folder {folder} cannot be read ({exc}) - check its permissions"
        ) from exc
    if not files:
        raise DatasetError(
            f"{label}: folder {folder} contains no images - add image files "
            f"({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) or fix folder_path"
        )
    clip_set = set(clips)
    records: list[ImageRecord] = []
    skipped: Counter = Counter()
    skipped_files: list[SkippedFile] = []
    for path in files:
        video = None
        try:
            if confine and leads_outside(path, folder):
                raise ValueError(f"outside the folder (a link to {_link_target(path)}; not followed here)")
            if path not in clip_set:
                w, h = probe_image(path)
            elif not videos:
                raise ValueError(
                    "a video clip (this dataset trains on images; set num_frames above 1 on a video "
                    "model such as WAN to train on clips)"
                )
            else:
                w, h, video = _probe_video_file(path)
        except ValueError as exc:
            log(f"warning: skipping {path}: {exc}")
            skipped[reason_key(str(exc))] += 1
            skipped_files.append(SkippedFile(path, reason_key(str(exc)), str(exc)))
            continue
        rel = path.relative_to(folder).as_posix()
        raw, source = resolve_caption(path, rel, caption_ext, default_caption, metadata, warn=log,
                                      confine=folder if confine else None)
        records.append(
            ImageRecord(
                path=path,
                rel=rel,
                width=w,
                height=h,
                caption=apply_trigger(raw, trigger_word),
                raw_caption=raw,
                trigger=trigger_word,
                caption_source=source,
                video=video,
            )
        )
    return ScanResult(records=records, skipped=skipped, num_files=len(files), skipped_files=skipped_files)


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
