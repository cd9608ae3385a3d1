"""Image folder scanning: extensions, order, EXIF, alpha, bad files, folder errors."""

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from aitk.config.schema import DatasetConfig
from aitk.data import DatasetError, TrainingData
from aitk.data.images import load_image, probe_image, scan_folder


def save_image(path: Path, w: int, h: int, seed: int = 0, mode: str = "RGB", **kw) -> Path:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    Image.fromarray(arr, mode=mode).save(path, **kw)
    return path


def scan(folder, log, trigger=None, **kw):
    return scan_folder(folder, caption_ext=kw.get("caption_ext", "txt"), default_caption=kw.get("default", ""),
                       trigger_word=trigger, log=log)


def test_scan_extensions_order_and_captions(tmp_path):
    save_image(tmp_path / "b.PNG", 32, 32)
    save_image(tmp_path / "a.jpg", 32, 32)
    save_image(tmp_path / "c.JpEg", 32, 32)
    save_image(tmp_path / "d.webp", 32, 32)
    save_image(tmp_path / "e.bmp", 32, 32)
    save_image(tmp_path / ".hidden.png", 32, 32)
    save_image(tmp_path / "f.gif", 32, 32)  # a clip format: skipped, with how to train on clips
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "a.txt").write_text("a cat on a mat", encoding="utf-8")
    (tmp_path / "b.txt").write_text("[trigger] in the snow", encoding="utf-8")
    logs: list[str] = []
    res = scan(tmp_path, logs.append, trigger="sks", default="photo")
    assert [r.rel for r in res.records] == ["a.jpg", "b.PNG", "c.JpEg", "d.webp", "e.bmp"]
    caps = {r.rel: r.caption for r in res.records}
    assert caps["a.jpg"] == "sks, a cat on a mat"
    assert caps["b.PNG"] == "sks in the snow"
    assert caps["c.JpEg"] == "sks, photo"
    (line,) = logs
    assert "f.gif: a video clip" in line and "num_frames" in line
    assert res.num_files == 6 and dict(res.skipped) == {"a video clip": 1}


def test_exif_orientation_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = 255  # left half white in the stored (landscape) pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)
    assert probe_image(path) == (20, 40)
    img = load_image(path)
    assert img.size == (20, 40)
    px = np.asarray(img).astype(int)
    assert px[:15].mean() > 200 and px[25:].mean() < 50  # white half is now on top
    small = load_image(path, min_size=(5, 10))  # JPEG draft decoding keeps orientation and min size
    assert small.size[0] >= 5 and small.size[1] >= 10 and small.size[1] > small.size[0]


