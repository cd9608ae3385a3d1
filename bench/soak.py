"""A day of jobs: the UI's worker through N short tiny jobs (default 200) on this machine.

`aitk ui` (server and worker in one process, as users run it) on a free port with a token, in a
temporary home; jobs on the tiny SD 1.5 model (CPU, fp32) created through the API, one scenario
after the other, round robin:
  complete        a short job runs to the end
  stop            Stop while it trains: a checkpoint, state stopped
  kill_run        kill -9 of the job's process while it trains: the job becomes error, reason killed
  kill_worker     kill -9 of `aitk ui` while a job trains; started again, it adopts the job, which completes
  restart_server  `aitk ui` stopped (SIGINT) and started again while a job trains; the job completes
  delete_queued   a job queued behind a running one on the same GPU set is deleted before it starts
  two_at_once     two jobs on different GPU sets ("0" and "1") run side by side
Afterwards: no job stuck in running or stopping, every finished job's files verify (the final LoRA
loads with finite values, the newest checkpoint's manifest matches), the database agrees with each
run's status.json, and the time per job stays flat (the median of the last fifth over the first).

  .venv/bin/python bench/soak.py [--jobs 200] [--json out.json]
Prints a summary table (docs/reliability.md has the last one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

SCENARIOS = ("complete", "stop", "kill_run", "kill_worker", "restart_server", "delete_queued", "two_at_once")
ACTIVE = ("running", "stopping")
FINAL = ("completed", "stopped", "error", "idle")


class UI:
    """`aitk ui` as a subprocess, started and stopped (or killed) at will."""

    def __init__(self, root: Path, token: str) -> None:
        self.root, self.token = root, token
        self.port = self._free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = root / "ui.log"

    @staticmethod
    def _free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def start(self) -> None:
        env = dict(os.environ, AI_TOOLKIT_AUTH=self.token, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                   AITK_UI_STOP_GRACE_S="60")
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "aitk", "ui", "--host", "127.0.0.1", "--port", str(self.port),
                 "--home", str(self.root / "home"), "--training-folder", str(self.root / "output"),
                 "--datasets-folder", str(self.root / "datasets")],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/login", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"`aitk ui` did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self, kill: bool) -> None:
        assert self.process is not None
        if kill:
            self.process.kill()  # SIGKILL: the worker thread dies with it; jobs live on in their sessions
        else:
            self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=60)
        self.process = None

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"Authorization": f"Bearer {self.token}"},
                             timeout=30, **kwargs)


class Soak:
    def __init__(self, root: Path, model: Path, data: Path) -> None:
        self.root, self.model, self.data = root, model, data
        self.ui = UI(root, "soak-" + secrets.token_hex(12))
        self.created: list[dict[str, Any]] = []  # name, id, scenario, started, ended
        self.deleted: set[str] = set()  # names: SQLite may give a deleted row's id to the next job
        self.count = 0

    # ---------------------------------------------------------------- jobs
    def create(self, scenario: str, steps: int, gpu_ids: str = "") -> int:
        self.count += 1
        name = f"soak_{self.count:04d}_{scenario}"
        from conftest import base_process

        process = base_process(self.model, self.data, self.root / "ignored")
        process["train"] |= {"steps": steps, "batch_size": 1, "skip_first_sample": True}
        process["save"] |= {"save_every": 5, "max_step_saves_to_keep": 2}
        job = {"job": "extension", "config": {"name": name, "process": [process]}}
        body: dict[str, Any] = {"config": job, "start": True}
        if gpu_ids:
            body["gpu_ids"] = gpu_ids
        created = self.ui.api("POST", "/api/jobs", json=body)
        assert created.status_code == 201, created.text
        job_id = created.json()["job"]["id"]
        self.created.append({"name": name, "id": job_id, "scenario": scenario, "started": time.monotonic(),
                             "ended": None})
        return job_id

    def job(self, job_id: int) -> dict[str, Any]:
        return self.ui.api("GET", f"/api/jobs/{job_id}").json()["job"]

    def wait(self, job_id: int, predicate: Any, what: str, timeout: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = self.job(job_id)
            except httpx.HTTPError:
                time.sleep(0.3)  # the server is restarting
                continue
            if predicate(state):
                return state
            time.sleep(0.2)
        raise SystemExit(f"job {job_id}: timed out waiting for {what}: {self.job(job_id)}")

    def finished(self, job_id: int) -> dict[str, Any]:
        state = self.wait(job_id, lambda j: j["status"] in FINAL and j["status"] != "idle", "the end")
        for entry in self.created:
            if entry["id"] == job_id:
                entry["ended"] = time.monotonic()
        return state

    def training(self, job_id: int) -> dict[str, Any]:
        return self.wait(job_id, lambda j: j["status"] == "running" and (j["step"] or 0) >= 1, "a step")

    # ---------------------------------------------------------------- scenarios
    def complete(self) -> None:
        self.finished(self.create("complete", 6))

    def stop(self) -> None:
        job_id = self.create("stop", 400)
        self.training(job_id)
        assert self.ui.api("POST", f"/api/jobs/{job_id}/stop").status_code == 200
        self.finished(job_id)

    def kill_run(self) -> None:
        job_id = self.create("kill_run", 400)
        pid = self.training(job_id)["pid"]
        os.kill(pid, signal.SIGKILL)
        self.finished(job_id)

    def kill_worker(self) -> None:
        job_id = self.create("kill_worker", 40)
        self.training(job_id)
        self.ui.stop(kill=True)
        self.ui.start()
        self.finished(job_id)

    def restart_server(self) -> None:
        job_id = self.create("restart_server", 40)
        self.training(job_id)
        self.ui.stop(kill=False)
        self.ui.start()
        self.finished(job_id)

    def delete_queued(self) -> None:
        first = self.create("delete_queued", 30)
        second = self.create("delete_queued", 6)  # same (default) GPU set: waits behind the first
        self.training(first)
        queued = self.job(second)
        assert queued["status"] == "queued", queued
        deleted = self.ui.api("DELETE", f"/api/jobs/{second}", params={"delete_files": "true"})
        assert deleted.status_code == 200, deleted.text
        self.deleted.update(e["name"] for e in self.created if e["id"] == second)
        self.created = [e for e in self.created if e["id"] != second]
        self.finished(first)

    def two_at_once(self) -> None:
        a = self.create("two_at_once", 20, gpu_ids="0")
        b = self.create("two_at_once", 20, gpu_ids="1")
        self.wait(a, lambda j: j["status"] == "running", "side by side")
        self.wait(b, lambda j: j["status"] == "running" or j["status"] in FINAL, "side by side")
        self.finished(a)
        self.finished(b)

    # ---------------------------------------------------------------- checks
    def check(self) -> dict[str, Any]:
        from safetensors.torch import load_file

        from aitk.trainer.checkpoint import list_checkpoints, verify_checkpoint

        jobs = {j["id"]: j for j in self.ui.api("GET", "/api/jobs").json()["jobs"]}
        stuck = [j["name"] for j in jobs.values() if j["status"] in ACTIVE + ("queued",)]
        lost, disagree, failed, outcomes = [], [], [], Counter()
        for entry in self.created:
            job = jobs.get(entry["id"])
            if job is None:
                lost.append(f"{entry['name']}: gone from the database")
                continue
            outcomes[(entry["scenario"], job["status"], job.get("reason"))] += 1
            if job["status"] == "error" and entry["scenario"] != "kill_run":
                failed.append(f"{entry['name']}: {job.get('reason')}: {job.get('message')}")
            run = self.root / "output" / entry["name"]
            try:
                status = json.loads((run / "status.json").read_text())
            except (OSError, ValueError):
                status = None
            expected = {"completed": "completed", "stopped": "stopped"}.get(job["status"])
            if expected is not None and (status is None or status["state"] != expected or status["step"] != job["step"]):
                disagree.append(f"{entry['name']}: database {job['status']} step {job['step']}, status.json "
                                f"{status and (status['state'], status['step'])}")
            if job["status"] == "error" and job.get("reason") != "killed" and (status or {}).get("state") != "error":
                disagree.append(f"{entry['name']}: error ({job.get('reason')}) but status.json says {status}")
            found = list_checkpoints(run / "checkpoints")
            if job["status"] in ("completed", "stopped") and not found:
                lost.append(f"{entry['name']}: no checkpoint")
            if found and verify_checkpoint(found[0].path) is not None:
                complete = [c for c in found if verify_checkpoint(c.path) is None]
                if job["status"] != "error" or not complete:
                    lost.append(f"{entry['name']}: checkpoint {found[0].path.name}: {verify_checkpoint(found[0].path)}")
            if job["status"] == "completed":
                final = run / f"{entry['name']}.safetensors"
                tensors = load_file(final) if final.is_file() else {}
                if not tensors or not all(bool(t.isfinite().all()) for t in tensors.values()):
                    lost.append(f"{entry['name']}: final LoRA missing or not finite")
        names = {j["name"] for j in jobs.values()}
        for name in self.deleted:
            if name in names or (self.root / "output" / name).exists():
                lost.append(f"deleted job {name} is still in the database or on disk")
        return {"stuck": stuck, "lost": lost, "disagree": disagree, "failed": failed, "outcomes": outcomes}

    def timing(self) -> dict[str, float]:
        """Seconds per job of the `complete` scenario: first fifth vs last fifth (medians)."""
        times = [e["ended"] - e["started"] for e in self.created if e["scenario"] == "complete" and e["ended"]]
        times = times or [e["ended"] - e["started"] for e in self.created if e["ended"]]  # --only without complete
        fifth = max(1, len(times) // 5)
        first, last = statistics.median(times[:fifth]), statistics.median(times[-fifth:])
        return {"complete_jobs": len(times), "first_median_s": first, "last_median_s": last,
                "growth": last / first if first else math.nan}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs to run (default 200)")
    parser.add_argument("--json", type=Path, help="write the summary here too")
    parser.add_argument("--only", choices=SCENARIOS, action="append", help="run only these scenarios")
    args = parser.parse_args()
    from aitk.demo import draw_dataset
    from aitk.models.sd import build_tiny_sd15

    with tempfile.TemporaryDirectory(prefix="aitk-soak-") as tmp:
        root = Path(tmp)
        model = build_tiny_sd15(root / "tiny-sd15")
        data = root / "datasets" / "shapes"
        draw_dataset(data)
        soak = Soak(root, model, data)
        soak.ui.start()
        started = time.monotonic()
        per_scenario: dict[str, list[float]] = defaultdict(list)
        try:
            turn = 0
            while soak.count < args.jobs:
                chosen = tuple(args.only or SCENARIOS)
                scenario = chosen[turn % len(chosen)]
                turn += 1
                t0 = time.monotonic()
                getattr(soak, scenario)()
                per_scenario[scenario].append(time.monotonic() - t0)
                if turn % len(chosen) == 0:
                    print(f"{soak.count} jobs, {time.monotonic() - started:.0f} s", flush=True)
            result = soak.check()
            timing = soak.timing()
        finally:
            if soak.ui.process is not None:
                soak.ui.stop(kill=False)
        wall = time.monotonic() - started
    print(f"\nsoak: {soak.count} jobs in {wall / 60:.1f} min on {os.cpu_count()} CPU cores")
    print("| scenario | rounds | s per round (median) | outcomes (database status, reason) |")
    print("|---|---|---|---|")
    for scenario in SCENARIOS:
        seen = ", ".join(f"{status}{f' ({reason})' if reason else ''} x{n}"
                         for (s, status, reason), n in sorted(result["outcomes"].items()) if s == scenario)
        times = per_scenario.get(scenario, [])
        print(f"| {scenario} | {len(times)} | {statistics.median(times) if times else math.nan:.1f} | {seen} |")
    print(f"stuck (running / stopping / queued): {len(result['stuck'])}; lost files: {len(result['lost'])}; "
          f"database / status.json disagreements: {len(result['disagree'])}; unexpected failures: "
          f"{len(result['failed'])}")
    print(f"time per completing job: {timing['first_median_s']:.2f} s (first fifth), {timing['last_median_s']:.2f} s "
          f"(last fifth), ratio {timing['growth']:.2f}")
    for line in result["stuck"] + result["lost"] + result["disagree"] + result["failed"]:
        print("  problem:", line)
    if args.json:
        args.json.write_text(json.dumps({"jobs": soak.count, "wall_s": wall, **timing,
                                         "stuck": result["stuck"], "lost": result["lost"],
                                         "disagree": result["disagree"], "failed": result["failed"]}, indent=1))
    return 0 if not (result["stuck"] or result["lost"] or result["disagree"] or result["failed"]) else 1


if __name__ == "__main__":
    sys.exit(main())
