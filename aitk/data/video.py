"""Video clips: probing, frame-count planning, frame-rate resampling, decoding, frame-size buckets.

Pure helpers for the data pipeline (no models, no config objects). All decoding goes through PyAV.

Frame indices are positions in decode (presentation) order: frame 0 is the first frame the decoder
outputs. A clip's frames are taken as evenly spaced at `VideoInfo.fps`.

Nothing in here crashes on a bad file: every problem with the file itself (empty, not a video, no
video stream, truncated, undecodable) raises `VideoError`, whose message names the file and the
reason. Programming errors (bad arguments) raise ValueError.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from aitk.data.buckets import budget_buckets

VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".webm", ".mov", ".mkv", ".gif"})


class VideoError(Exception):
    """A video file that cannot be used. `str()` is "<file name>: <reason>"."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path.name}: {reason}")

    def __reduce__(self):  # picklable: data-loader workers send errors to the main process
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` learns. `width`/`height` are the displayed size (rotation applied)."""

    path: Path
    width: int
    height: int
    fps: float
    frame_count: int
    duration_s: float
    rotation: int = 0  # counter-clockwise degrees applied to decoded frames (0, 90, 180, 270)


@dataclass(frozen=True)
class ClipPlan:
    """How a clip is sampled: `frames` frames, `step` source frames apart (step >= 1)."""

    frames: int
    step: float

    @property
    def span(self) -> int:
        """Source-index distance from the first to the last sampled frame (before jitter)."""
        return _offset(self.frames - 1, self.step)

    @property
    def source_indices_span(self) -> float:
        return float(self.span)


# --------------------------------------------------------------------------------------- helpers


def _offset(i: int, step: float) -> int:
    """Source offset of the i-th sampled frame: round half up, so offsets are strictly increasing."""
    return int(math.floor(i * step + 0.5 + 1e-9))


def _why(exc: BaseException) -> str:
    """A short, single-line description of a PyAV / OS error."""
    strerror = getattr(exc, "strerror", None)
    text = strerror if isinstance(strerror, str) and strerror else str(exc)
    text = " ".join(text.split())
    return text or type(exc).__name__


def _check_file(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise VideoError(path, f"unreadable ({_why(exc)})") from exc
    if not path.is_file():
        raise VideoError(path, "not a file")
    if size == 0:
        raise VideoError(path, "empty file")


def _open(path: Path):
    import av

    try:
        return av.open(str(path), mode="r", metadata_errors="ignore")
    except Exception as exc:  # InvalidDataError, OSError, codec/format errors, ...
        raise VideoError(path, f"not a readable video ({_why(exc)})") from exc


def _video_stream(container, path: Path):
    for stream in container.streams.video:
        disposition = getattr(stream, "disposition", None)
        try:
            attached = bool(disposition is not None and disposition & 0x0400)  # ATTACHED_PIC (cover art)
        except TypeError:
            attached = False
        if not attached:
            return stream
    if container.streams.audio:
        raise VideoError(path, "no video stream (audio only)")
    raise VideoError(path, "no video stream")


def _rate(value) -> float:
    try:
        f = float(value) if value is not None else 0.0
    except (TypeError, ValueError, ZeroDivisionError):
        return 0.0
    return f if math.isfinite(f) and 0.0 < f < 10_000.0 else 0.0


def _normalise_rotation(deg) -> int:
    try:
        d = int(round(float(deg) / 90.0)) * 90
    except (TypeError, ValueError):
        return 0
    return d % 360


def _frame_to_rgb(frame) -> Image.Image:
    """A decoded frame as an RGB image: rotation applied, transparency composited on white."""
    fmt = frame.format
    has_alpha = any(getattr(c, "is_alpha", False) for c in fmt.components) or fmt.name in ("pal8",)
    if has_alpha:
        rgba = Image.fromarray(frame.to_ndarray(format="rgba"), mode="RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        img = frame.to_image()
        if img.mode != "RGB":
            img = img.convert("RGB")
    rotation = _normalise_rotation(getattr(frame, "rotation", 0) or 0)
    if rotation == 90:
        img = img.transpose(Image.Transpose.ROTATE_90)
    elif rotation == 180:
        img = img.transpose(Image.Transpose.ROTATE_180)
    elif rotation == 270:
        img = img.transpose(Image.Transpose.ROTATE_270)
    return img


def _decoded_frames(container, stream):
    """Decoded frames of `stream` in presentation order (a hook point for tests)."""
    yield from container.decode(stream)


# ----------------------------------------------------------------------------------------- probe


def probe_video(path: Path) -> VideoInfo:
    """Size, frame rate, frame count and duration of a clip; raises VideoError if it is unusable.

    Uses container metadata; only when the container does not store a frame count (webm, mkv, some
    gifs) are the packets demuxed and counted (no decoding). The first frame is decoded to check
    that the stream decodes at all and to learn its display rotation. Obvious truncation (an mp4
    whose index points past the end of the file, a webm/mkv whose packets stop well before the
    stated duration) is reported here; any other truncation shows up in `read_frames`.
    """
    path = Path(path)
    _check_file(path)
    container = _open(path)
    try:
        return _probe_open(path, container)
    except VideoError:
        raise
    except Exception as exc:  # anything PyAV throws on a damaged file
        raise VideoError(path, f"corrupt or truncated ({_why(exc)})") from exc
    finally:
        try:
            container.close()
        except Exception:
            pass


def _probe_open(path: Path, container) -> VideoInfo:
    stream = _video_stream(container, path)
    tb = stream.time_base
    frame_count = int(stream.frames or 0)
    stream_duration = float(stream.duration * tb) if stream.duration and tb else 0.0
    container_duration = float(container.duration) / 1_000_000 if container.duration else 0.0
    fps = _rate(stream.average_rate) or _rate(stream.guessed_rate) or _rate(stream.base_rate)

    # Truncation of mp4/mov: the sample index (in the moov box) points past the end of the file.
    file_size = path.stat().st_size
    try:
        entries = stream.index_entries or []
    except Exception:
        entries = []
    if entries and container.format is not None and "mp4" in container.format.name:
        end = max(e.pos + e.size for e in entries)
        if end > file_size:
            raise VideoError(path, f"truncated: the video data runs to byte {end} but the file has {file_size}")

    first = None
    if frame_count <= 0:
        # Count packets (no decoding); decode only until the first frame comes out.
        counted = 0
        first_start: float | None = None
        last_start = 0.0
        last_end_any = 0.0
        for packet in container.demux():
            if packet.size == 0:
                continue
            ptb = packet.time_base
            start: float | None = None
            if packet.pts is not None and ptb:
                start = float(packet.pts * ptb)
                end = start + (float(packet.duration * ptb) if packet.duration else 0.0)
                last_end_any = max(last_end_any, end)
            if packet.stream.index != stream.index or packet.is_corrupt:
                continue
            counted += 1
            if start is not None:
                first_start = start if first_start is None else min(first_start, start)
                last_start = max(last_start, start)
            if first is None:
                for frame in packet.decode():
                    first = frame
                    break
        if first is None:
            for frame in stream.decode(None):  # flush: codecs with a delay output their first frame now
                first = frame
                break
        frame_count = counted
        if container_duration > 0 and last_end_any > 0:
            missing = container_duration - last_end_any
            if missing > max(0.25, 0.1 * container_duration):
                raise VideoError(
                    path,
                    f"truncated: data ends at {last_end_any:.2f} s of {container_duration:.2f} s",
                )
        if first_start is not None and counted > 1 and last_start > first_start:
            measured = (counted - 1) / (last_start - first_start)  # also right for variable frame rates
            if not fps or abs(measured - fps) > 0.01 * fps:
                fps = measured
    else:
        for frame in _decoded_frames(container, stream):
            first = frame
            break

    if frame_count <= 0:
        raise VideoError(path, "no video frames")
    if first is None:
        raise VideoError(path, "cannot decode any frame of the video stream")
    duration = stream_duration or container_duration
    if fps <= 0.0:
        if duration <= 0.0:
            raise VideoError(path, "unknown frame rate")
        fps = frame_count / duration
    if duration <= 0.0:
        duration = frame_count / fps
    rotation = _normalise_rotation(getattr(first, "rotation", 0) or 0)
    w, h = int(first.width), int(first.height)
    if rotation in (90, 270):
        w, h = h, w
    if w <= 0 or h <= 0:
        raise VideoError(path, "zero frame size")
    return VideoInfo(
        path=path,
        width=w,
        height=h,
        fps=float(fps),
        frame_count=int(frame_count),
        duration_s=float(duration),
        rotation=rotation,
    )


# ------------------------------------------------------------------------------------ frame counts

_RULE = re.compile(r"^\s*(\d+)\s*k\s*(?:\+\s*(\d+))?\s*$")


@lru_cache(maxsize=32)
def _parse_rule(rule: str) -> tuple[int, int] | None:
    if rule.strip().lower() == "any":
        return None
    m = _RULE.match(rule.lower())
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"unknown frame-count rule {rule!r}; use 'any' or 'Ak+B' such as '4k+1'")
    return int(m.group(1)), int(m.group(2) or 0)


def snap_frame_count(n: int, rule: str) -> int:
    """The largest frame count <= n that the model accepts; 0 when there is none (or n < 1).

    `rule`: "any", or "Ak+B" ("4k+1" for WAN: 1, 5, 9, 13, ...).
    """
    parsed = _parse_rule(rule)
    n = int(n)
    if n < 1:
        return 0
    if parsed is None:
        return n
    a, b = parsed
    if n < b:
        return 0
    m = b + (n - b) // a * a
    return m if m >= 1 else 0


def plan_clip(
    info: VideoInfo,
    *,
    num_frames: int,
    target_fps: float | None,
    shrink: bool,
    frame_rule: str,
    spread: bool = False,
) -> ClipPlan | None:
    """How many frames the clip yields and how far apart they are; None = skip the clip.

    Frames are taken at `target_fps` (None: the clip's own rate). A clip slower than `target_fps`
    is used at its own rate (frames are never duplicated). A clip with fewer frames than
    `num_frames` at that rate is used shorter when `shrink` (snapped to `frame_rule`), else skipped
    (None; see `short_clip_message`).

    `spread=True` spreads the frames evenly over the whole clip instead, ignoring `target_fps`
    (ai-toolkit's `shrink_video_to_frames: true` behaviour).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if target_fps is not None and not target_fps > 0:
        raise ValueError(f"target_fps must be positive, got {target_fps}")
    fc = int(info.frame_count)
    if fc < 1:
        return None
    wanted = snap_frame_count(num_frames, frame_rule)
    if spread:
        step = 1.0
        available = fc
    else:
        step = 1.0 if target_fps is None or target_fps >= info.fps else info.fps / target_fps
        available = int(math.floor((fc - 1) / step + 1e-9)) + 1
        while available > 1 and _offset(available - 1, step) > fc - 1:  # float safety
            available -= 1
    if wanted >= 1 and available >= wanted:
        frames = wanted
    elif shrink:
        frames = snap_frame_count(available, frame_rule)
    else:
        return None
    if frames < 1:
        return None
    if spread and frames > 1:
        step = max(1.0, (fc - 1) / (frames - 1))
        while _offset(frames - 1, step) > fc - 1:  # float safety
            step = math.nextafter(step, 0.0)
    return ClipPlan(frames=frames, step=step)


def short_clip_message(info: VideoInfo, *, num_frames: int, target_fps: float | None) -> str:
    """The reason to log when `plan_clip` returns None for a clip shorter than num_frames."""
    fps = info.fps if target_fps is None else min(info.fps, target_fps)
    step = 1.0 if target_fps is None or target_fps >= info.fps else info.fps / target_fps
    available = int(math.floor((max(info.frame_count, 1) - 1) / step + 1e-9)) + 1
    return (
        f"shorter than num_frames ({available} frames at {fps:g} fps, num_frames is {num_frames}); "
        "set shrink_video_to_frames: true to use it shorter"
    )


def frame_indices(
    info: VideoInfo,
    plan: ClipPlan,
    *,
    rng: np.random.Generator | None,
    temporal_jitter: int,
) -> list[int]:
    """Source frame indices to read: strictly increasing, inside the clip, `plan.frames` of them.

    Evenly spaced `plan.step` apart. With `rng` the start is drawn uniformly over the clip's slack
    and each index moves by a random offset in [-temporal_jitter, temporal_jitter] (order kept);
    without `rng` the clip starts at frame 0 and there is no jitter. Deterministic given the rng.
    """
    fc = int(info.frame_count)
    if plan.frames < 1:
        raise ValueError(f"plan has {plan.frames} frames")
    if plan.step < 1.0:
        raise ValueError(f"plan step must be >= 1, got {plan.step}")
    span = plan.span
    if span > fc - 1:
        raise ValueError(f"plan spans {span + 1} frames but {info.path.name} has {fc}")
    slack = fc - 1 - span
    start = int(rng.integers(0, slack + 1)) if rng is not None and slack > 0 else 0
    base = [start + _offset(i, plan.step) for i in range(plan.frames)]
    j = int(temporal_jitter)
    if rng is None or j <= 0:
        return base
    out: list[int] = []
    prev = -1
    n = plan.frames
    for i, b in enumerate(base):
        lo = max(b - j, prev + 1, 0)
        hi = min(b + j, fc - 1 - (n - 1 - i))  # leave room for the frames after this one
        pick = int(rng.integers(lo, hi + 1)) if hi > lo else lo
        out.append(pick)
        prev = pick
    return out


# ---------------------------------------------------------------------------------------- decoding


def read_frames(path: Path, indices: list[int]) -> list[Image.Image]:
    """Decode the frames at `indices` (RGB, rotation applied), in the order given.

    Decoding stops at max(indices): later frames are never decoded. Raises VideoError when the file
    cannot be decoded or has fewer frames than requested.
    """
    path = Path(path)
    idx = [int(i) for i in indices]
    if not idx:
        return []
    if min(idx) < 0:
        raise ValueError(f"frame indices must be >= 0, got {min(idx)}")
    wanted = set(idx)
    last = max(idx)
    _check_file(path)
    container = _open(path)
    got: dict[int, Image.Image] = {}
    n = 0
    try:
        stream = _video_stream(container, path)
        try:
            stream.thread_type = "AUTO"
        except Exception:
            pass
        for frame in _decoded_frames(container, stream):
            if n in wanted:
                got[n] = _frame_to_rgb(frame)
            n += 1
            if n > last:
                break
    except VideoError:
        raise
    except Exception as exc:
        raise VideoError(path, f"corrupt: decoding failed after {n} frames ({_why(exc)})") from exc
    finally:
        try:
            container.close()
        except Exception:
            pass
    if n <= last:
        raise VideoError(path, f"truncated: decoded {n} of {last + 1} frames")
    return [got[i] for i in idx]


# -------------------------------------------------------------------------------------- frame size


@lru_cache(maxsize=64)
def video_bucket(width: int, height: int, *, max_pixels: int, divisibility: int) -> tuple[int, int] | None:
    """The (w, h) frames of a width x height clip are trained at; None if it is too small.

    The aspect bucket (see `budget_buckets`) of closest aspect ratio that fits inside the frame;
    a frame smaller than every bucket gets its own bucket at its own aspect. Always w*h <=
    max_pixels, both multiples of `divisibility`, w <= width and h <= height (never upscaled).
    Frames are resized to cover the bucket and cropped (`aitk.data.buckets.crop_geometry`).
    """
    d = int(divisibility)
    if d <= 0:
        raise ValueError(f"divisibility must be positive, got {divisibility}")
    if max_pixels < d * d:
        raise ValueError(f"max_pixels {max_pixels} is smaller than one {d}x{d} block")
    if width < d or height < d:
        return None
    fits = [(w, h) for (w, h) in budget_buckets(int(max_pixels), d) if w <= width and h <= height]
    if fits:
        target = math.log(width / height)
        return min(fits, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1], b[0]))
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    w = max(d, int(width * scale) // d * d)
    h = max(d, int(height * scale) // d * d)
    w, h = min(w, width // d * d), min(h, height // d * d)
    while w * h > max_pixels:  # only after clamping a side up to d
        if w >= h and w > d:
            w -= d
        elif h > d:
            h -= d
        else:
            break
    return (w, h)


__all__ = [
    "VIDEO_EXTENSIONS",
    "ClipPlan",
    "VideoError",
    "VideoInfo",
    "budget_buckets",
    "frame_indices",
    "plan_clip",
    "probe_video",
    "read_frames",
    "short_clip_message",
    "snap_frame_count",
    "video_bucket",
]
