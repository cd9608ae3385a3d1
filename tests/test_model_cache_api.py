"""The settings page's model cache through the UI's HTTP API (FastAPI's TestClient, token required),
against the local hub of tests/hub_server.py: where the cache is and its size (the blobs on disk),
the cached repos, a background fetch's progress to done, one fetch at a time, the one-line errors,
a job's models, and deleting a cached model.

The `ui` fixture (an app on a temporary home with the token) is shared with test_ui_publish.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hub_server import FakeHub, Request, hub  # noqa: F401 - `hub` is the fixture
from test_model_cache import PIPE, PIPE_FETCHED, pipe_repo  # noqa: F401 - `pipe_repo` is a fixture

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HF_TOKEN = "hf_settings_page_token_0123"


@pytest.fixture
def ui(tmp_path: Path, hub: FakeHub) -> Iterator[TestClient]:
    """The app with the token set, on a temporary home, training and datasets folder; huggingface_hub
    points at the local hub with its cache in tmp_path/hf-cache (the `hub` fixture)."""
    from aitk.ui.server import create_app
    from aitk.ui.settings import UISettings

    settings = UISettings.from_env({}, home=tmp_path / "home", training_folder=tmp_path / "out",
                                   datasets_folder=tmp_path / "data")
    settings = replace(settings, auth_token=TOKEN, ui_dist=tmp_path / "dist", job_cwd=tmp_path)
    app = create_app(settings)
    with TestClient(app, headers=AUTH) as client:
        client.settings = settings  # type: ignore[attr-defined]
        yield client
    app.state.ctx.store.close()


def wait_for(read: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool],
             seconds: float = 30) -> list[dict[str, Any]]:
    """Poll `read` until `done`; every answer seen."""
    seen = []
    deadline = time.monotonic() + seconds
    while True:
        seen.append(read())
        if done(seen[-1]):
            return seen
        assert time.monotonic() < deadline, seen[-1]
        time.sleep(0.02)


def fetch_task(ui: TestClient) -> dict[str, Any]:
    response = ui.get("/api/models/fetch")
    assert response.status_code == 200, response.text
    return response.json()["task"]


def finished(ui: TestClient) -> dict[str, Any]:
    return wait_for(lambda: fetch_task(ui), lambda t: t["state"] in ("completed", "failed"))[-1]


def blob_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.glob("models--*/blobs/*") if p.is_file())


def hold_downloads(hub: FakeHub) -> threading.Event:
    """Weight file downloads wait until the returned event is set (a fetch stays in flight meanwhile)."""
    release = threading.Event()
    serve = hub.handle

    def held(req: Request):
        if "/resolve/" in req.path and req.method == "GET" and req.path.endswith((".safetensors", ".bin")):
            release.wait(30)
        return serve(req)

    hub.handle = held  # type: ignore[method-assign]
    return release


def test_settings_show_the_cache_and_a_fetch_reports_progress_to_done(
    ui: TestClient, hub: FakeHub, pipe_repo: dict[str, bytes], tmp_path: Path
):
    cache = tmp_path / "hf-cache"
    empty = ui.get("/api/models/cache").json()
    assert empty["hub_cache"] == str(cache) and empty["size_on_disk"] == 0 and empty["repos"] == []
    assert empty["hf_home"] and empty["fetch"] is None

    release = hold_downloads(hub)
    started = ui.post("/api/models/fetch", json={"repo_id": PIPE})
    assert started.status_code == 202, started.text
    assert started.json()["task"]["label"] == PIPE and started.json()["task"]["state"] in ("planning", "downloading")
    # one fetch at a time; the cache is not changed under it
    again = ui.post("/api/models/fetch", json={"repo_id": "tester/other"})
    assert again.status_code == 409 and f"{PIPE} is being fetched" in again.json()["detail"]
    assert ui.delete("/api/models/cache", params={"repo_id": PIPE}).status_code == 409
    wait_for(lambda: fetch_task(ui), lambda t: t["state"] == "downloading")
    total = sum(len(pipe_repo[p]) for p in PIPE_FETCHED)
    assert fetch_task(ui)["total_bytes"] == total
    release.set()
    polled = wait_for(lambda: fetch_task(ui), lambda t: t["state"] in ("completed", "failed"))
    task = polled[-1]
    assert task["state"] == "completed", task
    assert task["done_bytes"] == task["total_bytes"] == total and task["files"] == len(PIPE_FETCHED)
    (item,) = task["items"]
    assert item["done"] and item["repo_id"] == PIPE and Path(item["path"]).is_dir()
    assert [t["done_bytes"] for t in polled] == sorted(t["done_bytes"] for t in polled)

    shown = ui.get("/api/models/cache").json()
    on_disk = blob_bytes(cache)
    assert shown["exists"] and shown["size_on_disk"] == on_disk > 0
    (repo,) = shown["repos"]
    assert repo["repo_id"] == PIPE and repo["size_on_disk"] == on_disk and repo["refs"] == ["main"]
    assert repo["nb_files"] >= 10 and repo["last_accessed"] > 0
    assert shown["fetch"]["state"] == "completed"

    # deleting it goes through huggingface_hub's delete strategy
    deleted = ui.delete("/api/models/cache", params={"repo_id": PIPE})
    assert deleted.status_code == 200 and deleted.json()["freed"] == on_disk
    assert deleted.json()["cache"]["repos"] == [] and blob_bytes(cache) == 0
    assert ui.delete("/api/models/cache", params={"repo_id": PIPE}).status_code == 404
    assert ui.delete("/api/models/cache", params={"repo_id": "../etc"}).status_code == 400


def test_fetch_errors_are_one_line_and_the_settings_token_opens_gated_repos(
    ui: TestClient, hub: FakeHub, pipe_repo: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
):
    for bad in ("", "../../etc/passwd", "/abs/path", "one-part", "a/b c"):
        response = ui.post("/api/models/fetch", json={"repo_id": bad})
        assert response.status_code == 400, (bad, response.text)
    assert ui.post("/api/models/fetch", json={"repo_id": PIPE, "revision": "../x"}).status_code == 422
    assert ui.get("/api/models/fetch").json()["task"] is None  # nothing was started

    assert ui.post("/api/models/fetch", json={"repo_id": "nobody/nothing"}).status_code == 202
    task = finished(ui)
    assert task["state"] == "failed"
    assert task["error"] == (f"fetch-model: 'nobody/nothing': no repo nobody/nothing on {hub.url} (and no local path "
                             "of that name); check the spelling, or give a local path")

    hub.gated[PIPE] = 401
    hub.accepted_tokens.add(HF_TOKEN)
    assert ui.post("/api/models/fetch", json={"repo_id": PIPE}).status_code == 202
    task = finished(ui)
    assert task["state"] == "failed" and "\n" not in task["error"]
    assert task["error"].startswith(f"fetch-model: {PIPE} is gated or private on the Hub (401)")
    assert ui.put("/api/settings", json={"hf_token": HF_TOKEN}).status_code == 200
    assert ui.post("/api/models/fetch", json={"repo_id": PIPE}).status_code == 202
    assert finished(ui)["state"] == "completed"
    assert {r.headers.get("authorization") for r in hub.downloads(PIPE)} == {f"Bearer {HF_TOKEN}"}

    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    offline = ui.post("/api/models/fetch", json={"repo_id": PIPE})
    assert offline.status_code == 409 and "HF_HUB_OFFLINE is set" in offline.json()["detail"]


def test_a_jobs_models_are_fetched_by_job_id(ui: TestClient, hub: FakeHub, pipe_repo: dict[str, bytes], tmp_path: Path):
    def job(name: str, model: str) -> int:
        config = {"job": "extension", "config": {"name": name, "process": [{
            "type": "sd_trainer", "training_folder": "x", "device": "cpu", "network": {"type": "lora", "linear": 4},
            "datasets": [{"folder_path": str(tmp_path / "data"), "resolution": [64]}], "train": {"steps": 2},
            "model": {"name_or_path": model}}]}}
        created = ui.post("/api/jobs", json={"config": config, "start": True})
        assert created.status_code == 201, created.text
        return created.json()["job"]["id"]

    queued = job("queued_job", PIPE)
    started = ui.post("/api/models/fetch", json={"job_id": queued})
    assert started.status_code == 202 and started.json()["task"]["label"] == "job queued_job"
    task = finished(ui)
    assert task["state"] == "completed" and task["targets"] == [PIPE] and task["job_id"] == queued
    assert task["items"][0]["key"] == "model.name_or_path"
    assert {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.downloads(PIPE)} <= PIPE_FETCHED

    local = job("local_job", str(tmp_path))
    refused = ui.post("/api/models/fetch", json={"job_id": local})
    assert refused.status_code == 422 and "names no model on the Hugging Face Hub" in refused.json()["detail"]
    assert ui.post("/api/models/fetch", json={"job_id": 999}).status_code == 404
    assert ui.post("/api/models/fetch", json={"job_id": queued, "repo_id": PIPE}).status_code == 400
