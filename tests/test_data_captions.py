"""Captions: reading caption files and trigger words."""

from pathlib import Path

import pytest

from aitk.data.captions import apply_trigger, caption_path, read_caption


def _img(tmp_path: Path, name: str = "a.png") -> Path:
    p = tmp_path / name
    p.write_bytes(b"")  # content does not matter for caption reading
    return p


def test_missing_caption_gives_default(tmp_path):
    assert read_caption(_img(tmp_path), "txt", "a photo") == "a photo"


def test_caption_read_and_cleaned(tmp_path):
    img = _img(tmp_path)
    (tmp_path / "a.txt").write_text("  a red\n  car \n", encoding="utf-8")
    assert read_caption(img, "txt", "default") == "a red car"


def test_caption_ext_with_dot_and_bom(tmp_path):
    img = _img(tmp_path)
    (tmp_path / "a.caption").write_bytes("\ufeffhello".encode("utf-8"))
    assert caption_path(img, ".caption").name == "a.caption"
    assert read_caption(img, ".caption", "") == "hello"


def test_blank_caption_gives_default(tmp_path):
    img = _img(tmp_path)
    (tmp_path / "a.txt").write_text("   \n", encoding="utf-8")
    assert read_caption(img, "txt", "fallback") == "fallback"


def test_non_utf8_caption_replaced_with_warning(tmp_path):
    img = _img(tmp_path)
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait")
    warnings: list[str] = []
    text = read_caption(img, "txt", "", warn=warnings.append)
    assert text == "caf\ufffd au lait"
    assert len(warnings) == 1 and "a.txt" in warnings[0] and "UTF-8" in warnings[0]


@pytest.mark.parametrize(
    ("caption", "trigger", "expected"),
    [
        ("a dog", "sks", "sks, a dog"),
        ("a photo of [trigger] dog", "sks", "a photo of sks dog"),
        ("sks dog on grass", "sks", "sks dog on grass"),
        ("", "sks", "sks"),
        ("a dog", None, "a dog"),
        ("[trigger], a dog", None, "a dog"),
        ("a dog, [trigger], grass", "", "a dog, grass"),
    ],
)
def test_apply_trigger(caption, trigger, expected):
    assert apply_trigger(caption, trigger) == expected
