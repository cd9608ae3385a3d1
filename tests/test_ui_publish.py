"""The job page's "Publish to the Hub" through the UI's HTTP API: a completed job's final LoRA, model
card and samples go to the local hub of tests/hub_server.py (real huggingface_hub client, real HTTP)
with the settings page's token, in the background; the answer gives the repo URL, or the one-line
reason; the outcome is kept for the next page load. Only a completed job can be published.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hub_server import FakeHub, hub  # noqa: F401 - `hub` is the fixture
from test_model_cache_api import HF_TOKEN, ui, wait_for  # noqa: F401 - `ui` is the fixture


def lora_bytes() -> bytes:
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(3)
    return save({"lora_unet_a.lora_down.weight": torch.randn(4, 32, generator=g),
                 "lora_unet_a.lora_up.weight": torch.randn(32, 4, generator=g), "lora_unet_a.alpha": torch.tensor(4.0)})


def jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def finished_job(ui: TestClient, name: str, save: dict[str, Any] | None = None) -> tuple[int, Path]:
    """A job created through the API whose run completed: its folder holds config.yaml (the job as
    run), the final LoRA, a step LoRA and a preview, as the trainer leaves them."""
    from aitk.config.loader import dump_job, parse_job_text

    config = {"job": "extension", "config": {"name": name, "process": [{
        "type": "sd_trainer", "training_folder": "x", "device": "cpu", "trigger_word": "shp",
        "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
        "datasets": [{"folder_path": str(ui.settings.datasets_folder / "shapes"), "resolution": [64]}],
        "train": {"steps": 10}, "save": save or {},
        "model": {"name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5"}}]}}
    created = ui.post("/api/jobs", json={"config": config})
    assert created.status_code == 201, created.text
    job_id = created.json()["job"]["id"]
    stored = ui.app.state.ctx.store.get_job(job_id)
    run = Path(stored.training_folder) / name
    (run / "samples").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_job(parse_job_text(stored.config_yaml).job), encoding="utf-8")
    (run / f"{name}.safetensors").write_bytes(lora_bytes())
    (run / f"{name}_000000005.safetensors").write_bytes(lora_bytes())
    (run / "samples" / "000000010_0.jpg").write_bytes(jpeg())
    ui.app.state.ctx.store.update_job(job_id, status="completed", step=10, finished_at=time.time())
    return job_id, run


def publish_state(ui: TestClient, job_id: int) -> dict[str, Any]:
    response = ui.get(f"/api/jobs/{job_id}/publish")
    assert response.status_code == 200, response.text
    return response.json()


def published(ui: TestClient, job_id: int) -> dict[str, Any]:
    return wait_for(lambda: publish_state(ui, job_id), lambda s: s["publish"]["state"] != "running")[-1]["publish"]


def test_publish_pushes_a_finished_runs_lora_and_answers_the_url(ui: TestClient, hub: FakeHub):
    job_id, run = finished_job(ui, "pub_lora", {"hf_repo_id": "someone/pub-lora"})
    before = publish_state(ui, job_id)
    assert before["publish"] is None and before["publishable"] is True
    assert before["defaults"] == {"repo_id": "someone/pub-lora", "private": True, "push_to_hub": False}
    assert ui.put("/api/settings", json={"hf_token": HF_TOKEN}).status_code == 200

    started = ui.post(f"/api/jobs/{job_id}/publish", json={})
    assert started.status_code == 202, started.text
    assert started.json()["publish"]["repo_id"] == "someone/pub-lora"
    again = ui.post(f"/api/jobs/{job_id}/publish", json={})
    assert again.status_code in (202, 409)  # 409 while the first one runs
    state = published(ui, job_id)
    assert state["state"] == "uploaded", state
    assert state["url"] == f"{hub.url}/someone/pub-lora" and state["repo_id"] == "someone/pub-lora"
    assert any(line.startswith("uploading 1 LoRA file(s)") for line in state["log"])

    files = hub.files["someone/pub-lora"]
    assert files["pub_lora.safetensors"] == (run / "pub_lora.safetensors").read_bytes()
    assert "pub_lora_000000005.safetensors" not in files  # step files stay local
    assert files["samples/000000010_0.jpg"] == (run / "samples" / "000000010_0.jpg").read_bytes()
    assert files["README.md"] == (run / "README.md").read_bytes() and b"instance_prompt: shp" in files["README.md"]
    assert hub.repos["someone/pub-lora"]["visibility"] == "private"  # save.hf_private's default
    assert {r.headers.get("authorization") for r in hub.requests} == {f"Bearer {HF_TOKEN}"}

    # the outcome is kept: a new server on the same home shows it
    kept = json.loads((ui.settings.home / "jobs" / str(job_id) / "publish.json").read_text())
    assert kept["state"] == "uploaded" and kept["url"] == state["url"]
    from aitk.ui.server import create_app

    with TestClient(create_app(ui.settings), headers=ui.headers) as other:
        assert other.get(f"/api/jobs/{job_id}/publish").json()["publish"]["url"] == state["url"]
        other.app.state.ctx.store.close()

    # the small form's repo id and visibility win over the job's save section
    renamed = ui.post(f"/api/jobs/{job_id}/publish", json={"repo_id": "tester/renamed", "private": False})
    assert renamed.status_code == 202, renamed.text
    state = published(ui, job_id)
    assert state["state"] == "uploaded" and state["url"] == f"{hub.url}/tester/renamed"
    assert hub.repos["tester/renamed"]["visibility"] == "public"
    assert hub.files["tester/renamed"]["pub_lora.safetensors"] == (run / "pub_lora.safetensors").read_bytes()


def test_publish_without_a_repo_id_uses_the_token_user_and_job_name(ui: TestClient, hub: FakeHub):
    job_id, _run = finished_job(ui, "no_repo_lora")
    assert publish_state(ui, job_id)["defaults"]["repo_id"] is None
    ui.put("/api/settings", json={"hf_token": HF_TOKEN})
    assert ui.post(f"/api/jobs/{job_id}/publish", json={"repo_id": ""}).status_code == 202
    state = published(ui, job_id)
    assert state["state"] == "uploaded" and state["url"] == f"{hub.url}/tester/no_repo_lora"  # whoami: tester


def test_publish_failures_are_one_line_and_only_completed_jobs_publish(ui: TestClient, hub: FakeHub):
    job_id, run = finished_job(ui, "fail_lora", {"hf_repo_id": "someone/fail-lora"})
    # no token anywhere (the settings page, HF_TOKEN, a .env, a stored login): said, nothing sent
    assert ui.post(f"/api/jobs/{job_id}/publish", json={}).status_code == 202
    state = published(ui, job_id)
    assert state["state"] == "failed" and state["url"] is None
    assert "no Hugging Face token" in state["message"] and "\n" not in state["message"]
    assert hub.requests == []

    ui.put("/api/settings", json={"hf_token": HF_TOKEN})
    hub.fail_status = 500
    assert ui.post(f"/api/jobs/{job_id}/publish", json={}).status_code == 202
    state = published(ui, job_id)
    assert state["state"] == "failed" and "500" in state["message"] and "someone/fail-lora" in state["message"]
    assert "Traceback" not in state["message"] and "\n" not in state["message"]
    assert (run / "fail_lora.safetensors").is_file()  # the run is untouched
    hub.fail_status = None

    assert ui.post(f"/api/jobs/{job_id}/publish", json={"repo_id": "not a repo"}).status_code == 400
    assert ui.post("/api/jobs/999/publish", json={}).status_code == 404
    ui.app.state.ctx.store.update_job(job_id, status="stopped")
    refused = ui.post(f"/api/jobs/{job_id}/publish", json={})
    assert refused.status_code == 409 and "only a completed job" in refused.json()["detail"]
    assert publish_state(ui, job_id)["publishable"] is False
    ui.app.state.ctx.store.update_job(job_id, status="completed")
    (run / "config.yaml").unlink()
    assert ui.post(f"/api/jobs/{job_id}/publish", json={}).status_code == 409


@pytest.fixture(autouse=True)
def _dataset(ui: TestClient) -> None:
    assert ui.post("/api/datasets", json={"name": "shapes"}).status_code == 201


def test_a_run_file_linking_outside_is_not_published(ui: TestClient, hub: FakeHub, tmp_path: Path):
    job_id, run = finished_job(ui, "link_lora", {"hf_repo_id": "someone/link-lora"})
    secret = tmp_path / "outside.safetensors"
    secret.write_bytes(b"not yours")
    (run / "link_lora.safetensors").unlink()
    (run / "link_lora.safetensors").symlink_to(secret)
    refused = ui.post(f"/api/jobs/{job_id}/publish", json={})
    assert refused.status_code == 403 and "leads outside the run folder" in refused.json()["detail"]
    assert hub.requests == [] and publish_state(ui, job_id)["publish"] is None