def test_alpha_composited_on_white(tmp_path):
    path = tmp_path / "t.png"
    arr = np.zeros((16, 16, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(arr, mode="RGBA").save(path)
    img = load_image(path)
    assert img.mode == "RGB" and np.asarray(img).min() == 255
    gray = tmp_path / "g.png"
    Image.new("L", (16, 16), 7).save(gray)
    assert load_image(gray).mode == "RGB"


def test_bad_files_are_skipped_with_one_warning_each(tmp_path):
    save_image(tmp_path / "good.png", 64, 64)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    save_image(tmp_path / "full.png", 64, 64, seed=3)
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "full.png").unlink()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    jpg = save_image(tmp_path / "tjpg.jpg", 64, 64, seed=4, quality=90).read_bytes()
    (tmp_path / "tjpg.jpg").write_bytes(jpg[: len(jpg) // 2])
    (tmp_path / "good.txt").write_bytes(b"ol\xe9")  # non-UTF-8 caption: used, with a warning
    logs: list[str] = []
    res = scan(tmp_path, logs.append)
    assert [r.rel for r in res.records] == ["good.png"]
    assert res.records[0].caption == "ol\ufffd"
    skipped_warnings = [m for m in logs if m.startswith("warning: skipping")]
    assert len(skipped_warnings) == 4
    for name in ["zero.png", "garbage.jpg", "truncated.png", "tjpg.jpg"]:
        assert sum(name in m for m in skipped_warnings) == 1
    assert any("good.txt" in m and "UTF-8" in m for m in logs)
    assert sum(res.skipped.values()) == 4 and res.skipped["empty file"] == 1


def _cfg(folder, **kw):
    return DatasetConfig(folder_path=str(folder), **kw)


def _td(cfgs, **kw):
    logs: list[str] = []
    kw.setdefault("trigger_word", None)
    kw.setdefault("divisibility", 16)
    kw.setdefault("batch_size", 1)
    kw.setdefault("seed", 0)
    td = TrainingData(cfgs, log=logs.append, **kw)
    return td, logs


def test_summary_line_and_too_small(tmp_path):
    save_image(tmp_path / "ok.png", 80, 64)
    save_image(tmp_path / "tiny.png", 8, 100)
    (tmp_path / "zero.jpg").write_bytes(b"")
    td, logs = _td([_cfg(tmp_path, resolution=64)])
    assert td.summary_lines[0] == f"dataset {tmp_path}: 1 images used, 2 skipped (empty file: 1, too small: 1)"
    assert any("tiny.png" in m and "too small" in m for m in logs)


def test_empty_and_missing_folder_raise(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="contains no images"):
        _td([_cfg(empty)])
    with pytest.raises(DatasetError, match="does not exist"):
        _td([_cfg(tmp_path / "nope")])
    (empty / "only.txt").write_text("caption without image")
    with pytest.raises(DatasetError, match=str(empty)):
        _td([_cfg(empty)])


def test_nothing_usable_raises(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    save_image(tmp_path / "b.png", 4, 4)
    with pytest.raises(DatasetError) as err:
        _td([_cfg(tmp_path, resolution=64)])
    msg = str(err.value)
    assert str(tmp_path) in msg and "empty file: 1" in msg and "too small: 1" in msg
    assert issubclass(DatasetError, Exception)


# ---------------------------------------------------------------- formats and modes

def png_chunk(ctype: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data) & 0xFFFFFFFF)


def raw_png(w: int, h: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (for modes Pillow cannot write, e.g. 16-bit RGB)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def _grid(w: int = 48, h: int = 32) -> np.ndarray:
    """A 3x2 grid of distinct colours: any flip / rotation changes it."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    for i, c in enumerate(colours):
        r, col = divmod(i, 3)
        arr[r * h // 2:(r + 1) * h // 2, col * w // 3:(col + 1) * w // 3] = c
    return arr


# How the stored pixels relate to the displayed ones for each EXIF orientation (EXIF 2.3, 0x0112),
# written with numpy only (independent of Pillow's transpose table).
STORED_FROM_DISPLAYED = {
    1: lambda d: d,
    2: lambda d: d[:, ::-1],
    3: lambda d: d[::-1, ::-1],
    4: lambda d: d[::-1, :],
    5: lambda d: d.transpose(1, 0, 2),
    6: lambda d: np.rot90(d, 1),
    7: lambda d: d.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda d: np.rot90(d, -1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_every_exif_orientation(tmp_path, orientation, fmt):
    shown = _grid()
    stored = np.ascontiguousarray(STORED_FROM_DISPLAYED[orientation](shown))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.{fmt}"
    kw = {"jpg": {"quality": 98}, "webp": {"lossless": True}}.get(fmt, {})
    Image.fromarray(stored).save(path, exif=exif.tobytes(), **kw)
    assert probe_image(path) == (48, 32)
    got = np.asarray(load_image(path)).astype(int)
    assert got.shape == shown.shape
    if fmt != "jpg":
        assert np.array_equal(got, shown)
    else:  # compare the centres of the blocks (JPEG blurs the edges)
        for r in range(2):
            for c in range(3):
                y, x = r * 16 + 8, c * 16 + 8
                assert np.abs(got[y - 2:y + 2, x - 2:x + 2] - shown[y, x]).max() < 40, (orientation, r, c)
    # reduced JPEG decoding (draft) keeps the orientation too
    small = load_image(path, min_size=(12, 8))
    assert small.size[0] >= 12 and small.size[1] >= 8 and small.size[0] > small.size[1]


@pytest.mark.parametrize("ext", ["jpg", "jpeg", "png", "webp", "bmp", "JPG", "Png"])
def test_formats_decode_to_rgb(tmp_path, ext):
    arr = _grid()
    path = tmp_path / f"x.{ext}"
    kw = {"jpg": {"quality": 98}, "jpeg": {"quality": 98}, "webp": {"lossless": True}}.get(ext.lower(), {})
    Image.fromarray(arr).save(path, format={"jpg": "JPEG"}.get(ext.lower(), ext.upper()), **kw)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (48, 32)
    tol = 40 if ext.lower() in ("jpg", "jpeg") else 0
    assert np.abs(np.asarray(img).astype(int)[8, 8] - arr[8, 8]).max() <= tol


def _load_array(path: Path) -> np.ndarray:
    img = load_image(path)
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def test_mode_rgba_and_la_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 128)  # half-transparent red
    rgba[1, 1] = (0, 0, 255, 255)  # opaque blue
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    got = _load_array(tmp_path / "a.png")
    assert np.abs(got[0, 0] - (255, 127, 127)).max() <= 1
    assert got[1, 1].tolist() == [0, 0, 255] and got[3, 3].tolist() == [255, 255, 255]
    la = np.zeros((4, 4, 2), dtype=np.uint8)
    la[0, 0] = (0, 255)  # opaque black; the rest transparent black
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    got = _load_array(tmp_path / "la.png")
    assert got[0, 0].tolist() == [0, 0, 0] and got[2, 2].tolist() == [255, 255, 255]
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.webp", lossless=True)
    assert _load_array(tmp_path / "a.webp")[3, 3].tolist() == [255, 255, 255]


def test_mode_grayscale_palette_bilevel(tmp_path):
    Image.new("L", (4, 4), 100).save(tmp_path / "l.png")
    assert _load_array(tmp_path / "l.png")[0, 0].tolist() == [100, 100, 100]
    Image.new("L", (4, 4), 100).save(tmp_path / "l.jpg", quality=100)
    assert np.abs(_load_array(tmp_path / "l.jpg")[0, 0] - 100).max() <= 2
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.save(tmp_path / "p.png")
    got = _load_array(tmp_path / "p.png")
    assert got[0, 0].tolist() == [10, 20, 30] and got[1, 1].tolist() == [200, 100, 50]
    pal.save(tmp_path / "pt.png", transparency=0)  # palette index 0 transparent
    got = _load_array(tmp_path / "pt.png")
    assert got[0, 0].tolist() == [255, 255, 255] and got[1, 1].tolist() == [200, 100, 50]
    pal.save(tmp_path / "p.bmp")
    assert _load_array(tmp_path / "p.bmp")[1, 1].tolist() == [200, 100, 50]
    one = Image.new("1", (4, 4), 0)
    one.putpixel((0, 0), 1)
    one.save(tmp_path / "one.png")
    one.save(tmp_path / "one.bmp")
    for name in ("one.png", "one.bmp"):
        got = _load_array(tmp_path / name)
        assert got[0, 0].tolist() == [255, 255, 255] and got[1, 1].tolist() == [0, 0, 0]
    Image.new("L", (4, 4), 10).save(tmp_path / "lt.png", transparency=10)  # grey with a transparent value
    assert _load_array(tmp_path / "lt.png")[0, 0].tolist() == [255, 255, 255]


def test_mode_cmyk_jpeg(tmp_path):
    img = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # cyan
    img.paste((0, 0, 0, 255), (0, 0, 8, 16))  # black left half
    img.save(tmp_path / "c.jpg", quality=100)
    got = _load_array(tmp_path / "c.jpg")
    assert np.abs(got[8, 12] - (0, 255, 255)).max() <= 8
    assert got[8, 3].max() <= 8


def test_mode_16bit_png_scaled_not_clipped(tmp_path):
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535 -> 0..255
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = _load_array(tmp_path / "g16.png")
    assert np.array_equal(got[..., 0], np.arange(256).reshape(16, 16))
    # a dark 16-bit image stays dark (no per-image rescaling)
    dark = np.full((8, 8), 200, dtype=np.uint16)
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    assert _load_array(tmp_path / "dark16.png").max() <= 1
    # 16-bit RGB (Pillow has no writer for it: hand-made PNG), big-endian samples
    rgb16 = np.zeros((4, 4, 3), dtype=">u2")
    rgb16[..., 0] = 65535
    rgb16[..., 1] = 32896  # 128 * 257
    rows = b"".join(b"\x00" + rgb16[y].tobytes() for y in range(4))
    (tmp_path / "rgb16.png").write_bytes(raw_png(4, 4, 16, 2, rows))
    assert probe_image(tmp_path / "rgb16.png") == (4, 4)
    got = _load_array(tmp_path / "rgb16.png")
    assert got[0, 0].tolist() == [255, 128, 0]


# ---------------------------------------------------------------- broken files

def _jpeg_bytes(w=30, h=30, seed=0) -> bytes:
    import io

    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_bytes(w=30, h=30, seed=0, fmt="PNG", **kw) -> bytes:
    import io

    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bad_crc_png() -> bytes:
    data = bytearray(_png_bytes(seed=5))
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4:idat], "big")
    data[idat + 4 + length] ^= 0xFF  # first byte of the IDAT chunk's CRC
    return bytes(data)


def _bad_zlib_png() -> bytes:
    import zlib

    rows = b"".join(b"\x00" + bytes(range(48)) for _ in range(16))
    good = zlib.compress(rows)
    broken = good[:10] + bytes(b ^ 0x5A for b in good[10:30]) + good[30:]
    ihdr = (16).to_bytes(4, "big") + (16).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", broken) + png_chunk(b"IEND", b"")


# name -> (bytes or a callable making the entry, expected reason category)
BROKEN = {
    "zero.png": (b"", "empty file"),
    "random.jpg": (np.random.default_rng(1).bytes(3000), "not a readable image"),
    "random.png": (np.random.default_rng(2).bytes(3000), "not a readable image"),
    "truncated.jpg": (_jpeg_bytes()[: len(_jpeg_bytes()) // 2], "corrupt or truncated"),
    "truncated.png": (_png_bytes()[: len(_png_bytes()) // 2], "corrupt or truncated"),
    "badcrc.png": (_bad_crc_png(), "corrupt or truncated"),
    "badzlib.png": (_bad_zlib_png(), "corrupt or truncated"),
    "headeronly.jpg": (_jpeg_bytes()[: _jpeg_bytes().index(b"\xff\xda") + 14], "corrupt or truncated"),
    "soi.jpeg": (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00", "not a readable image"),
    "text.webp": (b"just some notes, saved with the wrong name\n" * 5, "not a readable image"),
    "truncated.webp": (_png_bytes(fmt="WEBP")[:300], "corrupt or truncated"),
    "truncated.bmp": (_png_bytes(fmt="BMP")[:500], "corrupt or truncated"),
    "pngsig.bmp": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "corrupt or truncated"),
    "zerosize.png": (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", bytes(8) + bytes([8, 2, 0, 0, 0]))
                     + png_chunk(b"IEND", b""), "not a readable image"),
    "one.png": (_png_bytes(1, 1), "too small"),
    "tiny.jpg": (_jpeg_bytes(8, 8), "too small"),
    "thin.png": (_png_bytes(90, 10), "too small"),
    "bomb.png": (_png_bytes(200, 200, fmt="PNG"), "too large"),  # over 2x the patched limit: Pillow raises
    "bigish.png": (_png_bytes(40, 40, fmt="PNG"), "too large"),  # between 1x and 2x: Pillow only warns
}


def _make_broken_folder(folder: Path) -> dict[str, str]:
    expected = {}
    for name, (data, reason) in BROKEN.items():
        (folder / name).write_bytes(data)
        expected[name] = reason
    (folder / "dir.png").mkdir()
    expected["dir.png"] = "not a file"
    (folder / "link.jpg").symlink_to(folder / "missing-target.jpg")
    expected["link.jpg"] = "broken link"
    return expected


def test_fifteen_plus_kinds_of_broken_file(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 and 200x200 are "too large"
    expected = _make_broken_folder(tmp_path)
    save_image(tmp_path / "good.png", 30, 30)  # 900 pixels: under the patched limit
    (tmp_path / "good.txt").write_bytes(b"caf\xe9")  # not UTF-8: image kept, caption replaced, warning
    save_image(tmp_path / "ok.bmp", 30, 20)
    (tmp_path / "ok.jpg").write_bytes(_png_bytes(20, 30))  # a PNG named .jpg: decoded by content
    assert len(expected) >= 15
    td, logs = _td([_cfg(tmp_path, resolution=64)])
    rep = td.reports[0]
    assert sorted(r.rel for r in rep.records) == ["good.png", "ok.bmp", "ok.jpg"]
    assert rep.records[0].caption == "caf\ufffd"
    assert sum("good.txt" in m and "UTF-8" in m for m in logs) == 1
    skips = [m for m in logs if m.startswith("warning: skipping")]
    assert len(skips) == len(expected)
    got = {s.path.name: s.reason for s in rep.skipped_files}
    assert got == expected
    for name in expected:  # exactly one warning line per file, naming the file
        assert sum(f"{tmp_path / name}:" in m for m in skips) == 1, name
    summary = td.summary_lines[0]
    assert summary.startswith(f"dataset {tmp_path}: 3 images used, {len(expected)} skipped (")
    from collections import Counter

    for reason, n in Counter(expected.values()).items():
        assert f"{reason}: {n}" in summary
    # the data still trains
    for _ in range(td.batches_per_epoch()):
        assert td.next_batch().pixels is not None


def test_no_warnings_module_noise_for_bombs(tmp_path, monkeypatch, recwarn):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    (tmp_path / "bigish.png").write_bytes(_png_bytes(40, 40))
    with pytest.raises(ValueError, match="too large"):
        probe_image(tmp_path / "bigish.png")
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def _as_nobody(work: Any) -> Any:
    """Run `work()` in a forked child that has dropped root (root reads chmod 000 files); its
    JSON-able result comes back through a pipe."""
    import json

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            with os.fdopen(write_end, "w") as out:
                json.dump(work(), out)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as answer:
        text = answer.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged child failed"
    return json.loads(text)


def test_unreadable_file_chmod_000():
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="aitk-chmod-"))  # outside root's 0700 pytest folder
    try:
        save_image(folder / "good.png", 32, 32)
        locked = save_image(folder / "locked.png", 32, 32)
        locked.chmod(0)
        if os.geteuid() == 0:
            os.chown(folder, 65534, 65534)
            os.chown(folder / "good.png", 65534, 65534)  # locked.png stays root's, mode 000

        def scan() -> dict[str, Any]:
            td, logs = _td([_cfg(folder, resolution=64)])
            return {"reasons": [s.reason for s in td.reports[0].skipped_files], "logs": logs}

        seen = _as_nobody(scan) if os.geteuid() == 0 else scan()
        assert seen["reasons"] == ["unreadable"]
        assert sum("locked.png" in m for m in seen["logs"]) == 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    """The same path as chmod 000, for runs as root (which can read anything)."""
    import builtins

    save_image(tmp_path / "good.png", 32, 32)
    locked = save_image(tmp_path / "locked.png", 32, 32)
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if Path(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    td, logs = _td([_cfg(tmp_path, resolution=64)])
    skipped = td.reports[0].skipped_files
    assert [(s.path.name, s.reason) for s in skipped] == [("locked.png", "unreadable")]
    assert "Permission denied" in skipped[0].detail


def test_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        _td([_cfg(tmp_path / "missing")])
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="is not a folder"):
        _td([_cfg(tmp_path / "file.png")])
    captions_only = tmp_path / "caps"
    captions_only.mkdir()
    (captions_only / "a.txt").write_text("a caption")
    (captions_only / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    with pytest.raises(DatasetError, match=f"{captions_only}.*contains no images"):
        _td([_cfg(captions_only)])
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").mkdir()
    with pytest.raises(DatasetError, match="none of the 1 image files.*not a file: 1"):
        _td([_cfg(only_bad)])
