"""Video clips: every container decodes, fps resampling, frame-count rules, jitter, buckets, bad files.

Clips are generated with PyAV (tiny: 32x24, 40 frames). Frame i is a solid colour that encodes i
(`colour(i)` / `index_of`), so tests can check which source frames were picked.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av")

from aitk.data import video as V  # noqa: E402
from aitk.data.video import (  # noqa: E402
    VIDEO_EXTENSIONS,
    ClipPlan,
    VideoError,
    VideoInfo,
    frame_indices,
    plan_clip,
    probe_video,
    read_frames,
    short_clip_message,
    snap_frame_count,
    video_bucket,
)

W, H, N, FPS = 32, 24, 40, 30


def colour(i: int) -> tuple[int, int, int]:
    return ((i % 8) * 32 + 16, (i // 8) * 32 + 16, 128)


def index_of(img: Image.Image) -> int:
    a = np.asarray(img.convert("RGB"), dtype=np.float64)
    r, g, _ = a[H // 2 - 4 : H // 2 + 4, W // 2 - 4 : W // 2 + 4].reshape(-1, 3).mean(0)
    return int(round((r - 16) / 32)) + 8 * int(round((g - 16) / 32))


def has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:
        return False


def write_clip(path: Path, codec: str, n: int = N, fps: int = FPS, fmt: str | None = None, options=None,
               size: tuple[int, int] = (W, H)):
    """Frame i is the solid colour `colour(i)`; `size` is (width, height)."""
    w, h = size
    with av.open(str(path), "w", format=fmt, options=options or {}) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if codec in ("libx264", "h264"):
            s.options = {"preset": "ultrafast"}
        for i in range(n):
            arr = np.empty((h, w, 3), np.uint8)
            arr[:] = colour(i)
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_gif(path: Path, n: int = N, duration_ms: int = 100) -> Path:
    frames = [Image.new("RGB", (W, H), colour(i)) for i in range(n)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return path


def h264_or_mpeg4() -> str:
    for name in ("libx264", "h264", "mpeg4"):
        if has_encoder(name):
            return name
    pytest.skip("PyAV has neither an h264 (libx264) nor an mpeg4 encoder")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    codec = h264_or_mpeg4()
    out = {
        "mp4": write_clip(d / "clip.mp4", codec),
        "mov": write_clip(d / "clip.mov", codec),
        "mkv": write_clip(d / "clip.mkv", codec),
        "gif": write_gif(d / "clip.gif"),
    }
    if has_encoder("mpeg4"):
        out["mp4-mpeg4"] = write_clip(d / "mpeg4.mp4", "mpeg4")
    if has_encoder("libvpx"):
        out["webm"] = write_clip(d / "clip.webm", "libvpx")
    if has_encoder("libvpx-vp9"):
        out["webm-vp9"] = write_clip(d / "vp9.webm", "libvpx-vp9")
    return out


FORMATS = ["mp4", "mp4-mpeg4", "mov", "mkv", "webm", "webm-vp9", "gif"]
MISSING = {"mp4-mpeg4": "mpeg4", "webm": "libvpx (vp8)", "webm-vp9": "libvpx-vp9 (vp9)"}


def clip_of(clips: dict[str, Path], kind: str) -> Path:
    if kind not in clips:
        pytest.skip(f"PyAV has no {MISSING.get(kind, kind)} encoder, cannot make a {kind} clip")
    return clips[kind]


# ------------------------------------------------------------------------------- formats decode


def test_extensions():
    assert VIDEO_EXTENSIONS == frozenset({".mp4", ".webm", ".mov", ".mkv", ".gif"})


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_probes_and_decodes(clips, kind):
    path = clip_of(clips, kind)
    info = probe_video(path)
    assert (info.width, info.height, info.frame_count) == (W, H, N)
    assert info.path == path
    expected_fps = 10.0 if kind == "gif" else float(FPS)
    assert info.fps == pytest.approx(expected_fps, rel=0.01)
    assert info.duration_s == pytest.approx(N / expected_fps, rel=0.05)
    frames = read_frames(path, list(range(N)))
    assert len(frames) == N
    assert all(f.mode == "RGB" and f.size == (W, H) for f in frames)
    assert [index_of(f) for f in frames] == list(range(N))


def test_read_frames_keeps_the_requested_order(clips):
    frames = read_frames(clips["mkv"], [9, 2, 30, 2])
    assert [index_of(f) for f in frames] == [9, 2, 30, 2]
    assert read_frames(clips["mkv"], []) == []
    with pytest.raises(ValueError):
        read_frames(clips["mkv"], [-1, 3])


def test_rotation_metadata_is_applied(tmp_path):
    path = tmp_path / "portrait.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream(h264_or_mpeg4(), rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.set_display_rotation(90)
        arr = np.zeros((H, W, 3), np.uint8)
        arr[:, : W // 2] = 255  # left half white
        for _ in range(3):
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    info = probe_video(path)
    assert (info.width, info.height, info.rotation) == (H, W, 90)
    (img,) = read_frames(path, [0])
    assert img.size == (H, W)
    a = np.asarray(img, dtype=np.int32)
    # rotated 90 degrees counter-clockwise: the left half becomes the bottom half
    assert a[-4:].mean() > 200 and a[:4].mean() < 60


def test_transparent_gif_is_composited_on_white(tmp_path):
    frames = []
    for i in range(3):
        im = Image.new("RGB", (W, H), (255, 0, i * 20))  # frames differ, or PIL merges them
        im.paste((0, 255, 0), (0, 0, W // 2, H))
        frames.append(im.convert("P"))
    t = frames[0].getpixel((0, 0))
    path = tmp_path / "alpha.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, transparency=t, disposal=2)
    img = read_frames(path, [1])[0]
    assert img.mode == "RGB"
    assert img.getpixel((2, 2)) == (255, 255, 255)
    r, g, b = img.getpixel((W - 2, 2))
    assert r > 200 and g < 60 and 0 < b < 60


# ------------------------------------------------------------------------------ frame-count rules


@pytest.mark.parametrize(
    ("n", "rule", "expected"),
    [
        (-3, "4k+1", 0), (0, "4k+1", 0), (1, "4k+1", 1), (2, "4k+1", 1), (4, "4k+1", 1),
        (5, "4k+1", 5), (8, "4k+1", 5), (9, "4k+1", 9), (16, "4k+1", 13), (33, "4k+1", 33),
        (40, "4k+1", 37), (41, "4k+1", 41), (80, "4k+1", 77), (81, "4k+1", 81), (84, "4k+1", 81),
        (0, "any", 0), (1, "any", 1), (7, "any", 7), (81, "any", 81),
        (16, "8k+1", 9), (17, "8k+1", 17), (3, "4k", 0), (9, "4k", 8),
    ],
)
def test_snap_frame_count_table(n, rule, expected):
    assert snap_frame_count(n, rule) == expected


def test_snap_frame_count_rejects_unknown_rules():
    with pytest.raises(ValueError, match="frame-count rule"):
        snap_frame_count(9, "odd")


def test_wan_counts_are_always_4k_plus_1():
    for n in range(1, 300):
        m = snap_frame_count(n, "4k+1")
        assert m <= n and (m - 1) % 4 == 0 and m + 4 > n


def info_of(frame_count: int, fps: float = 30.0, path: str = "x.mp4") -> VideoInfo:
    return VideoInfo(Path(path), W, H, fps, frame_count, frame_count / fps)


# ------------------------------------------------------------------------------- fps resampling


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (15.0, [0, 2, 4, 6, 8, 10, 12, 14, 16]),  # 30 -> 15: every 2nd frame
        (10.0, [0, 3, 6, 9, 12, 15, 18, 21, 24]),  # every 3rd
        (24.0, [0, 1, 3, 4, 5, 6, 8, 9, 10]),  # 1.25 apart
        (None, list(range(9))),  # the clip's own rate
        (30.0, list(range(9))),
        (60.0, list(range(9))),  # faster than the clip: its own rate, no duplicated frames
    ],
)
def test_fps_resampling_picks_the_right_source_frames(clips, target, expected):
    path = clips["mp4"]
    info = probe_video(path)
    plan = plan_clip(info, num_frames=9, target_fps=target, shrink=False, frame_rule="4k+1")
    assert plan is not None and plan.frames == 9
    idx = frame_indices(info, plan, rng=None, temporal_jitter=0)
    assert idx == expected
    assert [index_of(f) for f in read_frames(path, idx)] == expected


def test_fps_resampling_of_a_gif(clips):
    info = probe_video(clips["gif"])  # 10 fps
    plan = plan_clip(info, num_frames=5, target_fps=5.0, shrink=False, frame_rule="4k+1")
    idx = frame_indices(info, plan, rng=None, temporal_jitter=0)
    assert idx == [0, 2, 4, 6, 8]
    assert [index_of(f) for f in read_frames(clips["gif"], idx)] == idx


def test_num_frames_is_snapped_to_the_rule():
    plan = plan_clip(info_of(200), num_frames=40, target_fps=None, shrink=False, frame_rule="4k+1")
    assert plan == ClipPlan(frames=37, step=1.0)
    plan = plan_clip(info_of(200), num_frames=40, target_fps=None, shrink=False, frame_rule="any")
    assert plan.frames == 40


def test_random_start_covers_the_slack_and_stays_inside():
    info = info_of(40)
    plan = plan_clip(info, num_frames=9, target_fps=15.0, shrink=False, frame_rule="4k+1")
    starts = set()
    for seed in range(200):
        idx = frame_indices(info, plan, rng=np.random.default_rng(seed), temporal_jitter=0)
        assert [b - a for a, b in zip(idx, idx[1:])] == [2] * 8
        assert 0 <= idx[0] and idx[-1] <= 39
        starts.add(idx[0])
    assert starts == set(range(0, 39 - 16 + 1))


# --------------------------------------------------------------------------- short clips


def test_short_clip_shrink_or_skip(clips):
    info = probe_video(clips["mp4"])  # 40 frames at 30 fps
    plan = plan_clip(info, num_frames=81, target_fps=None, shrink=True, frame_rule="4k+1")
    assert plan.frames == 37
    plan = plan_clip(info, num_frames=81, target_fps=15.0, shrink=True, frame_rule="4k+1")
    assert plan.frames == 17 and plan.step == 2.0  # 20 frames at 15 fps -> 17
    assert plan_clip(info, num_frames=81, target_fps=None, shrink=False, frame_rule="4k+1") is None
    msg = short_clip_message(info, num_frames=81, target_fps=15.0)
    assert "shorter than num_frames (20 frames at 15 fps" in msg
    assert "shrink_video_to_frames: true" in msg
    idx = frame_indices(info, plan_clip(info, num_frames=81, target_fps=None, shrink=True, frame_rule="4k+1"),
                        rng=np.random.default_rng(0), temporal_jitter=0)
    assert len(idx) == 37 and [index_of(f) for f in read_frames(clips["mp4"], idx)] == idx


def test_one_frame_gif_with_num_frames_above_one(tmp_path):
    path = write_gif(tmp_path / "still.gif", n=1)
    info = probe_video(path)
    assert info.frame_count == 1
    assert plan_clip(info, num_frames=5, target_fps=None, shrink=False, frame_rule="4k+1") is None
    assert short_clip_message(info, num_frames=5, target_fps=None).startswith("shorter than num_frames (1 frames")
    plan = plan_clip(info, num_frames=5, target_fps=None, shrink=True, frame_rule="4k+1")
    assert plan.frames == 1
    assert index_of(read_frames(path, frame_indices(info, plan, rng=None, temporal_jitter=0))[0]) == 0


def test_zero_frames_plan_is_none():
    assert plan_clip(info_of(0), num_frames=5, target_fps=None, shrink=True, frame_rule="4k+1") is None
    # "8k+5" accepts no count <= 4: nothing usable -> None
    assert plan_clip(info_of(4), num_frames=9, target_fps=None, shrink=True, frame_rule="8k+5") is None


def test_spread_over_the_whole_clip():
    info = info_of(40)
    plan = plan_clip(info, num_frames=5, target_fps=15.0, shrink=False, frame_rule="4k+1", spread=True)
    assert frame_indices(info, plan, rng=np.random.default_rng(3), temporal_jitter=0) == [0, 10, 20, 29, 39]
    plan = plan_clip(info_of(3), num_frames=5, target_fps=None, shrink=True, frame_rule="any", spread=True)
    assert frame_indices(info_of(3), plan, rng=None, temporal_jitter=0) == [0, 1, 2]


# ------------------------------------------------------------------------------ temporal jitter


def test_jitter_keeps_order_and_bounds_over_many_seeds():
    changed = 0
    cases = [(40, 30.0, 15.0, 9, 2), (40, 30.0, None, 37, 3), (17, 30.0, None, 17, 5), (200, 24.0, 16.0, 81, 4),
             (50, 30.0, 10.0, 17, 1), (9, 30.0, None, 5, 6)]
    for fc, fps, target, n, jitter in cases:
        info = info_of(fc, fps)
        plan = plan_clip(info, num_frames=n, target_fps=target, shrink=True, frame_rule="4k+1")
        for seed in range(150):
            base = frame_indices(info, plan, rng=np.random.default_rng(seed), temporal_jitter=0)
            idx = frame_indices(info, plan, rng=np.random.default_rng(seed), temporal_jitter=jitter)
            again = frame_indices(info, plan, rng=np.random.default_rng(seed), temporal_jitter=jitter)
            assert idx == again  # deterministic given the rng
            assert len(idx) == plan.frames
            assert all(b > a for a, b in zip(idx, idx[1:])), idx
            assert 0 <= idx[0] and idx[-1] <= fc - 1
            assert all(abs(a - b) <= jitter for a, b in zip(idx, base))
            changed += idx != base
    assert changed > 300


def test_no_rng_means_no_randomness():
    info = info_of(100)
    plan = plan_clip(info, num_frames=9, target_fps=15.0, shrink=False, frame_rule="4k+1")
    assert frame_indices(info, plan, rng=None, temporal_jitter=3) == list(range(0, 17, 2))


def test_a_plan_for_a_longer_clip_is_rejected():
    with pytest.raises(ValueError):
        frame_indices(info_of(5), ClipPlan(frames=9, step=1.0), rng=None, temporal_jitter=0)


# ------------------------------------------------------------------------------- frame buckets


def test_video_bucket_never_upscales_and_respects_the_budget():
    sizes = sorted({int(x) for x in np.geomspace(1, 4000, 45)} | {15, 16, 17, 31, 32, 33, 480, 720, 1080, 1920})
    for d in (8, 16, 32):
        for budget in (d * d, 256 * 256, 480 * 832, 512 * 512, 1024 * 1024 + 7):
            for w in sizes:
                for h in sizes:
                    b = video_bucket(w, h, max_pixels=budget, divisibility=d)
                    if w < d or h < d:
                        assert b is None
                        continue
                    assert b is not None, (w, h, budget, d)
                    bw, bh = b
                    assert bw % d == 0 and bh % d == 0 and bw >= d and bh >= d
                    assert bw <= w and bh <= h, (w, h, b)
                    assert bw * bh <= budget, (w, h, b, budget)


def test_video_bucket_keeps_the_aspect_and_uses_the_budget():
    budget = 480 * 832
    for w, h in [(1920, 1080), (1080, 1920), (1280, 720), (640, 480), (1024, 1024), (3840, 1600)]:
        bw, bh = video_bucket(w, h, max_pixels=budget, divisibility=16)
        assert abs(math.log((bw / bh) / (w / h))) < 0.06, (w, h, bw, bh)
        assert bw * bh > 0.85 * min(budget, w * h)
    # small sources are not upscaled: own size, floored to the divisibility
    assert video_bucket(100, 60, max_pixels=budget, divisibility=16) == (96, 48)
    assert video_bucket(W, H, max_pixels=budget, divisibility=8) == (32, 24)
    # one bucket set per budget: clips of similar aspect share a size
    assert video_bucket(1920, 1080, max_pixels=budget, divisibility=16) == video_bucket(
        1280, 720, max_pixels=budget, divisibility=16
    )


def test_video_bucket_rejects_a_budget_below_one_block():
    with pytest.raises(ValueError):
        video_bucket(100, 100, max_pixels=100, divisibility=16)


# ------------------------------------------------------------------------------- bad files


def _expect_video_error(path: Path, *, reason: str | None = None) -> VideoError:
    with pytest.raises(VideoError) as ei:
        probe_video(path)
    assert str(ei.value).startswith(f"{path.name}: "), str(ei.value)
    assert ei.value.path == path
    if reason:
        assert reason in ei.value.reason, ei.value.reason
    with pytest.raises(VideoError) as ei2:
        read_frames(path, [0, 1, 2, 3, 4, 39])
    assert str(ei2.value).startswith(f"{path.name}: ")
    return ei.value


def test_video_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(VideoError(Path("/x/clip.mp4"), "no video stream")))
    assert isinstance(err, VideoError) and str(err) == "clip.mp4: no video stream"
    assert err.path == Path("/x/clip.mp4") and err.reason == "no video stream"


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.mp4"
    p.write_bytes(b"")
    _expect_video_error(p, reason="empty file")


def test_missing_file(tmp_path):
    _expect_video_error(tmp_path / "gone.mp4", reason="unreadable")


def test_random_bytes_named_mp4(tmp_path):
    p = tmp_path / "noise.mp4"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    _expect_video_error(p)


def test_text_file_named_mkv(tmp_path):
    p = tmp_path / "notes.mkv"
    p.write_text("this is not a video\n" * 50)
    _expect_video_error(p, reason="not a readable video")


def test_truncated_mp4_cut_in_half(clips, tmp_path):
    data = clips["mp4"].read_bytes()
    p = tmp_path / "half.mp4"
    p.write_bytes(data[: len(data) // 2])
    _expect_video_error(p)


def test_truncated_faststart_mp4(tmp_path):
    full = write_clip(tmp_path / "fs_full.mp4", h264_or_mpeg4(), options={"movflags": "faststart"})
    data = full.read_bytes()
    p = tmp_path / "fs_half.mp4"
    p.write_bytes(data[: len(data) // 2])
    _expect_video_error(p, reason="truncated")


@pytest.mark.parametrize("kind", ["mkv", "webm"])
def test_truncated_streaming_containers(clips, tmp_path, kind):
    data = clip_of(clips, kind).read_bytes()
    p = tmp_path / f"half.{kind}"
    p.write_bytes(data[: len(data) // 2])
    _expect_video_error(p, reason="truncated")


def test_audio_only_file(tmp_path):
    p = tmp_path / "song.mp4"
    codec = "aac" if has_encoder("aac") else "mp2"
    with av.open(str(p), "w", format="mp4" if codec == "aac" else "matroska") as c:
        s = c.add_stream(codec, rate=44100)
        s.layout = "mono"
        fmt = "fltp" if codec == "aac" else "s16"
        dtype = np.float32 if codec == "aac" else np.int16
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype), format=fmt, layout="mono")
            frame.sample_rate = 44100
            frame.pts = i * 1024
            for pk in s.encode(frame):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    _expect_video_error(p, reason="no video stream")


def test_corrupted_bytes_only_ever_raise_video_error(clips, tmp_path):
    """Garbage in the middle of each file: either it still decodes (error concealment) or VideoError."""
    rng = np.random.default_rng(1)
    for kind, path in clips.items():
        data = bytearray(path.read_bytes())
        for trial in range(3):
            bad = bytearray(data)
            at = int(rng.integers(len(bad) // 4, len(bad) - 64))
            bad[at : at + 48] = rng.integers(0, 256, 48, dtype=np.uint8).tobytes()
            p = tmp_path / f"bad{trial}_{path.name}"
            p.write_bytes(bytes(bad))
            try:
                info = probe_video(p)
                read_frames(p, list(range(info.frame_count)))
            except VideoError as exc:
                assert str(exc).startswith(p.name)


def test_asking_for_more_frames_than_exist(clips):
    with pytest.raises(VideoError, match=r"clip\.mkv: truncated: decoded 40 of 46 frames"):
        read_frames(clips["mkv"], [0, 45])


# ----------------------------------------------------------------------------- decoding stops early


def test_read_frames_stops_after_the_last_needed_frame(clips, monkeypatch):
    seen = []
    original = V._decoded_frames

    def counting(container, stream):
        for frame in original(container, stream):
            seen.append(frame)
            yield frame

    monkeypatch.setattr(V, "_decoded_frames", counting)
    frames = read_frames(clips["mp4"], [0, 3])
    assert [index_of(f) for f in frames] == [0, 3]
    assert len(seen) == 4


def test_read_frames_works_on_a_file_cut_after_the_needed_frames(clips, tmp_path):
    data = clips["mkv"].read_bytes()
    p = tmp_path / "cut.mkv"
    p.write_bytes(data[: int(len(data) * 0.6)])
    assert [index_of(f) for f in read_frames(p, [0, 2, 5])] == [0, 2, 5]
    with pytest.raises(VideoError, match="truncated"):
        read_frames(p, [39])
