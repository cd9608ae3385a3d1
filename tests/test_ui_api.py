"""The UI's HTTP API through real requests (FastAPI's TestClient), on real files: every route needs
the token, paths stay inside the configured folders, GET changes nothing, uploads and names are
checked, invalid jobs come back with the loader's messages."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from aitk.ui.security import COOKIE, OPEN_ROUTES
from aitk.ui.server import ExposedWithoutToken, bind_address, create_app, route_table
from aitk.ui.settings import UISettings
from aitk.ui.store import RUNNING, Store

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UPLOAD_LIMIT = 256 * 1024
SECRET = "TOP-SECRET-CONTENT"


def make_settings(root: Path, token: str | None = TOKEN, **changes: Any) -> UISettings:
    settings = UISettings.from_env({}, home=root / "home", training_folder=root / "out", datasets_folder=root / "data")
    from dataclasses import replace

    return replace(settings, auth_token=token, max_upload_bytes=UPLOAD_LIMIT, ui_dist=root / "dist", **changes)


def _route_table() -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(make_settings(Path(tmp)))
        table = route_table(app)
        app.state.ctx.store.close()
    return table


ROUTES = _route_table()
SAMPLE_PARAMS = {"job_id": "1", "name": "shapes", "item": "red.png", "path": "log.txt", "preset_id": "sd15",
                 "path:path": "log.txt"}


def concrete(path: str) -> str:
    for key, value in SAMPLE_PARAMS.items():
        path = path.replace("{" + key + "}", value)
    return path


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def mp4_bytes(tmp: Path, frames: int = 5) -> bytes:
    """A real, decodable clip (mpeg4 in mp4), 64x48, a colour per frame."""
    import av
    import numpy as np

    path = tmp / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), (40 * i, 120, 200), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path.read_bytes()


def tree(*roots: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file and folder under `roots` with a hash of its content (folders: '<dir>')."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            rel = str(path.relative_to(root.parent))
            if any(part in skip for part in path.relative_to(root).parts):
                continue
            if path.is_symlink():
                out[rel] = "<link>" + str(path.readlink())
            elif path.is_dir():
                out[rel] = "<dir>"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def ui(tmp_path: Path):
    """A server with the token set, a dataset with two captioned images, and one job whose run
    folder holds everything a run writes (status, metrics, log, samples, LoRA, checkpoint)."""
    settings = make_settings(tmp_path)
    app = create_app(settings)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    (outside / "secret.png").write_bytes(png_bytes())
    with TestClient(app, headers=AUTH) as client:
        assert client.post("/api/datasets", json={"name": "shapes"}).status_code == 201
        files = [("files", ("red.png", png_bytes(), "image/png")), ("files", ("blue.png", png_bytes((0, 0, 200)), "image/png"))]
        r = client.post("/api/datasets/shapes/upload", files=files, data={"captions": json.dumps(["a red square", None])})
        assert r.status_code == 201, r.text
        job = {"job": "extension", "config": {"name": "run1", "process": [{
            "type": "sd_trainer", "training_folder": "ignored", "device": "cpu",
            "network": {"type": "lora", "linear": 4},
            "datasets": [{"folder_path": str(settings.datasets_folder / "shapes"), "resolution": [64]}],
            "train": {"steps": 10}, "model": {"name_or_path": "some/model"},
        }]}}
        r = client.post("/api/jobs", json={"config": job})
        assert r.status_code == 201, r.text
        run = settings.training_folder / "run1"
        (run / "samples").mkdir(parents=True)
        (run / "samples" / "000000005_0.jpg").write_bytes(png_bytes())
        (run / "log.txt").write_text("line 1\nline 2\n")
        (run / "status.json").write_text(json.dumps({"state": "completed", "step": 10, "total_steps": 10, "pid": 1}))
        (run / "metrics_run1.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / (s + 1)}) + "\n" for s in range(10)))
        (run / "run1.safetensors").write_bytes(b"x" * 100)
        checkpoint = run / "checkpoints" / "000000010"
        checkpoint.mkdir(parents=True)
        (checkpoint / "manifest.json").write_text("{}")
        client.app_settings = settings
        client.outside = outside
        yield client


def raw_request(app: Any, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """An HTTP request with the path exactly as given (clients normalise `..` away before sending)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "server": ("testserver", 80),
        "client": ("127.0.0.1", 1), "headers": [(b"host", b"testserver")] + [
            (k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    status, body = 0, b""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, body
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")

    asyncio.run(app(scope, receive, send))
    return status, body


# ----------------------------------------------------------------------------------- auth


@pytest.mark.parametrize(("method", "path"), [r for r in ROUTES if r not in OPEN_ROUTES], ids=lambda x: str(x))
def test_every_route_refuses_a_request_without_the_token(ui, method, path):
    url = concrete(path)
    anonymous = TestClient(ui.app)
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN},
                    {"Cookie": f"{COOKIE}=forged"}, {"Accept": "text/html"}):
        response = anonymous.request(method, url, headers=headers)
        assert response.status_code == 401, (method, url, headers, response.text)
        assert SECRET not in response.text and "red square" not in response.text


