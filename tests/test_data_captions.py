"""Captions: reading caption files and trigger words."""

from pathlib import Path

import numpy as np
import pytest

from aitk.data.captions import (
    apply_trigger,
    caption_path,
    process_tags,
    read_caption,
    read_metadata_captions,
    resolve_caption,
)


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


# ---------------------------------------------------------------- tags: shuffle / keep / dropout

def _draw(raw, trigger=None, seed=0, **kw):
    kw.setdefault("shuffle", False)
    kw.setdefault("keep_tokens", 0)
    kw.setdefault("token_dropout_rate", 0.0)
    return process_tags(raw, trigger, rng=np.random.default_rng(seed), **kw)


def test_shuffle_keeps_first_tags_in_place():
    raw = "a woman, red hair, smiling, outdoors, sunny, bokeh"
    outs = {_draw(raw, seed=s, shuffle=True, keep_tokens=2) for s in range(40)}
    assert len(outs) > 10
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["a woman", "red hair"]
        assert sorted(tags[2:]) == sorted(["smiling", "outdoors", "sunny", "bokeh"])
    assert _draw(raw, seed=3, shuffle=True, keep_tokens=2) == _draw(raw, seed=3, shuffle=True, keep_tokens=2)
    assert _draw(raw, shuffle=False) == raw  # nothing to do: unchanged


def test_token_dropout_never_drops_kept_tags_or_trigger():
    raw = "photo, [trigger], t1, t2, t3, t4, t5, t6, t7, t8"
    counts = {f"t{i}": 0 for i in range(1, 9)}
    n = 300
    for s in range(n):
        out = _draw(raw, trigger="sks", seed=s, keep_tokens=1, token_dropout_rate=0.5)
        tags = out.split(", ")
        assert tags[0] == "photo" and "sks" in tags
        for t in tags:
            if t in counts:
                counts[t] += 1
    for c in counts.values():
        assert 0.35 * n < c < 0.65 * n  # each kept with probability ~0.5
    everything = _draw("a, b, c", trigger="sks", token_dropout_rate=1.0)
    assert everything == "sks"  # all tags dropped: the trigger still there
    assert _draw("sks man, beard, hat", trigger="sks", token_dropout_rate=1.0) == "sks man"


def test_shuffle_with_trigger_prepended():
    for s in range(20):
        out = _draw("b, c, d", trigger="ohwx", seed=s, shuffle=True)
        assert out.startswith("ohwx, ")  # the prepended trigger stays in front
        assert sorted(out.split(", ")[1:]) == ["b", "c", "d"]


def test_metadata_jsonl_captions(tmp_path):
    lines = [
        '{"file_name": "a.png", "text": "from text"}',
        '{"file_name": "./b.png", "caption": "from caption"}',
        '{"file_name": "c.png", "prompt": "from prompt"}',
        '{"file_name": "d.png", "text": "ignored: d.txt wins"}',
        "not json",
        '{"text": "no file name"}',
        '{"file_name": "e.png", "text": 5}',
        "",
        '{"file_name": "f.png", "text": "multi\\nline"}',
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines), encoding="utf-8")
    warnings: list[str] = []
    meta = read_metadata_captions(tmp_path, warn=warnings.append)
    assert meta == {"a.png": "from text", "b.png": "from caption", "c.png": "from prompt",
                    "d.png": "ignored: d.txt wins", "f.png": "multi line"}
    assert len(warnings) == 1 and "metadata.jsonl" in warnings[0] and "line 5" in warnings[0]
    assert "line 6" in warnings[0] and "line 7" in warnings[0]
    (tmp_path / "d.txt").write_text("the txt caption")
    (tmp_path / "e.txt").write_text("   ")  # blank: falls through to metadata / default
    assert resolve_caption(_img(tmp_path, "a.png"), "a.png", "txt", "dflt", meta) == ("from text", "metadata")
    assert resolve_caption(_img(tmp_path, "d.png"), "d.png", "txt", "dflt", meta) == ("the txt caption", "txt")
    assert resolve_caption(_img(tmp_path, "e.png"), "e.png", "txt", "dflt", meta) == ("dflt", "default")
    assert read_metadata_captions(tmp_path / "nope") == {}


def test_metadata_not_utf8(tmp_path):
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "caf\xe9"}\n')
    warnings: list[str] = []
    assert read_metadata_captions(tmp_path, warn=warnings.append) == {"a.png": "caf\ufffd"}
    assert len(warnings) == 1 and "UTF-8" in warnings[0]
