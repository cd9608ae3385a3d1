"""Property-based fuzzing of dataset folders (issue #15): the data layer and the web UI's dataset
routes on generated folders.

Each example is a folder of media files drawn from: random bytes, real PNG / JPEG / WebP / BMP /
GIF / MP4 files cut short or with flipped bytes, headers that claim huge dimensions
(decompression bombs), empty files, folders named like images, captions in UTF-16 with a BOM,
latin-1, invalid UTF-8 or with NUL bytes, a metadata.jsonl of random lines, symlinks leading
outside the folder (to an image, a caption, a metadata file and a folder; relative, absolute and
dangling) and links to themselves. Outside the datasets folder sits a canary: files whose content is CANARY.

Driven: `aitk dataset inspect` (inspect_job, as the CLI and as the UI run it), TrainingData with
two batches decoded, and the UI's routes (list, detail, every item's file, thumbnail and caption,
a caption saved, inspect) through FastAPI's TestClient.

Properties: no exception but DatasetError (with a message); bad files skipped with a warning;
no 5xx and no traceback in any answer; the canary's content appears in no answer, report line or
UI caption (the UI follows no link out of its folders; the command line does, by design, and is
checked for the absence of crashes only); nothing outside the datasets folder and the UI's home
is created, changed or removed.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from aitk.config.schema import DatasetConfig
from aitk.data.images import DatasetError
from aitk.data.inspect import inspect_job
from aitk.data.training_data import TrainingData
from aitk.ui.server import create_app
from aitk.ui.settings import UISettings
from fuzz_common import TRACEBACK, Counter, budget, fuzz_settings

FILE_EXAMPLES = 500  # dataset files in `make test` (x AITK_FUZZ_SCALE)
TOKEN = "fuzz-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CANARY = "AITK-CANARY-5f1d0c9a"

# ------------------------------------------------------------------------------------ media


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def huge_png(width: int, height: int) -> bytes:
    """A PNG whose header (with good CRCs) claims width x height, with a few bytes of image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def _save(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _mp4() -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), (40 * i, 120, 200), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def _media() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: width and height swap
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    gif = [rgb.convert("P"), rgb.rotate(90).convert("P")]
    out = {
        "png": _save(rgb, "PNG"), "rgba.png": _save(rgb.convert("RGBA"), "PNG"),
        "grey16.png": _save(Image.fromarray(rng.integers(0, 65535, (64, 64), dtype=np.uint16)), "PNG"),
        "palette.png": _save(palette, "PNG"), "jpg": _save(rgb, "JPEG"), "cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG"),
        "exif.jpg": _save(rgb, "JPEG", exif=exif), "webp": _save(rgb, "WEBP"), "bmp": _save(rgb, "BMP"),
        "gif": _save(gif[0], "GIF", save_all=True, append_images=gif[1:]), "mp4": _mp4(),
    }
    jpeg = bytearray(out["jpg"])
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5: sof + 9] = struct.pack(">HH", 65000, 65000)
    bmp = bytearray(out["bmp"])
    bmp[18:26] = struct.pack("<ii", 100_000, 100_000)
    gif_big = bytearray(out["gif"])
    gif_big[6:10] = struct.pack("<HH", 65535, 65535)
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (16383).to_bytes(3, "little") * 2
    out |= {
        "huge.png": huge_png(100_000, 100_000), "bomb.png": huge_png(10_000, 10_000),
        "wide.png": huge_png(2**31 - 1, 1),
        "zero.png": huge_png(0, 0), "huge.jpg": bytes(jpeg), "huge.bmp": bytes(bmp), "huge.gif": bytes(gif_big),
        "huge.webp": b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x,
    }
    return out


