"""`aitk caption`, the caption job of `aitk run` and the web UI's caption tasks, with tiny random-init
Florence-2 and Qwen2.5-VL models of the real classes (aitk/caption/tiny.py), on real files.

Their captions are random text: what is checked is everything around the model. One caption per
image and video, the prefix and suffix, the length in tokens, existing captions kept byte for byte,
a SIGKILLed run resumed without redoing what it wrote, broken files skipped with their reason, the
job file, and the UI's task with its progress.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from aitk.caption.families import CaptionModelError, choose_model, family_of
from aitk.cli import main

REPO = Path(__file__).resolve().parent.parent
IMAGES, VIDEOS = 10, 2


@pytest.fixture(scope="session")
def tiny_florence(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from aitk.caption.tiny import build_tiny_florence2

    return build_tiny_florence2(tmp_path_factory.mktemp("caption-models") / "florence2")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from aitk.caption.tiny import build_tiny_qwen25_vl

    return build_tiny_qwen25_vl(tmp_path_factory.mktemp("caption-models") / "qwen25vl")


def write_clip(path: Path, frames: int = 6, size: tuple[int, int] = (64, 48)) -> None:
    """A real, decodable clip (mpeg4 in mp4), a colour per frame."""
    import av
    import numpy as np

    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            pixels = np.full((height, width, 3), (30 * i, 120, 200 - 20 * i), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def make_folder(folder: Path, images: int = IMAGES, videos: int = VIDEOS) -> list[Path]:
    """`images` images (PNG and JPEG, several sizes and aspects) and `videos` short clips."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(images):
        path = folder / f"img_{i:02d}.{'png' if i % 2 else 'jpg'}"
        Image.new("RGB", (48 + 16 * (i % 4), 64 + 8 * (i % 3)), (25 * i, 200 - 15 * i, 90)).save(path)
        made.append(path)
    for i in range(videos):
        path = folder / f"clip_{i}.mp4"
        write_clip(path, frames=5 + 2 * i)
        made.append(path)
    return sorted(made)


def captions_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.txt"))}


def stamps(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.glob("*.txt"))}


# ------------------------------------------------------------------------------------------ the command


