"""The UI's worker with real tiny jobs (`aitk run` processes on the tiny SD 1.5 model, CPU): queued
jobs run in order, a killed worker's job is reconciled instead of stuck, Stop leaves a complete
checkpoint, save-now and sample-now reach the running job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest
from fastapi.testclient import TestClient

from aitk.trainer.checkpoint import list_checkpoints, verify_checkpoint
from aitk.ui.server import create_app
from aitk.ui.settings import UISettings
from aitk.ui.store import COMPLETED, ERROR, RUNNING, STOPPED, Store
from aitk.ui.worker import Worker, WorkerLock
from conftest import base_process, deep_update

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # real `aitk run` processes (the last test is instant)


def wait_for(predicate: Callable[[], Any], timeout: float = 180.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def ui(tmp_path: Path, tiny_sd15: Path, shapes_dataset: Path):
    settings = replace(
        UISettings.from_env({}, home=tmp_path / "home", training_folder=tmp_path / "out", datasets_folder=tmp_path / "data"),
        poll_interval_s=0.2, stop_grace_s=120.0, job_cwd=REPO,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        client.settings = settings
        client.store = app.state.ctx.store

        def make(name: str, start: bool = True, **changes: Any) -> int:
            process = deep_update(base_process(tiny_sd15, shapes_dataset, tmp_path / "ignored"), changes)
            job = {"job": "extension", "config": {"name": name, "process": [process]}}
            r = client.post("/api/jobs", json={"config": job, "start": start})
            assert r.status_code == 201, r.text
            return r.json()["job"]["id"]

        client.make = make
        yield client


class WorkerInThread:
    def __init__(self, store: Store, settings: UISettings) -> None:
        self.worker = Worker(store, settings, log=lambda message: None)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)

    def __enter__(self) -> Worker:
        self.thread.start()
        return self.worker

    def __exit__(self, *exc: Any) -> None:
        self.worker.stop_event.set()
        self.thread.join(timeout=30)


def job(ui: TestClient, job_id: int) -> dict[str, Any]:
    return ui.get(f"/api/jobs/{job_id}").json()["job"]


def start_worker_process(settings: UISettings) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "aitk", "worker", "--home", str(settings.home),
         "--training-folder", str(settings.training_folder), "--datasets-folder", str(settings.datasets_folder)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def test_two_queued_jobs_complete_in_order(ui):
    first = ui.make("first", train={"steps": 6})
    second = ui.make("second", train={"steps": 6})
    assert [job(ui, i)["status"] for i in (first, second)] == ["queued", "queued"]
    with WorkerInThread(ui.store, ui.settings):
        wait_for(lambda: job(ui, second)["status"] in (COMPLETED, ERROR), what="both jobs")
    a, b = job(ui, first), job(ui, second)
    assert (a["status"], b["status"]) == (COMPLETED, COMPLETED), (a["error"], b["error"])
    assert a["finished_at"] <= b["started_at"]  # one CPU job at a time, in queue order
    assert a["step"] == a["total_steps"] == 6 and a["exit_code"] == 0
    for name in ("first", "second"):
        run = ui.settings.training_folder / name
        assert (run / f"{name}.safetensors").is_file()
        assert json.loads((run / "status.json").read_text())["state"] == "completed"
    detail = ui.get(f"/api/jobs/{second}").json()
    assert detail["lora_files"] and detail["checkpoints"][0]["complete"]
    metrics = ui.get(f"/api/jobs/{second}/metrics", params={"fields": "loss"}).json()
    assert metrics["last_step"] == 5 and len(metrics["series"][0]["step"]) == 6


def test_a_killed_worker_leaves_the_job_running_and_the_next_one_reconciles_it(ui):
    job_id = ui.make("survivor", train={"steps": 60})
    worker = start_worker_process(ui.settings)
    try:
        running = wait_for(lambda: (j := job(ui, job_id))["status"] == RUNNING and j["pid"] and j["step"] >= 1 and j,
                           what="the job to train")
    finally:
        worker.send_signal(signal.SIGKILL)  # a crash: no clean-up of any kind
        worker.wait(timeout=30)
    pid = running["pid"]
    assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    assert job(ui, job_id)["status"] == RUNNING  # the store still says running: nobody settled it
    # The next worker adopts the live process (or settles it from status.json if it already ended).
    lock = WorkerLock(ui.settings.home)
    assert lock.acquire()  # the dead worker's lock is free again
    lock.release()
    with WorkerInThread(ui.store, ui.settings):
        final = wait_for(lambda: (j := job(ui, job_id))["status"] != RUNNING and j, what="reconciliation")
    assert final["status"] == COMPLETED and final["step"] == 60, final["error"]
    assert final["pid"] is None


def test_a_job_whose_process_died_with_the_worker_becomes_error_with_its_last_lines(ui):
    job_id = ui.make("victim", train={"steps": 400})
    worker = start_worker_process(ui.settings)
    try:
        running = wait_for(lambda: (j := job(ui, job_id))["status"] == RUNNING and j["step"] >= 1 and j,
                           what="the job to train")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    os.killpg(os.getpgid(running["pid"]), signal.SIGKILL)  # the machine went down with both
    wait_for(lambda: not psutil.pid_exists(running["pid"]) or psutil.Process(running["pid"]).status()
             == psutil.STATUS_ZOMBIE, what="the job to die")
    Worker(ui.store, ui.settings, log=lambda m: None).reconcile()
    final = job(ui, job_id)
    assert final["status"] == ERROR
    assert "gone without a final state" in final["error"]
    assert "aitk run" in final["error"] or "step" in final["error"]  # the last lines of its output
    assert final["reason"] == "killed" and "resumes from the last complete checkpoint" in final["fix"]


def test_reconcile_trusts_the_runs_own_final_state(ui, tmp_path):
    """A job marked running whose process is gone but whose status.json says stopped (it stopped
    cleanly while no worker watched) becomes stopped, not error."""
    job_id = ui.make("quiet", start=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = ui.settings.training_folder / "quiet"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "stopped", "step": 3, "total_steps": 10, "pid": dead.pid}))
    ui.store.update_job(job_id, status=RUNNING, pid=dead.pid, pid_started=None)
    Worker(ui.store, ui.settings, log=lambda m: None).reconcile()
    final = job(ui, job_id)
    assert final["status"] == STOPPED and final["step"] == 3 and final["error"] is None


def test_stop_leaves_a_complete_checkpoint(ui):
    job_id = ui.make("stopper", train={"steps": 2000}, save={"save_every": 1000})
    with WorkerInThread(ui.store, ui.settings):
        wait_for(lambda: job(ui, job_id)["step"] >= 2, what="the job to train")
        assert ui.post(f"/api/jobs/{job_id}/stop").json()["job"]["status"] == "stopping"
        final = wait_for(lambda: (j := job(ui, job_id))["status"] not in (RUNNING, "stopping") and j, what="the stop")
    assert final["status"] == STOPPED and final["exit_code"] == 130, final["error"]
    run = ui.settings.training_folder / "stopper"
    checkpoints = list_checkpoints(run / "checkpoints")
    assert checkpoints and checkpoints[0].step == final["step"] >= 2
    assert verify_checkpoint(checkpoints[0].path) is None
    state = json.loads((checkpoints[0].path / "trainer_state.json").read_text())
    assert state["step"] == final["step"]
    assert json.loads((run / "status.json").read_text())["state"] == "stopped"
    # started again, it resumes from that checkpoint
    assert ui.post(f"/api/jobs/{job_id}/start").json()["job"]["status"] == "queued"


def test_save_now_and_sample_now_reach_the_running_job(ui):
    job_id = ui.make("asker", train={"steps": 2000, "skip_first_sample": True}, save={"save_every": 1000},
                     sample={"sample_every": 1000, "width": 64, "height": 64, "sample_steps": 1, "prompts": ["a red circle"]})
    run = ui.settings.training_folder / "asker"
    with WorkerInThread(ui.store, ui.settings):
        wait_for(lambda: job(ui, job_id)["step"] >= 1, what="the job to train")
        assert ui.post(f"/api/jobs/{job_id}/save-now").status_code == 200
        saved = wait_for(lambda: list_checkpoints(run / "checkpoints"), what="the save-now checkpoint")
        assert verify_checkpoint(saved[0].path) is None and 1 <= saved[0].step < 1000
        assert ui.post(f"/api/jobs/{job_id}/sample-now").status_code == 200
        wait_for(lambda: ui.get(f"/api/jobs/{job_id}/samples").json()["samples"], what="the sample-now preview")
        assert not (run / "control" / "save_now").exists()  # the run took the request
        ui.post(f"/api/jobs/{job_id}/stop")
        wait_for(lambda: job(ui, job_id)["status"] == STOPPED, what="the stop")
    samples = ui.get(f"/api/jobs/{job_id}/samples").json()["samples"]
    assert 1 <= samples[0]["step"] < 1000 and samples[0]["files"][0]["kind"] == "image"
    image = ui.get(f"/api/jobs/{job_id}/files/{samples[0]['files'][0]['path']}")
    assert image.status_code == 200 and image.content[:3] == b"\xff\xd8\xff"


def test_gpu_sets_decide_what_runs_side_by_side():
    from aitk.ui.worker import gpu_set, overlap, visible_devices

    assert not overlap(gpu_set("0"), gpu_set("1")) and overlap(gpu_set("0,1"), gpu_set("1"))
    assert overlap(gpu_set("cpu"), gpu_set("cpu")) and not overlap(gpu_set("cpu"), gpu_set("0"))
    assert overlap(gpu_set(""), gpu_set("0")) and overlap(gpu_set(""), gpu_set("cpu"))
    assert visible_devices("0,1") == "0,1" and visible_devices("cpu") == "" and visible_devices("") is None


def test_a_run_that_ignores_the_stop_is_killed_after_the_grace_period(ui):
    """SIGINT first; only after stop_grace_s the whole process group is killed."""
    job_id = ui.make("stubborn", start=False)
    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('up', flush=True); time.sleep(120)"
    stubborn = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert stubborn.stdout.readline().strip() == "up"  # its SIGINT handler is in place
        started = psutil.Process(stubborn.pid).create_time()
        ui.store.update_job(job_id, status=RUNNING, pid=stubborn.pid, pid_started=started)
        assert ui.post(f"/api/jobs/{job_id}/stop").json()["job"]["status"] == "stopping"
        worker = Worker(ui.store, replace(ui.settings, stop_grace_s=1.0), log=lambda m: None)
        worker.tick()
        signalled = job(ui, job_id)
        assert signalled["status"] == "stopping" and stubborn.poll() is None  # SIGINT ignored: still there
        time.sleep(1.2)
        worker.tick()  # past the grace period: SIGKILL
        assert stubborn.wait(timeout=10) == -signal.SIGKILL
        worker.tick()
        final = job(ui, job_id)
        assert final["status"] == STOPPED and "killed" in final["info"]
    finally:
        if stubborn.poll() is None:
            stubborn.kill()
            stubborn.wait()


def test_failed_runs_show_their_reason_message_and_fix(ui, monkeypatch):
    """Out of memory inside a step (injected: AITK_FAULT reaches the worker's `aitk run`), a dataset
    folder that is not there, and a run killed with SIGKILL: each job ends in error with the
    reason, a message, a fix and the reason's exit code; the run's checkpoint stays complete."""
    # (a job file that is not valid never gets here: the API refuses it, test_ui_api.py)
    monkeypatch.setenv("AITK_FAULT", "oom@3")
    oom = ui.make("oom", train={"steps": 10}, save={"save_every": 2})
    refused = ui.make("nodata", datasets=[{"folder_path": str(ui.settings.datasets_folder / "gone"),
                                           "resolution": [64]}])
    with WorkerInThread(ui.store, ui.settings):
        wait_for(lambda: job(ui, refused)["status"] in (COMPLETED, ERROR), what="both jobs")
    first = job(ui, oom)
    assert (first["status"], first["reason"], first["exit_code"]) == (ERROR, "oom", 6), first
    assert "out of memory in the training step at step 3" in first["message"] and "batch_size" in first["fix"]
    checkpoints = list_checkpoints(ui.settings.training_folder / "oom" / "checkpoints")
    assert checkpoints[0].step == 2 and verify_checkpoint(checkpoints[0].path) is None
    second = job(ui, refused)
    assert (second["status"], second["reason"], second["exit_code"]) == (ERROR, "data", 3), second
    assert "gone" in second["message"] and "dataset" in second["fix"]
    listed = {j["id"]: j for j in ui.get("/api/jobs").json()["jobs"]}
    assert listed[oom]["reason"] == "oom" and listed[oom]["fix"] == first["fix"]

    monkeypatch.delenv("AITK_FAULT")
    victim = ui.make("victim9", train={"steps": 400})
    with WorkerInThread(ui.store, ui.settings):
        running = wait_for(lambda: (j := job(ui, victim))["status"] == RUNNING and j["step"] >= 1 and j,
                           what="the job to train")
        os.kill(running["pid"], signal.SIGKILL)
        wait_for(lambda: job(ui, victim)["status"] == ERROR, what="the worker to see it")
    killed = job(ui, victim)
    assert killed["reason"] == "killed" and killed["exit_code"] == -signal.SIGKILL and "SIGKILL" in killed["message"]
