"""The memory plan in the web UI's API (aitk/ui/routes_plan.py): POST /api/plan for a job being
edited, GET /api/jobs/{id}/plan for a stored one. Real plans of the tiny SD 1.5 model (aitk.plan on
fake tensors), through FastAPI's TestClient with the token set."""

from __future__ import annotations

import hashlib
import sys
import threading
import time
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from aitk.ui.security import COOKIE
from aitk.ui.server import create_app
from aitk.ui.settings import UISettings
from aitk.ui.store import Store
from aitk.ui.system import gpus as real_gpus

TOKEN = "plan-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

MIB = 2**20
GIB = 2**30
# The tiny job's plan is ~6.2 MiB; at 4 MiB the cheapest fix is qfloat8 + gradient checkpointing
# (~4.0 MiB), found on the first rung of the advisor's ladder (a few seconds).
TIGHT = "4MB"


def job_data(model: Path, dataset: Path, name: str = "plan_me", **model_changes: Any) -> dict[str, Any]:
    return {"job": "extension", "config": {"name": name, "process": [{
        "type": "sd_trainer", "training_folder": "ignored", "device": "cpu",
        "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
        "datasets": [{"folder_path": str(dataset), "resolution": [64], "cache_latents": True}],
        "train": {"steps": 10, "batch_size": 2, "lr": 1e-3, "optimizer": "adamw"},
        "model": {"name_or_path": str(model), **model_changes},
    }]}}


def make_settings(root: Path) -> UISettings:
    settings = UISettings.from_env({}, home=root / "home", training_folder=root / "out", datasets_folder=root / "data")
    return replace(settings, auth_token=TOKEN, ui_dist=root / "dist")