@pytest.mark.parametrize("family", ["florence", "qwen"])
def test_a_folder_of_images_and_videos_gets_a_caption_each(family, tiny_florence, tiny_qwen, tmp_path, capsys):
    model = tiny_florence if family == "florence" else tiny_qwen
    media = make_folder(tmp_path / "data")
    code = main(["caption", str(tmp_path / "data"), "--model", str(model), "--prefix", "sks,", "--suffix", ", photo",
                 "--max-length", "6", "--batch-size", "4"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"captioned {IMAGES + VIDEOS} of {IMAGES + VIDEOS} files" in out.out
    written = captions_of(tmp_path / "data")
    assert sorted(written) == sorted(p.with_suffix(".txt").name for p in media)
    for name, raw in written.items():
        text = raw.decode("utf-8")
        assert text.startswith("sks, ") and text.endswith(", photo"), (name, text)
        core = text[len("sks, "):-len(", photo")]
        # the tiny tokenizers spell one byte per token, so 6 tokens decode to 6 characters at most
        assert 0 < len(core) <= 6, (name, core)
        assert "\n" not in text
    assert not list((tmp_path / "data").glob(".*.tmp"))  # every write finished (temporary file renamed)

    # a longer limit gives longer captions: the limit is what cut them
    code = main(["caption", str(tmp_path / "data"), "--model", str(model), "--overwrite", "--max-length", "24"])
    assert code == 0
    longer = {n: raw.decode() for n, raw in captions_of(tmp_path / "data").items()}
    assert max(len(t) for t in longer.values()) > 6 and all(len(t) <= 24 for t in longer.values())


def test_missing_only_keeps_existing_captions_byte_identical(tiny_qwen, tmp_path, capsys):
    folder = tmp_path / "data"
    media = make_folder(folder, images=5, videos=1)
    kept = {media[0]: b"a red square, [trigger] style", media[1]: "caf\u00e9 \u2013 line one\r\nline two\r\n".encode(),
            media[5]: b"\xff\xfe not utf-8 \x00"}
    for path, raw in kept.items():
        path.with_suffix(".txt").write_bytes(raw)
    media[2].with_suffix(".txt").write_bytes(b"  \n")  # white space only: no caption, so it gets one
    os.utime(media[0].with_suffix(".txt"), ns=(1_000_000_000, 1_000_000_000))
    before = stamps(folder)

    assert main(["caption", str(folder), "--model", str(tiny_qwen), "--missing-only", "--max-length", "4"]) == 0
    out = capsys.readouterr()
    assert "captioned 3 of 6 files, 3 already had a caption" in out.out
    after = stamps(folder)
    for path in kept:
        assert after[path.with_suffix(".txt").name] == before[path.with_suffix(".txt").name]
    assert after[media[2].with_suffix(".txt").name][0].strip()
    assert len(after) == 6

    # the default is missing-only too: nothing left to do, nothing touched, no model loaded
    assert main(["caption", str(folder), "--model", str(tiny_qwen)]) == 0
    assert stamps(folder) == after and "loading" not in capsys.readouterr().err
    # --overwrite captions everything again
    assert main(["caption", str(folder), "--model", str(tiny_qwen), "--overwrite", "--max-length", "4"]) == 0
    replaced = captions_of(folder)
    assert all(replaced[p.with_suffix(".txt").name] != raw for p, raw in kept.items())


def test_a_killed_run_goes_on_where_it_was(tiny_florence, tmp_path):
    """SIGKILL right after the 5th caption (AITK_CAPTION_KILL_AFTER), in the middle of a batch of 2:
    the 5 written captions are whole and stay as they are; the next run does the other 7 only."""
    folder = tmp_path / "data"
    make_folder(folder)
    env = dict(os.environ, AITK_CAPTION_KILL_AFTER="5", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "aitk", "caption", str(folder), "--model", str(tiny_florence),
                          "--batch-size", "2", "--max-length", "5"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr
    first = stamps(folder)
    assert len(first) == 5 and all(raw for raw, _ in first.values())
    assert not list(folder.glob(".*.tmp"))
    assert main(["caption", str(folder), "--model", str(tiny_florence), "--batch-size", "2", "--max-length", "5"]) == 0
    second = stamps(folder)
    assert len(second) == IMAGES + VIDEOS
    assert {name: second[name] for name in first} == first  # not one of them written again


def test_broken_files_are_skipped_with_their_reason(tiny_florence, tmp_path, capsys):
    folder = tmp_path / "data"
    make_folder(folder, images=2, videos=1)
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(jpeg, "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[:300])
    (folder / "not_an_image.png").write_bytes(b"this is text, not a PNG")
    write_clip(folder / "cut.mp4", frames=8)
    (folder / "cut.mp4").write_bytes((folder / "cut.mp4").read_bytes()[:400])

    code = main(["caption", str(folder), "--model", str(tiny_florence), "--max-length", "4"])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 0 and "Traceback" not in text
    assert "captioned 3 of 6 files, 3 skipped" in out.out
    for name in ("truncated.jpg", "not_an_image.png", "cut.mp4"):
        line = next(line for line in out.out.splitlines() if f"skipped {name}:" in line)
        assert "not a readable" in line and len(line) > len(f"  skipped {name}: not a readable image ()"), line
        assert not (folder / name).with_suffix(".txt").exists()
    assert sorted(captions_of(folder)) == ["clip_0.txt", "img_00.txt", "img_01.txt"]


def test_bad_input_is_one_line_not_a_traceback(tiny_florence, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["caption", str(tmp_path / "missing")]) == 2
    assert main(["caption", str(tmp_path / "empty"), "--model", str(tiny_florence)]) == 1
    assert main(["caption", str(tmp_path / "empty"), "--batch-size", "0"]) == 2
    not_a_captioner = tmp_path / "bert"
    not_a_captioner.mkdir()
    (not_a_captioner / "config.json").write_text(json.dumps({"model_type": "bert"}))
    make_folder(tmp_path / "data", images=1, videos=0)
    assert main(["caption", str(tmp_path / "data"), "--model", str(not_a_captioner)]) == 1
    err = capsys.readouterr().err
    assert "no such folder" in err and "no images or videos" in err and "batch size 0" in err
    assert "is a 'bert' model; captions come from Florence-2 (florence2), Qwen2.5-VL (qwen2_5_vl)" in err
    assert "Traceback" not in err


def test_models_are_known_by_their_config(tiny_florence, tiny_qwen, tmp_path):
    assert family_of(str(tiny_florence)).label == "Florence-2" and family_of(str(tiny_qwen)).label == "Qwen2.5-VL"
    assert choose_model(None) == ("florence-community/Florence-2-large", None)
    assert choose_model(None, detailed=True) == ("Qwen/Qwen2.5-VL-7B-Instruct", None)
    native, note = choose_model("microsoft/Florence-2-base")
    assert native == "florence-community/Florence-2-base" and "trust_remote_code" in note
    with pytest.raises(CaptionModelError, match="does not exist"):
        family_of(str(tmp_path / "nowhere"))
    legacy = tmp_path / "legacy"  # a fine-tune saved with Microsoft's remote code
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({
        "model_type": "florence2", "auto_map": {"AutoConfig": "configuration_florence2.Florence2Config"},
        "text_config": {"model_type": "florence2_language"}}))
    with pytest.raises(CaptionModelError, match="original remote-code form"):
        family_of(str(legacy))


# ------------------------------------------------------------------------------------------ the job file


def test_the_caption_job_runs_through_aitk_run(tiny_qwen, tmp_path, capsys):
    """ai-toolkit's captioner job (type Qwen3VLCaptioner, a `caption:` section) and `job: caption`."""
    folder = tmp_path / "data"
    make_folder(folder, images=3, videos=1)
    (folder / "img_00.txt").write_text("typed by hand")
    upstream = {"job": "extension", "config": {"name": "Caption Directory", "process": [{
        "type": "Qwen3VLCaptioner", "sqlite_db_path": "./aitk_db.db", "device": "cpu",
        "caption": {"model_name_or_path": str(tiny_qwen), "path_to_caption": str(folder), "recaption": False,
                    "extensions": ["jpg", "png", "mp4"], "caption_extension": "txt", "max_new_tokens": 5,
                    "max_res": 256, "batch_size": 2, "dtype": "fp32", "quantize": True, "compile": True,
                    "caption_prompt": "Describe this image.", "prefix": "[trigger]"},
    }]}}
    job = tmp_path / "caption.yaml"
    job.write_text(yaml.safe_dump(upstream, sort_keys=False))

    assert main(["validate", str(job)]) == 0
    out = capsys.readouterr().out
    assert f"OK {job} (3 warnings)" in out and "caption.quantize: ai-toolkit's quantize does nothing" in out
    assert main(["run", str(job)]) == 0
    out = capsys.readouterr()
    assert "captioned 3 of 4 files, 1 already had a caption" in out.out
    written = captions_of(folder)
    assert written["img_00.txt"] == b"typed by hand"
    assert all(raw.startswith(b"[trigger] ") for name, raw in written.items() if name != "img_00.txt")
    assert len(written) == 4

    # our own spelling, recaption: every file again; the training commands refuse it with the reason
    ours = tmp_path / "ours.yaml"
    ours.write_text(yaml.safe_dump({"job": "caption", "config": {"process": [{"caption": {
        "path_to_caption": str(folder), "model_name_or_path": str(tiny_qwen), "recaption": True,
        "max_new_tokens": 3, "suffix": "END"}}]}}))
    assert main(["run", str(ours)]) == 0
    assert all(raw.endswith(b" END") for raw in captions_of(folder).values())
    assert main(["plan", str(ours)]) != 0
    assert "this is a caption job" in capsys.readouterr().err


def test_caption_jobs_that_cannot_run_are_refused_by_validate(tmp_path, capsys):
    omni = tmp_path / "omni.yaml"
    omni.write_text(yaml.safe_dump({"job": "extension", "config": {"name": "c", "process": [{
        "type": "Qwen3OmniCaptioner", "caption": {"path_to_caption": str(tmp_path)}}]}}))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"job": "caption", "config": {"process": [{"type": "captioner", "caption": {
        "path_to_caption": str(tmp_path / "gone"), "batch_size": 0, "dtype": "int8"}}]}}))
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"job": "caption", "config": {"process": [{
        "type": "captioner", "caption": {"path_to_caption": str(tmp_path / "gone")}}]}}))
    assert main(["validate", str(omni)]) == 1
    assert main(["validate", str(bad)]) == 1
    assert main(["validate", str(missing)]) == 0
    captured = capsys.readouterr()
    err = captured.err
    assert "config.process[0].type: 'Qwen3OmniCaptioner' captions with Qwen3-Omni" in err
    assert "config.process[0].caption.batch_size: 0 is out of range; use a whole number >= 1" in err
    assert "config.process[0].caption.dtype: 'int8' is not valid; use bf16, fp16 or fp32" in err
    assert "caption.path_to_caption: folder" in captured.out and "does not exist here" in captured.out


