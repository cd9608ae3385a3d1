"""What the model sees of a file: an image (decoded as the datasets decode it: EXIF orientation,
RGB) or a few frames of a video spread over the clip (PyAV, through aitk.data.video). A file that
cannot be used raises MediaError, whose text is the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class MediaError(Exception):
    """A file the model cannot see; str() is the reason, e.g. "corrupt or truncated (...)"."""


def is_video(path: Path) -> bool:
    from aitk.data.video import VIDEO_EXTENSIONS

    return path.suffix.lower() in VIDEO_EXTENSIONS


def spread(frame_count: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over a clip of `frame_count` frames (each in the middle of
    its share of the clip), strictly increasing; fewer when the clip is shorter."""
    count = max(1, min(count, frame_count))
    return sorted({min(frame_count - 1, int((i + 0.5) * frame_count / count)) for i in range(count)})


def scale_down(image: Any, max_res: int | None) -> Any:
    """`image` scaled down (aspect kept) to at most max_res^2 pixels; as is when smaller or None."""
    if max_res is None or image.width * image.height <= max_res * max_res:
        return image
    from PIL import Image

    scale = (max_res * max_res / (image.width * image.height)) ** 0.5
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def load_item(path: Path, *, video_frames: int, max_res: int | None) -> list[Any]:
    """The images of one file: [the image], or `video_frames` frames of a video. Raises MediaError."""
    if is_video(path):
        frames = _video_frames(path, video_frames)
    else:
        frames = [_image(path)]
    return [scale_down(frame, max_res) for frame in frames]


def _image(path: Path) -> Any:
    from aitk.data.images import load_image

    try:
        return load_image(path)
    except Exception as exc:  # noqa: BLE001 - any decoding problem is the file's, reported as its reason
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise MediaError(f"not a readable image ({detail})") from None


def _video_frames(path: Path, count: int) -> list[Any]:
    from aitk.data.video import VideoError, probe_video, read_frames

    try:
        info = probe_video(path)
        return read_frames(path, spread(info.frame_count, count))
    except VideoError as exc:
        raise MediaError(f"not a readable video ({exc.reason})") from None
    except Exception as exc:  # noqa: BLE001 - PyAV's own errors on a damaged file
        raise MediaError(f"not a readable video ({type(exc).__name__}: {exc})") from None