def tree(*roots: Path) -> dict[str, str]:
    """Every file under `roots` with a hash of its content (the UI's database journal aside)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


@pytest.fixture
def ui(tmp_path: Path):
    settings = make_settings(tmp_path)
    with TestClient(create_app(settings), headers=AUTH) as client:
        client.settings = settings
        yield client


@pytest.fixture(autouse=True)
def no_gpus(monkeypatch):
    """No GPU figures unless a test adds them (a machine with nvidia-ml-py would change the budget)."""
    monkeypatch.setattr("aitk.ui.system.gpus", lambda: None)


def fake_nvml(monkeypatch, totals: list[int]) -> None:
    fake = types.ModuleType("pynvml")
    fake.NVML_TEMPERATURE_GPU = 0
    fake.nvmlInit = fake.nvmlShutdown = lambda: None
    fake.nvmlDeviceGetCount = lambda: len(totals)
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=1 << 30, total=totals[h])
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=5)
    fake.nvmlDeviceGetName = lambda h: f"GPU model {h}".encode()
    fake.nvmlDeviceGetTemperature = lambda h, kind: 40
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr("aitk.ui.system.gpus", real_gpus)  # the dashboard's reader, on the fake library


# ----------------------------------------------------------------------------------- auth, read-only


def test_the_plan_routes_refuse_a_request_without_the_token(ui, tiny_sd15, shapes_dataset):
    created = ui.post("/api/jobs", json={"config": job_data(tiny_sd15, shapes_dataset)})
    assert created.status_code == 201, created.text
    job_id = created.json()["job"]["id"]
    anonymous = TestClient(ui.app)
    body = {"config": job_data(tiny_sd15, shapes_dataset)}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Cookie": f"{COOKIE}=forged"}):
        assert anonymous.post("/api/plan", json=body, headers=headers).status_code == 401
        r = anonymous.get(f"/api/jobs/{job_id}/plan", headers=headers)
        assert r.status_code == 401 and "peak_device" not in r.text
    # planning an unsaved job is a POST (it carries the job): GET on that address plans nothing
    refused = ui.get("/api/plan")
    assert refused.status_code in (404, 405) and "peak_device" not in refused.text


def test_planning_changes_nothing(ui, tiny_sd15, shapes_dataset):
    created = ui.post("/api/jobs", json={"config": job_data(tiny_sd15, shapes_dataset)})
    job_id = created.json()["job"]["id"]
    store: Store = ui.app.state.ctx.store
    roots = (ui.settings.training_folder, ui.settings.datasets_folder, ui.settings.home, tiny_sd15, shapes_dataset)
    before_db, before_files = store.dump(), tree(*roots)
    stored = ui.get(f"/api/jobs/{job_id}/plan", params={"gpu_memory": TIGHT})
    assert stored.status_code == 200 and stored.json()["ok"], stored.text
    assert stored.json()["suggested"]["yaml"]  # a suggestion is offered, not applied
    draft = ui.post("/api/plan", json={"config": job_data(tiny_sd15, shapes_dataset, name="unsaved")})
    assert draft.status_code == 200 and draft.json()["ok"], draft.text
    assert store.dump() == before_db and tree(*roots) == before_files
    assert [j["name"] for j in ui.get("/api/jobs").json()["jobs"]] == ["plan_me"]  # "unsaved" was not stored


# ----------------------------------------------------------------------------------- the plan


def test_a_draft_plan_splits_the_peak_and_fits_the_default_budget(ui, tiny_sd15, shapes_dataset):
    text = yaml.safe_dump(job_data(tiny_sd15, shapes_dataset), sort_keys=False)
    r = ui.post("/api/plan", json={"yaml": text})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["ok"] and answer["cached"] is False
    assert answer["budget"] == {"bytes": 24 * GIB, "source": "default", "gpu": None,
                                "note": answer["budget"]["note"]}
    assert "no GPU information" in answer["budget"]["note"]
    plan = answer["plan"]
    step = plan["step"]
    parts = ("weights", "trainable", "optimizer", "gradients", "activations", "workspace")
    assert step["total"] == sum(step[k] for k in parts)
    assert 1 * MIB < plan["peak_device"] < 64 * MIB  # a tiny UNet: megabytes, not gigabytes
    assert plan["peak_device"] == max(plan["phases"].values()) >= step["total"]
    assert step["weights"] > 0 and step["trainable"] > 0 and step["activations"] > 0
    assert plan["peak_host"] > 0 and plan["fits"] is True and plan["gpu_memory"] == 24 * GIB
    assert plan["setup"]["bucket"] == "64x64" and plan["setup"]["batch"] == 2
    assert plan["not_counted"] and any("CUDA context" in line for line in plan["not_counted"])
    assert plan["suggestion"] is None and answer["suggested"] is None
    assert plan["one_line"].startswith("plan: ") and "fits in 24.0 GiB" in plan["one_line"]
    assert plan["job"] == "plan_me"  # the job's name, not a temporary file


def test_a_tight_budget_does_not_fit_and_the_suggestion_applied_fits(ui, tiny_sd15, shapes_dataset):
    data = job_data(tiny_sd15, shapes_dataset)
    answer = ui.post("/api/plan", json={"config": data, "gpu_memory": TIGHT}).json()
    assert answer["ok"], answer
    plan = answer["plan"]
    assert plan["fits"] is False and plan["gpu_memory"] == 4 * MIB and plan["peak_device"] > 4 * MIB
    assert answer["budget"]["source"] == "set"
    assert plan["suggestion"]["model.quantize"] is True and plan["suggestion"]["model.qtype"] == "qfloat8"
    assert plan["suggestion"]["train.gradient_checkpointing"] is True
    assert plan["suggestion_peak"] <= 4 * MIB
    assert yaml.safe_load(plan["suggestion_yaml"]) == {
        "model": {"quantize": True, "qtype": "qfloat8"}, "train": {"gradient_checkpointing": True}}
    # "Apply": the whole job with the suggestion merged, everything else kept
    suggested = answer["suggested"]
    assert suggested["problems"] == []
    process = yaml.safe_load(suggested["yaml"])["config"]["process"][0]
    assert process["model"] == {"name_or_path": str(tiny_sd15), "quantize": True, "qtype": "qfloat8"}
    assert process["train"]["gradient_checkpointing"] is True and process["train"]["lr"] == 1e-3
    assert process["network"] == {"type": "lora", "linear": 4, "linear_alpha": 4}
    assert suggested["config"]["config"]["process"][0]["model"]["qtype"] == "qfloat8"
    again = ui.post("/api/plan", json={"yaml": suggested["yaml"], "gpu_memory": TIGHT}).json()
    assert again["ok"] and again["plan"]["fits"] is True, again
    assert again["plan"]["peak_device"] == plan["suggestion_peak"]


def test_a_repeated_plan_comes_from_the_cache_per_job_and_budget(ui, tiny_sd15, shapes_dataset):
    body = {"config": job_data(tiny_sd15, shapes_dataset)}
    first = ui.post("/api/plan", json=body).json()
    started = time.monotonic()
    second = ui.post("/api/plan", json=body).json()
    assert time.monotonic() - started < 0.5
    assert first["cached"] is False and second["cached"] is True
    assert second["plan"] == first["plan"]
    # the same job sent as YAML text is the same job (both are keyed by the stored form of the YAML)
    as_yaml = ui.post("/api/plan", json={"yaml": yaml.safe_dump(body["config"], sort_keys=False)}).json()
    assert as_yaml["cached"] is True
    # another budget, or a changed job, is planned again
    assert ui.post("/api/plan", json={**body, "gpu_memory": "16GB"}).json()["cached"] is False
    changed = job_data(tiny_sd15, shapes_dataset)
    changed["config"]["process"][0]["train"]["batch_size"] = 1
    smaller = ui.post("/api/plan", json={"config": changed}).json()
    assert smaller["cached"] is False and smaller["plan"]["peak_device"] < first["plan"]["peak_device"]


# ----------------------------------------------------------------------------------- errors


def test_plan_errors_come_back_as_messages(ui, tiny_sd15, shapes_dataset, tmp_path):
    unknown = ui.post("/api/plan", json={"config": job_data("someone/unknown-model", shapes_dataset)})
    assert unknown.status_code == 200
    assert unknown.json()["ok"] is False and "someone/unknown-model" in unknown.json()["error"]
    missing = tmp_path / "no-such-model"
    r = ui.post("/api/plan", json={"config": job_data(missing, shapes_dataset)}).json()
    assert r["ok"] is False and str(missing) in r["error"] and "does not exist" in r["error"]
    broken = ui.post("/api/plan", json={"yaml": "config: [unclosed"}).json()
    assert broken["ok"] is False and broken["problems"]
    invalid = job_data(tiny_sd15, shapes_dataset)
    invalid["config"]["process"][0]["train"]["steps"] = -5
    r = ui.post("/api/plan", json={"config": invalid}).json()
    assert r["ok"] is False and any("train.steps" in p for p in r["problems"])
    bad_budget = ui.post("/api/plan", json={"config": job_data(tiny_sd15, shapes_dataset), "gpu_memory": "lots"})
    assert bad_budget.status_code == 400 and "gpu_memory" in bad_budget.json()["detail"]
    assert ui.post("/api/plan", json={"config": invalid, "gpu_memory": "0GB"}).status_code == 400
    bad_gpus = ui.post("/api/plan", json={"config": job_data(tiny_sd15, shapes_dataset), "gpu_ids": "first"})
    assert bad_gpus.status_code == 400 and "gpu_ids 'first'" in bad_gpus.json()["detail"]
    assert ui.get("/api/jobs/999/plan").status_code == 404


def test_a_failing_planner_is_a_message_not_a_server_error(ui, tiny_sd15, shapes_dataset, monkeypatch):
    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("fake tensors ran out of imagination")

    monkeypatch.setattr("aitk.plan.plan_job", broken)
    r = ui.post("/api/plan", json={"config": job_data(tiny_sd15, shapes_dataset)})
    assert r.status_code == 200
    assert r.json()["ok"] is False and "RuntimeError: fake tensors ran out of imagination" in r.json()["error"]
    monkeypatch.undo()
    # failures are not cached: once the cause is gone, the plan is made
    assert ui.post("/api/plan", json={"config": job_data(tiny_sd15, shapes_dataset)}).json()["ok"] is True


def test_the_server_keeps_answering_while_a_plan_runs(ui, tiny_sd15, shapes_dataset, monkeypatch):
    release = threading.Event()

    def slow(*_args: Any, **_kwargs: Any) -> None:
        release.wait(10)
        raise RuntimeError("released")

    monkeypatch.setattr("aitk.plan.plan_job", slow)
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(
        r=ui.post("/api/plan", json={"config": job_data(tiny_sd15, shapes_dataset)})))
    worker.start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        assert ui.get("/api/jobs").status_code == 200
        assert time.monotonic() - started < 2 and worker.is_alive()  # the plan is still running
    finally:
        release.set()
        worker.join(15)
    assert result["r"].json()["error"].endswith("Please report this with the job file")


# ----------------------------------------------------------------------------------- budget


def test_the_budget_is_the_jobs_gpu_when_the_server_reports_gpus(ui, tiny_sd15, shapes_dataset, monkeypatch):
    fake_nvml(monkeypatch, [80 * GIB, 16 * GIB])
    data = job_data(tiny_sd15, shapes_dataset)

    def budget(**extra: Any) -> dict[str, Any]:
        answer = ui.post("/api/plan", json={"config": data, **extra}).json()
        assert answer["ok"], answer
        assert answer["plan"]["gpu_memory"] == answer["budget"]["bytes"]
        return answer["budget"]

    assert budget(gpu_ids="1") == {"bytes": 16 * GIB, "source": "gpu", "note": None,
                                   "gpu": {"index": 1, "name": "GPU model 1", "memory_total": 16 * GIB}}
    assert budget(gpu_ids="")["gpu"]["index"] == 0  # not chosen: a single process trains on GPU 0
    assert budget(gpu_ids="0,1")["bytes"] == 16 * GIB  # one process per GPU: the smallest binds
    cpu = budget(gpu_ids="cpu")
    assert cpu["source"] == "default" and cpu["bytes"] == 24 * GIB and "CPU" in cpu["note"]
    gone = budget(gpu_ids="5")
    assert gone["source"] == "default" and "GPU 5 is not on this server" in gone["note"]
    assert budget(gpu_ids="1", gpu_memory="12GB") == {"bytes": 12 * GIB, "source": "set", "gpu": None, "note": None}
    # a stored job is planned on its own GPUs
    created = ui.post("/api/jobs", json={"config": data, "gpu_ids": "1"}).json()["job"]
    stored = ui.get(f"/api/jobs/{created['id']}/plan").json()
    assert stored["budget"]["bytes"] == 16 * GIB and stored["budget"]["gpu"]["index"] == 1