def test_the_route_table_covers_the_api():
    table = set(ROUTES)
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(make_settings(Path(tmp)))
        spec = app.openapi()["paths"]
        app.state.ctx.store.close()
    for path, methods in spec.items():
        for method in methods:
            assert (method.upper(), path) in table or (method.upper(), path.replace("{path}", "{path:path}")) in table
    assert ("GET", "/{path:path}") in table and ("GET", "/login") in table


def test_login_sets_a_cookie_that_opens_every_route_and_logout_closes_them(ui):
    anonymous = TestClient(ui.app)
    page = anonymous.get("/login")
    assert page.status_code == 200 and "token" in page.text
    html = anonymous.get("/jobs/1", headers={"Accept": "text/html"})
    assert html.status_code == 401 and "<form" in html.text  # a browser gets the sign-in form
    started = time.monotonic()
    assert anonymous.post("/api/auth/login", json={"token": "nope"}).status_code == 401
    assert time.monotonic() - started >= 0.4
    r = anonymous.post("/api/auth/login", json={"token": TOKEN})
    assert r.status_code == 200
    cookie = r.cookies.get(COOKIE)
    assert cookie and TOKEN not in cookie  # the cookie is derived from the token, not the token
    assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
    assert anonymous.get("/api/jobs").status_code == 200
    assert anonymous.get("/api/jobs/1/files/log.txt").text == "line 1\nline 2\n"
    # a page elsewhere cannot make the browser use the cookie for a change
    cross = anonymous.post("/api/jobs/1/start", headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403
    anonymous.post("/api/auth/logout")
    anonymous.cookies.clear()
    assert anonymous.get("/api/jobs").status_code == 401


def test_without_a_token_only_localhost_is_served(tmp_path):
    settings = make_settings(tmp_path, token=None)
    host, notes = bind_address(settings, None)
    assert host == "127.0.0.1" and "127.0.0.1 only" in notes[0]
    with pytest.raises(ExposedWithoutToken, match="AI_TOOLKIT_AUTH"):  # all interfaces need a token
        bind_address(settings, "0.0.0.0")
    assert bind_address(make_settings(tmp_path / "b"), None)[0] == "0.0.0.0"
    app = create_app(settings, loopback_only=True)
    with TestClient(app, base_url="http://localhost:8675") as client:
        assert client.get("/api/jobs").status_code == 200
        assert client.get("/api/jobs", headers={"Host": "attacker.example:8675"}).status_code == 403
        assert client.post("/api/datasets", json={"name": "x"}, headers={"Origin": "http://attacker.example"}).status_code == 403
        assert client.post("/api/datasets", json={"name": "x"}, headers={"Origin": "http://localhost:5173"}).status_code == 403
        assert client.post("/api/datasets", json={"name": "x"}, headers={"Origin": "http://localhost:8675"}).status_code == 201
    dev = create_app(make_settings(tmp_path / "dev", token=None, allowed_origins=("http://localhost:5173",)), loopback_only=True)
    with TestClient(dev, base_url="http://localhost:8675") as client:  # the front end's dev server, allowed by name
        assert client.post("/api/datasets", json={"name": "x"}, headers={"Origin": "http://localhost:5173"}).status_code == 201


# ----------------------------------------------------------------------------------- paths


def test_path_traversal_is_refused(ui):
    settings: UISettings = ui.app_settings
    outside: Path = ui.outside
    run = settings.training_folder / "run1"
    (run / "escape.txt").symlink_to(outside / "secret.txt")
    (run / "samples" / "000000009_0.jpg").symlink_to(outside / "secret.png")
    (settings.datasets_folder / "evil").symlink_to(outside, target_is_directory=True)
    (settings.datasets_folder / "shapes" / "link.png").symlink_to(outside / "secret.png")
    attempts = [
        "/api/jobs/1/files/%2e%2e/%2e%2e/outside/secret.txt",
        "/api/jobs/1/files/..%2f..%2f..%2foutside%2fsecret.txt",
        "/api/jobs/1/files/%252e%252e/%252e%252e/outside/secret.txt",
        f"/api/jobs/1/files/{outside / 'secret.txt'}",
        f"/api/jobs/1/files/%2F{str(outside / 'secret.txt').lstrip('/')}",
        "/api/jobs/1/files/escape.txt",
        "/api/jobs/1/files/samples/000000009_0.jpg",
        "/api/jobs/1/files/..\\..\\outside\\secret.txt",
        "/api/datasets/evil",
        "/api/datasets/evil/items/secret.png/file",
        "/api/datasets/shapes/items/link.png/file",
        "/api/datasets/shapes/items/%2e%2e%2f%2e%2e%2foutside%2fsecret.png/file",
        "/api/datasets/%2e%2e/items/outside/file",
        "/api/datasets/..%2foutside/items/secret.png/thumbnail",
    ]
    for url in attempts:
        r = ui.get(url)
        assert r.status_code in (400, 403, 404), (url, r.status_code)
        assert SECRET not in r.text and r.content != png_bytes()
    for path in ["/api/jobs/1/files/../../../outside/secret.txt", "/api/jobs/1/files/samples/../../../../outside/secret.txt",
                 "/api/datasets/shapes/items/../../../outside/secret.png/file", "/../outside/secret.txt"]:
        status, body = raw_request(ui.app, "GET", path, AUTH)
        assert status in (400, 403, 404), (path, status)
        assert SECRET.encode() not in body
    for method, url in [("DELETE", "/api/datasets/evil"), ("POST", "/api/datasets/evil/upload"),
                        ("PUT", "/api/datasets/evil/items/secret.png/caption"),
                        ("DELETE", "/api/datasets/shapes/items/link.png")]:
        kwargs: dict[str, Any] = {"json": {"caption": "x"}} if method == "PUT" else {}
        if method == "POST":
            kwargs = {"files": [("files", ("a.png", png_bytes(), "image/png"))]}
        r = ui.request(method, url, **kwargs)
        assert r.status_code in (400, 403, 404), (method, url, r.status_code)
    assert (outside / "secret.txt").read_text() == SECRET and sorted(p.name for p in outside.iterdir()) == [
        "secret.png", "secret.txt"]
    # the static app cannot be walked out of either
    settings.ui_dist.mkdir()
    (settings.ui_dist / "index.html").write_text("<html>app</html>")
    (settings.ui_dist / "up.txt").symlink_to(outside / "secret.txt")
    for path in ["/..%2f..%2foutside%2fsecret.txt", "/up.txt", "/%2e%2e/outside/secret.txt"]:
        r = ui.get(path)
        assert SECRET not in r.text, path
    status, body = raw_request(ui.app, "GET", "/../outside/secret.txt", AUTH)
    assert SECRET.encode() not in body
    assert ui.get("/jobs/1").text == "<html>app</html>"  # the app's own routes get index.html


# ----------------------------------------------------------------------------------- GET is read-only


def test_get_routes_change_nothing(ui):
    settings: UISettings = ui.app_settings
    store: Store = ui.app.state.ctx.store
    roots = (settings.training_folder, settings.datasets_folder, settings.home)
    ui.get("/api/datasets/shapes/items/red.png/thumbnail")  # warm the cache: it is not state
    before_db, before_files = store.dump(), tree(*roots, skip=("thumbs",))
    gets = [p for m, p in ROUTES if m == "GET"]
    extra = ["/api/jobs/1/files/samples/000000005_0.jpg", "/api/jobs/1/files/run1.safetensors?download=1",
             "/api/datasets/shapes/items/blue.png/thumbnail", "/api/jobs/1/metrics?since_step=3",
             "/api/jobs/1/log?source=log", "/jobs/1", "/"]
    for url in [concrete(p) for p in gets] + extra:
        r = ui.get(url)
        assert r.status_code < 500, (url, r.status_code, r.text)
        if url.startswith("/api/") and url not in ("/api/docs",):
            assert r.status_code == 200, (url, r.status_code, r.text)
    after_files = tree(*roots, skip=("thumbs",))
    after_files.pop("home/aitk_ui.db-wal", None), before_files.pop("home/aitk_ui.db-wal", None)
    after_files.pop("home/aitk_ui.db-shm", None), before_files.pop("home/aitk_ui.db-shm", None)
    assert store.dump() == before_db
    assert after_files == before_files


def test_changing_routes_are_post_put_or_delete_only(ui):
    store: Store = ui.app.state.ctx.store
    for method, path in ROUTES:
        assert method in ("GET", "POST", "PUT", "DELETE"), (method, path)
    before = store.dump()
    for method, path in ROUTES:
        if method in ("POST", "PUT", "DELETE") and ("GET", path) not in ROUTES:
            r = ui.get(concrete(path))
            assert r.status_code in (404, 405), (path, r.status_code)
    assert store.dump() == before
    assert ui.get("/api/jobs/1").json()["job"]["status"] == "idle"


# ----------------------------------------------------------------------------------- uploads


def test_uploads_of_a_wrong_type_or_too_large_are_refused(ui):
    folder = ui.app_settings.datasets_folder / "shapes"
    before = tree(folder)
    bad = [
        ("notes.txt", b"hello", "text/plain", 415),
        ("fake.png", b"this is text, not a picture", "image/png", 415),
        ("tool.jpg", b"MZ\x90\x00" + b"\x00" * 60, "image/jpeg", 415),
        ("red.png", png_bytes(), "text/html", 415),
        ("clip.mp4", png_bytes(), "video/mp4", 415),
        ("page.svg", b"<svg onload=alert(1)>", "image/svg+xml", 415),
        ("big.png", png_bytes() + b"\x00" * (UPLOAD_LIMIT + 10), "image/png", 413),
        ("empty.png", b"", "image/png", 415),
    ]
    for name, content, kind, status in bad:
        r = ui.post("/api/datasets/shapes/upload", files=[("files", (name, content, kind))])
        assert r.status_code == status, (name, r.status_code, r.text)
    # one bad file refuses the whole request: nothing half-saved
    mixed = [("files", ("ok.png", png_bytes(), "image/png")), ("files", ("bad.png", b"nope", "image/png"))]
    assert ui.post("/api/datasets/shapes/upload", files=mixed).status_code == 415
    huge = ui.post("/api/datasets/shapes/upload", content=b"x" * (UPLOAD_LIMIT + (2 << 20)),
                   headers={"Content-Type": "multipart/form-data; boundary=zz"})
    assert huge.status_code == 413
    assert tree(folder) == before
    # a good video and image with odd names are taken, renamed safely
    mp4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00" * 100
    good = [("files", ("My Clip (1).MP4", mp4, "video/mp4")), ("files", ("../../red.png", png_bytes(), "image/png"))]
    r = ui.post("/api/datasets/shapes/upload", files=good)
    assert r.status_code == 201, r.text
    assert [s["name"] for s in r.json()["saved"]] == ["My_Clip_1.mp4", "red_2.png"]
    assert (folder / "My_Clip_1.mp4").read_bytes() == mp4


def test_dataset_items_captions_and_delete(ui):
    detail = ui.get("/api/datasets/shapes").json()
    assert [(i["name"], i["caption"]) for i in detail["items"]] == [("blue.png", None), ("red.png", "a red square")]
    thumb = ui.get("/api/datasets/shapes/items/red.png/thumbnail")
    assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"
    assert ui.put("/api/datasets/shapes/items/blue.png/caption", json={"caption": "a blue square, [trigger]"}).status_code == 200
    folder = ui.app_settings.datasets_folder / "shapes"
    assert (folder / "blue.txt").read_text() == "a blue square, [trigger]"
    assert ui.get("/api/datasets/shapes/items/blue.png/caption").json()["caption"] == "a blue square, [trigger]"
    assert ui.delete("/api/datasets/shapes/items/blue.png").status_code == 200
    assert not (folder / "blue.png").exists() and not (folder / "blue.txt").exists()
    clip = mp4_bytes(ui.app_settings.home)
    r = ui.post("/api/datasets/shapes/upload", files=[("files", ("walk.mp4", clip, "video/mp4"))],
                data={"captions": json.dumps({"walk.mp4": "walking"})})
    assert r.status_code == 201, r.text
    items = {i["name"]: i for i in ui.get("/api/datasets/shapes").json()["items"]}
    assert items["walk.mp4"]["kind"] == "video" and items["walk.mp4"]["caption"] == "walking"
    thumb = ui.get("/api/datasets/shapes/items/walk.mp4/thumbnail")
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size == (64, 48)
    part = ui.get("/api/datasets/shapes/items/walk.mp4/file", headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == clip[:100]  # videos seek with range requests
    assert ui.delete("/api/datasets/shapes/items/walk.mp4").status_code == 200
    report = ui.get("/api/datasets/shapes/inspect", params={"resolution": 64}).json()
    assert report["ok"] and any("1 image used" in line for line in report["lines"])
    assert ui.get("/api/datasets").json()["datasets"][0]["images"] == 1
    assert ui.post("/api/datasets", json={"name": "shapes"}).status_code == 409
    assert ui.delete("/api/datasets/shapes").status_code == 200 and not folder.exists()


# ----------------------------------------------------------------------------------- names and jobs

BAD_NAMES = ["../x", "a/b", "..", ".hidden", "a b", "x" * 101, "con", "", "a\\b", "名前", "-lead", "trail."]


def test_bad_job_and_dataset_names_are_refused(ui):
    base = ui.get("/api/jobs/1").json()["config"]
    for name in BAD_NAMES:
        config = json.loads(json.dumps(base))
        config["config"]["name"] = name
        r = ui.post("/api/jobs", json={"config": config})
        assert r.status_code == 422, (name, r.text)
        assert any("name" in p for p in r.json()["detail"]["problems"])
        r = ui.post("/api/jobs", json={"config": base, "name": name})
        assert r.status_code == 422, name
        r = ui.post("/api/datasets", json={"name": name})
        assert r.status_code in (400, 404, 422), (name, r.status_code)
        r = ui.post("/api/jobs/1/clone", json={"name": name})
        assert r.status_code in (400, 422), (name, r.status_code)
    assert sorted(p.name for p in ui.app_settings.datasets_folder.iterdir()) == ["shapes"]
    assert [j["name"] for j in ui.get("/api/jobs").json()["jobs"]] == ["run1"]


def test_an_invalid_job_comes_back_with_the_validation_messages(ui):
    text = """job: extension
config:
  name: broken
  process:
    - type: sd_trainer
      training_folder: output
      datasets: [{folder_path: /data, resolution: [500]}]
      train: {steps: 0, lr: -1, optimizer: adamw9}
      model: {name_or_path: x}
"""
    r = ui.post("/api/jobs", json={"yaml": text})
    assert r.status_code == 422
    problems = r.json()["detail"]["problems"]
    joined = "\n".join(problems)
    assert "config.process[0].train.lr" in joined and "config.process[0].train.steps" in joined
    assert "config.process[0].datasets[0].resolution" in joined and "multiple of 8" in joined
    assert "adamw9" in joined
    syntax = ui.post("/api/jobs", json={"yaml": "job: extension\nconfig:\n  name: [unclosed\n"})
    assert syntax.status_code == 422 and "line" in "\n".join(syntax.json()["detail"]["problems"])
    checked = ui.post("/api/validate", json={"yaml": text}).json()
    assert not checked["ok"] and checked["problems"] == problems
    good = ui.post("/api/validate", json={"yaml": ui.get("/api/jobs/1/yaml").text.replace("run1", "other")}).json()
    assert good["ok"] and good["config"]["config"]["name"] == "other" and "yaml" in good
    assert ui.post("/api/jobs", json={"yaml": text, "config": {}}).status_code == 422
    assert [j["name"] for j in ui.get("/api/jobs").json()["jobs"]] == ["run1"]


def test_job_lifecycle_without_a_worker(ui):
    store: Store = ui.app.state.ctx.store
    settings: UISettings = ui.app_settings
    detail = ui.get("/api/jobs/1").json()
    assert detail["run_status"]["state"] == "completed" and detail["log_tail"] == ["line 1", "line 2"]
    assert detail["samples"][0]["step"] == 5 and detail["lora_files"][0]["name"] == "run1.safetensors"
    assert detail["checkpoints"][0]["complete"]
    # the UI owns where output goes
    assert yaml.safe_load(detail["yaml"])["config"]["process"][0]["training_folder"] == str(settings.training_folder)
    assert ui.post("/api/jobs/1/save-now").status_code == 409  # not running
    assert ui.post("/api/jobs/1/start").json()["job"]["status"] == "queued"
    assert ui.post("/api/jobs/1/start").status_code == 409
    assert ui.put("/api/jobs/1", json={"gpu_ids": "0"}).status_code == 409  # queued: stop first
    assert ui.post("/api/jobs/1/stop").json()["job"]["status"] == "stopped"
    assert ui.put("/api/jobs/1", json={"gpu_ids": "0,1"}).json()["job"]["gpu_ids"] == "0,1"
    assert ui.put("/api/jobs/1", json={"gpu_ids": "0;rm -rf"}).status_code == 400
    assert ui.put("/api/jobs/1", json={"gpu_ids": "CPU"}).json()["job"]["gpu_ids"] == "cpu"
    clone = ui.post("/api/jobs/1/clone").json()["job"]
    assert clone["name"] == "run1_copy" and clone["status"] == "idle"
    assert ui.post("/api/jobs/1/clone").json()["job"]["name"] == "run1_copy_2"
    # running: no delete, save-now reaches the run through a file in its folder
    store.update_job(1, status=RUNNING, pid=None)
    assert ui.delete("/api/jobs/1").status_code == 409
    assert ui.post("/api/jobs/1/save-now").status_code == 200
    assert (settings.training_folder / "run1" / "control" / "save_now").is_file()
    assert ui.post("/api/jobs/1/sample-now").status_code == 200
    assert ui.post("/api/jobs/1/stop").json()["job"]["status"] == "stopping"
    assert ui.delete("/api/jobs/1").status_code == 409
    store.update_job(1, status="stopped")
    assert ui.delete("/api/jobs/1", params={"delete_files": True}).status_code == 200
    assert not (settings.training_folder / "run1").exists()
    assert ui.get("/api/jobs/1").status_code == 404


def test_settings_keep_the_hf_token_secret(ui):
    token = "hf_abcdefghijklmnopqrstuvwxyz123456"
    r = ui.put("/api/settings", json={"hf_token": token, "datasets_folder": str(ui.app_settings.home.parent / "d2")})
    assert r.status_code == 200
    for response in (r, ui.get("/api/settings"), ui.get("/api/system")):
        assert token not in response.text and token[:-4] not in response.text
    body = ui.get("/api/settings").json()
    assert body["hf_token_set"] and body["hf_token_hint"] == "…3456"
    assert body["datasets_folder"].endswith("d2") and ui.get("/api/datasets").json()["datasets"] == []
    assert ui.put("/api/settings", json={"hf_token": ""}).json()["hf_token_set"] is False


def test_presets_schema_and_quick_train(ui):
    presets = ui.get("/api/presets").json()["presets"]
    ids = {p["id"] for p in presets}
    assert {"sd15", "sdxl", "flux_dev", "flux_schnell", "flux_kontext", "wan21", "wan22_t2v", "wan22_i2v",
            "video_training"} <= ids
    for preset_id in ids:
        job = ui.get(f"/api/presets/{preset_id}").json()["job"]
        process = job["config"]["process"][0]
        process["datasets"][0]["folder_path"] = "/data/x"
        if "control_path" in process["datasets"][0]:
            process["datasets"][0]["control_path"] = "/data/x_control"
        if "ctrl_img" in process["sample"]:
            process["sample"]["ctrl_img"] = "/data/first.png"
        checked = ui.post("/api/validate", json={"config": job}).json()
        assert checked["ok"], (preset_id, checked["problems"])
    video = ui.get("/api/presets/video_training").json()["job"]["config"]["process"][0]["network"]["alpha_schedule"]
    phases = video["alpha_phases"]
    assert list(phases) == ["foundation", "balance", "emphasis"]
    assert phases["foundation"]["exit_criteria"]["loss_improvement_rate_below"] == 0.0008
    assert phases["balance"]["min_steps"] == 1500 and video["per_expert"]["high_noise"]["alpha_phases"]["foundation"]["min_steps"] == 1400
    schema = ui.get("/api/schema").json()
    assert "config" in schema["properties"] and "TrainConfig" in json.dumps(schema)
    files = [("files", (f"img{i}.png", png_bytes((i * 40, 90, 90)), "image/png")) for i in range(3)]
    r = ui.post("/api/quick-train", files=files, data={
        "name": "quick1", "trigger_word": "zkp", "preset": "sd15", "model_path": "/models/tiny", "steps": "40",
        "device": "cpu", "captions": json.dumps({"img0.png": "a photo of zkp", "img1.png": "zkp on a beach"}),
    })
    assert r.status_code == 201, r.text
    job = r.json()["job"]
    assert job["status"] == "queued" and job["summary"]["trigger_word"] == "zkp" and job["summary"]["steps"] == 40
    folder = ui.app_settings.datasets_folder / "quick1"
    assert sorted(p.name for p in folder.iterdir()) == ["img0.png", "img0.txt", "img1.png", "img1.txt", "img2.png"]
    assert (folder / "img1.txt").read_text() == "zkp on a beach"
    assert ui.post("/api/quick-train", files=files, data={"name": "quick1"}).status_code == 409
    assert ui.post("/api/quick-train", files=files, data={"name": "k2", "preset": "flux_kontext"}).status_code == 400


def test_the_store_adds_missing_columns_on_start(tmp_path):
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:  # a jobs table from an older version, without most columns
        conn.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, name VARCHAR(100) UNIQUE, config_yaml TEXT, "
                     "training_folder TEXT, status VARCHAR(16), gpu_ids VARCHAR(64), step INTEGER, created_at FLOAT, "
                     "updated_at FLOAT)")
        conn.execute("CREATE TABLE schema_info (id INTEGER PRIMARY KEY, version INTEGER)")
        conn.execute("INSERT INTO schema_info VALUES (1, 0)")
        conn.execute("INSERT INTO jobs (id, name, config_yaml, training_folder, status, gpu_ids, step, created_at, "
                     "updated_at) VALUES (1, 'old', 'job: extension', '/tmp', 'idle', '', 0, 0, 0)")
    store = Store(f"sqlite:///{db}")
    job = store.get_job(1)
    assert job.name == "old" and job.pid_started is None and job.stop_signaled_at is None
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version FROM schema_info").fetchone()[0] == store.version
    store.close()


def test_a_deleted_jobs_id_is_never_given_to_a_new_job(tmp_path):
    """SQLite reuses a deleted last row's id; a page or client still following that job must not
    see another one under its id (found by bench/soak.py)."""
    store = Store(f"sqlite:///{tmp_path / 'ids.db'}")
    fields = {"config_yaml": "job: extension", "training_folder": "/tmp", "status": "idle"}
    first, second = store.add_job(name="a", **fields), store.add_job(name="b", **fields)
    assert store.delete_job(second.id, ["idle"])
    third = store.add_job(name="c", **fields)
    assert third.id == second.id + 1
    assert store.delete_job(third.id, ["idle"]) and store.delete_job(first.id, ["idle"])
    assert store.add_job(name="d", **fields).id == third.id + 1
    store.close()


def test_dashboard_reports_gpus_through_nvidia_ml_py_when_importable(ui, monkeypatch):
    import sys
    import types

    assert ui.get("/api/system").json()["system"]["gpus"] is None or "pynvml" in sys.modules
    fake = types.ModuleType("pynvml")
    fake.NVML_TEMPERATURE_GPU = 0
    fake.nvmlInit = fake.nvmlShutdown = lambda: None
    fake.nvmlDeviceGetCount = lambda: 1
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 << 30, total=80 << 30)
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=97)
    fake.nvmlDeviceGetName = lambda h: b"NVIDIA H100"
    fake.nvmlDeviceGetTemperature = lambda h, kind: 61
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpus = ui.get("/api/system").json()["system"]["gpus"]
    assert gpus == [{"index": 0, "name": "NVIDIA H100", "utilization": 97, "memory_used": 3 << 30,
                     "memory_total": 80 << 30, "temperature": 61}]


def test_log_tail_shows_what_a_terminal_would(tmp_path):
    from aitk.ui.files import tail_lines

    log = tmp_path / "output.log"
    log.write_bytes(b"start\n  0%|  | 0/10\r 50%|# | 5/10\r100%|##| 10/10\r\nerror in job.yaml: boom\n")
    assert tail_lines(log, 5) == ["start", "100%|##| 10/10", "error in job.yaml: boom"]
    assert tail_lines(log, 1) == ["error in job.yaml: boom"] and tail_lines(tmp_path / "missing", 3) == []
