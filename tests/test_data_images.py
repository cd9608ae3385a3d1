"""Image folder scanning: extensions, order, EXIF, alpha, bad files, folder errors."""

from pathlib import Path

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
    save_image(tmp_path / "f.gif", 32, 32)  # not a supported extension
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
    assert logs == []
    assert res.num_files == 5 and not res.skipped


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