# ------------------------------------------------------------------------------------------ the web UI


def _wait(client, url: str, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        task = client.get(url).json()["task"]
        seen.append((task["state"], task["done"], task["total"]))
        if task["state"] in ("completed", "failed", "stopped"):
            return {**task, "seen": seen}
        assert time.monotonic() < deadline, seen
        time.sleep(0.2)


def test_the_ui_captions_a_dataset_in_the_background_with_progress(tiny_florence, tmp_path):
    from fastapi.testclient import TestClient

    from test_ui_api import AUTH, make_settings, png_bytes
    from aitk.ui.server import create_app

    settings = make_settings(tmp_path)
    with TestClient(create_app(settings), headers=AUTH) as client:
        assert client.post("/api/datasets", json={"name": "shapes"}).status_code == 201
        files = [("files", (f"s{i}.png", png_bytes((40 * i, 90, 20)), "image/png")) for i in range(4)]
        r = client.post("/api/datasets/shapes/upload", files=files, data={"captions": json.dumps(["kept", None])})
        assert r.status_code == 201, r.text
        assert client.get("/api/datasets/shapes/caption").json() == {"task": None}

        refused = client.post("/api/datasets/shapes/caption", json={"model": str(tmp_path / "no-model")})
        assert refused.status_code == 422 and "does not exist" in refused.json()["detail"]
        offline = client.post("/api/datasets/shapes/caption", json={})  # the default model: not cached, offline
        assert offline.status_code == 422 and "HF_HUB_OFFLINE" in offline.json()["detail"]

        r = client.post("/api/datasets/shapes/caption",
                        json={"model": str(tiny_florence), "prefix": "sks", "max_length": 5, "device": "cpu"})
        assert r.status_code == 202, r.text
        assert r.json()["task"]["state"] in ("starting", "loading", "running")
        busy = client.post("/api/datasets/shapes/caption", json={"model": str(tiny_florence)})
        assert busy.status_code == 409 and "running" in busy.json()["detail"]

        task = _wait(client, "/api/datasets/shapes/caption")
        assert task["state"] == "completed", task
        assert (task["done"], task["total"], task["written"], task["done_before"], task["files"]) == (3, 3, 3, 1, 4)
        assert any(state in ("starting", "loading", "running") for state, _, _ in task["seen"])
        items = {i["name"]: i["caption"] for i in client.get("/api/datasets/shapes").json()["items"]}
        assert items["s0.png"] == "kept"
        assert all(c.startswith("sks ") and len(c) > 4 for n, c in items.items() if n != "s0.png")
        # the job queue takes training jobs only: a caption job file is refused with the way to run it
        queued = client.post("/api/jobs", json={"config": {"job": "caption", "config": {"process": [
            {"caption": {"path_to_caption": str(settings.datasets_folder / "shapes")}}]}}})
        assert queued.status_code == 422 and "this is a caption job" in queued.text
        listed = client.get("/api/caption").json()
        assert [t["id"] for t in listed["tasks"]] == [task["id"]] and len(listed["models"]) == 2

        # Quick train's files: captioned in the task's own folder, answered in upload order
        files = [("files", ("a.png", png_bytes((1, 2, 3)), "image/png")), ("files", ("a.png", png_bytes(), "image/png"))]
        r = client.post("/api/caption/files", files=files, data={"model": str(tiny_florence), "max_length": "4"})
        assert r.status_code == 202, r.text
        task = _wait(client, f"/api/caption?task={r.json()['task']['id']}")
        assert task["state"] == "completed" and len(task["captions"]) == 2 and all(task["captions"]), task
        assert client.delete(f"/api/caption?task={task['id']}").json() == {"removed": task["id"]}
        assert client.get(f"/api/caption?task={task['id']}").status_code == 404
        assert sorted(p.name for p in (settings.datasets_folder / "shapes").iterdir()) == sorted(
            [f"s{i}.png" for i in range(4)] + [f"s{i}.txt" for i in range(4)])


def test_the_ui_stops_a_caption_task(tiny_florence, tmp_path):
    from fastapi.testclient import TestClient

    from test_ui_api import AUTH, make_settings, png_bytes
    from aitk.ui.server import create_app

    settings = make_settings(tmp_path)
    with TestClient(create_app(settings), headers=AUTH) as client:
        client.post("/api/datasets", json={"name": "shapes"})
        client.post("/api/datasets/shapes/upload", files=[("files", ("a.png", png_bytes(), "image/png"))])
        assert client.delete("/api/datasets/shapes/caption").status_code == 409  # nothing runs
        assert client.post("/api/datasets/shapes/caption", json={"model": str(tiny_florence)}).status_code == 202
        stopped = client.delete("/api/datasets/shapes/caption")
        assert stopped.status_code == 200, stopped.text
        task = _wait(client, "/api/datasets/shapes/caption")
        assert task["state"] == "stopped", task
        assert not (settings.datasets_folder / "shapes" / "a.txt").exists()
        # a stopped task holds nothing up: the next one starts at once
        again = client.post("/api/datasets/shapes/caption", json={"model": str(tiny_florence), "max_length": 3})
        assert again.status_code == 202, again.text
        assert client.delete("/api/datasets/shapes/caption").status_code == 200
        assert _wait(client, "/api/datasets/shapes/caption")["state"] == "stopped"