MEDIA = _media()
VALID = ["png", "rgba.png", "grey16.png", "palette.png", "jpg", "cmyk.jpg", "exif.jpg", "webp", "bmp", "gif", "mp4"]
HUGE = ["huge.png", "bomb.png", "wide.png", "zero.png", "huge.jpg", "huge.bmp", "huge.gif", "huge.webp"]
EXTENSIONS = ["png", "jpg", "jpeg", "webp", "bmp", "gif", "mp4", "webm", "mov", "mkv", "PNG", "JpG"]
CAPTIONS = st.one_of(
    st.text(max_size=40).map(lambda t: t.encode("utf-8", errors="surrogatepass")),
    st.sampled_from([
        "caf\u00e9, photo".encode("utf-16"), "caf\u00e9, photo".encode("latin-1"), b"\xff\xfe\xfa broken utf-8 \xc3",
        b"a\x00b\x00c", b"\xef\xbb\xbfwith bom", b"", b"\n\n", b"[trigger], tag, tag" * 200, b"\r\nx\r\n",
    ]),
)


@st.composite
def entry(draw: st.DrawFn) -> dict[str, Any]:
    """One directory entry: a file named like media (bytes), a caption, a folder or a link out."""
    kind = draw(st.sampled_from(["random", "cut", "flipped", "valid", "valid", "huge", "empty", "folder",
                                 "link_file", "link_dir", "link_caption", "dangling", "loop", "metadata",
                                 "link_metadata"]))
    stem = draw(st.sampled_from(["a", "b", "c", "img 1", "ünï", ".hidden", "x.y"]))
    ext = draw(st.sampled_from(EXTENSIONS))
    data: bytes | None = None
    caption = draw(st.none() | CAPTIONS)
    if kind == "random":
        data = draw(st.binary(min_size=1, max_size=300))
    elif kind in ("cut", "flipped", "valid"):
        source = draw(st.sampled_from(VALID))
        data = MEDIA[source]
        ext = source.rsplit(".", 1)[-1] if draw(st.booleans()) else ext
        if kind == "cut":
            data = data[: draw(st.integers(1, len(data) - 1))]
        elif kind == "flipped":
            buf = bytearray(data)
            for pos in draw(st.lists(st.integers(0, len(buf) - 1), min_size=1, max_size=8)):
                buf[pos] ^= 0xFF
            data = bytes(buf)
    elif kind == "huge":
        source = draw(st.sampled_from(HUGE))
        data, ext = MEDIA[source], source.rsplit(".", 1)[-1]
    elif kind == "empty":
        data = b""
    elif kind == "metadata":
        lines = draw(st.lists(st.sampled_from([
            '{"file_name": "a.png", "text": "meta caption"}', '{"file_name": "b.jpg", "caption": ["one", "two"]}',
            '{"file_name": 3}', "not json", "[]", '{"file_name": "./c.png", "prompt": 5}', "",
        ]) | st.text(max_size=30), max_size=5))
        data = "\n".join(lines).encode("utf-8", errors="surrogatepass")
    return {"kind": kind, "name": f"{stem}.{ext}", "stem": stem, "data": data, "caption": caption,
            "absolute": draw(st.booleans())}


FOLDERS = st.lists(entry(), min_size=1, max_size=7)

# ------------------------------------------------------------------------------------ folders


def make_outside(root: Path) -> Path:
    """A folder beside the configured ones holding the canary: an image, a caption, metadata, a folder."""
    outside = root / "outside"
    (outside / "dir").mkdir(parents=True)
    img = Image.new("RGB", (64, 64), (1, 254, 3))
    info = __import__("PIL.PngImagePlugin", fromlist=["PngInfo"]).PngInfo()
    info.add_text("canary", CANARY)
    (outside / "canary.png").write_bytes(_save(img, "PNG", pnginfo=info))
    (outside / "dir" / "inner.png").write_bytes((outside / "canary.png").read_bytes())
    (outside / "canary.txt").write_text(CANARY)
    (outside / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": CANARY}) + "\n")
    return outside


def build(folder: Path, outside: Path, entries: list[dict[str, Any]]) -> int:
    """Write the entries into `folder`; returns how many files (and links) were made."""
    folder.mkdir(parents=True)
    made = 0

    def free(path: Path) -> bool:  # nothing there, not even a dangling link (writing would follow it)
        return not path.exists() and not path.is_symlink()

    def link(name: str, target: Path, absolute: bool) -> None:
        nonlocal made
        path = folder / name
        if free(path):
            path.symlink_to(target if absolute else Path(os.path.relpath(target, folder)))
            made += 1

    for e in entries:
        kind, name, stem = e["kind"], e["name"], e["stem"]
        if kind == "folder":
            if free(folder / name):
                (folder / name).mkdir()
        elif kind == "link_file":
            link(name, outside / "canary.png", e["absolute"])
        elif kind == "link_dir":
            link(name if e["absolute"] else stem, outside / "dir", e["absolute"])
        elif kind == "link_caption":
            if free(folder / f"{stem}.png"):
                (folder / f"{stem}.png").write_bytes(MEDIA["png"])
                made += 1
            link(f"{stem}.txt", outside / "canary.txt", e["absolute"])
        elif kind == "dangling":
            link(name, outside / "missing.png", e["absolute"])
        elif kind == "loop":  # a link to itself, and a caption that is one
            link(name, folder / name, True)
            link(f"{stem}.txt", folder / f"{stem}.txt", True)
        elif kind == "link_metadata":
            link("metadata.jsonl", outside / "metadata.jsonl", e["absolute"])
        elif kind == "metadata":
            if free(folder / "metadata.jsonl"):
                (folder / "metadata.jsonl").write_bytes(e["data"])
                made += 1
        elif free(folder / name):
            (folder / name).write_bytes(e["data"])
            made += 1
        caption = folder / f"{stem}.txt"
        if e["caption"] is not None and kind not in ("folder", "link_caption") and free(caption):
            caption.write_bytes(e["caption"])
            made += 1
    return made


def snapshot(root: Path) -> dict[str, Any]:
    """Every entry under `root`: file bytes, link targets, folders (links are not followed)."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", path.read_bytes())
    return out


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, Any]]:
    """<tmp>/outside (the canary), <tmp>/data (the datasets folder), <tmp>/home, <tmp>/out, and the app."""
    with tempfile.TemporaryDirectory(prefix="aitk-fuzz-data-") as tmp:
        root = Path(tmp)
        outside = make_outside(root)
        settings = UISettings.from_env({}, home=root / "home", training_folder=root / "out",
                                       datasets_folder=root / "data")
        settings = replace(settings, auth_token=TOKEN, ui_dist=root / "dist", job_cwd=root / "home")
        app = create_app(settings)
        (root / "data").mkdir()
        with TestClient(app) as client:
            yield {"root": root, "outside": outside, "client": client, "data": root / "data"}
        app.state.ctx.store.close()


# ------------------------------------------------------------------------------------ checks


def check_text(text: str, what: str) -> None:
    assert TRACEBACK not in text, f"{what}: {text[:2000]}"
    assert CANARY not in text, f"{what}: the canary's content leaked: {text[:2000]}"


def run_inspect_cli(folder: Path, tmp: Path, video: bool, confine: bool) -> list[str]:
    job = {"job": "extension", "config": {"name": "fuzz", "process": [{
        "training_folder": str(tmp / "out"), "model": {"name_or_path": "x", "arch": "wan21" if video else "sd1"},
        "datasets": [{"folder_path": str(folder), "resolution": 64, "num_frames": 5 if video else 1}],
    }]}}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    lines: list[str] = []
    code = inspect_job(str(path), out=lines.append, confine=confine)
    assert code in (0, 1), lines
    assert lines and all(TRACEBACK not in line for line in lines), lines
    assert not any("could not be inspected" in line for line in lines), lines  # an unexpected exception
    return lines


def run_training_data(folder: Path, video: bool) -> None:
    """The trainer's data layer (CLI: links are followed): two batches, or a DatasetError."""
    log: list[str] = []
    cfg = DatasetConfig(folder_path=str(folder), resolution=64, num_frames=5 if video else 1)
    try:
        data = TrainingData([cfg], trigger_word="sks", divisibility=8, batch_size=1, seed=0, log=log.append,
                            frame_rule="4k+1" if video else None)
    except DatasetError as exc:
        assert str(exc).strip() and TRACEBACK not in str(exc)
        return
    try:
        for _ in range(2):
            batch = data.next_batch()
            assert batch.pixels is not None and bool(batch.pixels.isfinite().all())
            assert len(batch.captions) == 1
    except DatasetError as exc:  # every file failed when decoded for real
        assert str(exc).strip()
    finally:
        data.close()


def _leads_into(link: Path, folder: Path) -> bool:
    try:
        return link.resolve().is_relative_to(folder)
    except RuntimeError:  # a loop leads nowhere
        return False


def run_ui(client: TestClient, name: str, outside: Path, video: bool) -> None:
    answers: list[tuple[str, int, bytes]] = []

    def get(url: str, **kw: Any) -> Any:
        response = client.get(url, headers=AUTH, **kw)
        answers.append((url, response.status_code, response.content))
        return response

    listing = get("/api/datasets").json()
    assert name in [d["name"] for d in listing["datasets"]]
    detail = get(f"/api/datasets/{name}")
    assert detail.status_code == 200, detail.text
    items = detail.json()["items"]
    linked_out = {p.name for p in (client.app.state.ctx.datasets_folder() / name).iterdir()
                  if p.is_symlink() and not _leads_into(p, outside.parent / "data")}
    assert not linked_out & {item["name"] for item in items}, "a link leading outside (or a loop) is listed"
    names = [item["name"] for item in items] + sorted(linked_out)
    for i, item in enumerate(names):
        for part in ("thumbnail", "caption", "file") if i == 0 or item in linked_out else ("thumbnail", "caption"):
            response = get(f"/api/datasets/{name}/items/{item}/{part}")
            if item in linked_out:
                assert response.status_code in (403, 404), (item, part, response.status_code)
    video_query = {"num_frames": 5, "arch": "wan21"} if video else {}
    get(f"/api/datasets/{name}/inspect", params={"resolution": 64, **video_query})
    for item in names[:2]:
        response = client.put(f"/api/datasets/{name}/items/{item}/caption", json={"caption": "saved"}, headers=AUTH)
        answers.append((f"PUT {item} caption", response.status_code, response.content))
    for url, status, body in answers:
        assert status < 500, (url, status, body[:2000])
        check_text(body.decode("latin-1"), url)


# ------------------------------------------------------------------------------------ the tests


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # over the limit: refused anyway
def test_fuzzed_dataset_folders(world: dict[str, Any]) -> None:
    root, outside, client, data = world["root"], world["outside"], world["client"], world["data"]
    before = snapshot(outside)
    top = sorted(p.name for p in root.iterdir())
    files, examples = Counter(), Counter()

    @fuzz_settings(FILE_EXAMPLES // 4)
    @given(entries=FOLDERS, video=st.booleans())
    def run(entries: list[dict[str, Any]], video: bool) -> None:
        examples.add()
        name = f"ds{examples.n}"
        folder = data / name
        files.add(build(folder, outside, entries))
        with tempfile.TemporaryDirectory(prefix="aitk-fuzz-job-") as tmp:
            for line in run_inspect_cli(folder, Path(tmp), video, confine=True):
                check_text(line, "inspect (confined)")
            run_inspect_cli(folder, Path(tmp), video, confine=False)
        run_training_data(folder, video)
        run_ui(client, name, outside, video)
        assert snapshot(outside) == before, "a file outside the configured folders changed"
        assert sorted(p.name for p in root.iterdir()) == top, "something was created beside the configured folders"
        shutil.rmtree(folder)  # the datasets listing stays short

    run()
    assert files.n >= budget(FILE_EXAMPLES), f"only {files.n} dataset files in {examples.n} folders"


# ------------------------------------------------------------------------------------ regressions


def test_ui_does_not_read_a_caption_linked_outside(world: dict[str, Any]) -> None:
    """A caption file that is a link to a file outside the datasets folder: not shown by the
    dataset's detail or the caption route, not used by the UI's inspection; saving the caption
    replaces the link and leaves the outside file alone."""
    client, data, outside = world["client"], world["data"], world["outside"]
    folder = data / "linked_caption"
    folder.mkdir()
    (folder / "a.png").write_bytes(MEDIA["png"])
    (folder / "a.txt").symlink_to(outside / "canary.txt")
    (folder / "metadata.jsonl").symlink_to(outside / "metadata.jsonl")
    detail = client.get("/api/datasets/linked_caption", headers=AUTH).json()
    assert [(i["name"], i["caption"]) for i in detail["items"]] == [("a.png", None)]
    assert client.get("/api/datasets/linked_caption/items/a.png/caption", headers=AUTH).json()["caption"] is None
    report = client.get("/api/datasets/linked_caption/inspect", headers=AUTH).json()
    assert report["ok"] and CANARY not in json.dumps(report)
    assert client.put("/api/datasets/linked_caption/items/a.png/caption", json={"caption": "mine"},
                      headers=AUTH).status_code == 200
    assert not (folder / "a.txt").is_symlink() and (folder / "a.txt").read_text() == "mine"
    assert (outside / "canary.txt").read_text() == CANARY


def test_ui_caption_in_another_encoding_is_shown_not_a_500(world: dict[str, Any]) -> None:
    client, data = world["client"], world["data"]
    folder = data / "latin1_caption"
    folder.mkdir()
    (folder / "a.png").write_bytes(MEDIA["png"])
    (folder / "a.txt").write_bytes("caf\u00e9".encode("latin-1"))
    response = client.get("/api/datasets/latin1_caption/items/a.png/caption", headers=AUTH)
    assert response.status_code == 200 and response.json()["caption"] == "caf\ufffd"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_ui_lists_no_image_linked_outside_and_thumbnails_no_bomb(world: dict[str, Any]) -> None:
    client, data, outside = world["client"], world["data"], world["outside"]
    folder = data / "linked_image"
    folder.mkdir()
    (folder / "leak.png").symlink_to(outside / "canary.png")
    (folder / "bomb.png").write_bytes(MEDIA["bomb.png"])  # 10000 x 10000: over Pillow's limit, under twice it
    detail = client.get("/api/datasets/linked_image", headers=AUTH).json()
    assert [i["name"] for i in detail["items"]] == ["bomb.png"] and detail["images"] == 1
    assert client.get("/api/datasets/linked_image/items/leak.png/file", headers=AUTH).status_code == 403
    thumb = client.get("/api/datasets/linked_image/items/bomb.png/thumbnail", headers=AUTH)
    assert thumb.status_code == 422 and "too large" in thumb.json()["detail"]


def test_confined_scan_skips_links_out_and_the_cli_follows_them(world: dict[str, Any], tmp_path: Path) -> None:
    outside = world["outside"]
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "own.png").write_bytes(MEDIA["png"])
    (folder / "own.txt").symlink_to(outside / "canary.txt")
    (folder / "leak.png").symlink_to(outside / "canary.png")
    confined = run_inspect_cli(folder, tmp_path, video=False, confine=True)
    assert any("outside the folder (1): leak.png" in line for line in confined), confined
    assert not any(CANARY in line for line in confined) and any("1 image used" in line for line in confined)
    followed = run_inspect_cli(folder, tmp_path, video=False, confine=False)
    assert any("2 images used" in line for line in followed), followed


def test_tilde_of_an_unknown_user_is_a_dataset_error(tmp_path: Path) -> None:
    cfg = DatasetConfig(folder_path="~no_such_user_aitk/images")
    with pytest.raises(DatasetError, match="names no user of this machine"):
        TrainingData([cfg], trigger_word=None, divisibility=8, batch_size=1, seed=0, log=lambda _: None)
