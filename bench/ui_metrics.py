"""Benchmark: the UI's metrics endpoint on a 1,000,000-line metrics file (target: under 200 ms).

Writes a WAN 2.2-like metrics file (two experts, alpha schedule fields, every field the trainer
writes), serves it through the real app on 127.0.0.1 (uvicorn, real HTTP), and times:
- the first request on the unread file (answers within the read budget, `complete: false`, while
  the rest is indexed in the background), and how long the background read takes;
- warm requests: every chart field per expert at 1000 points, and the loss alone;
- an incremental request (`since_step`) after the run appended lines.

Run: .venv/bin/python bench/ui_metrics.py [--lines N] [--keep FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_S = 0.2


def write_metrics(path: Path, start: int, stop: int) -> None:
    rng = random.Random(start)
    with open(path, "a") as handle:
        for step in range(start, stop):
            expert = "high_noise" if (step // 100) % 2 == 0 else "low_noise"
            phase_idx = 0 if step < 400_000 else (1 if step < 700_000 else 2)
            loss = 0.12 + 0.08 * math.exp(-step / 200_000) + rng.gauss(0, 0.03)
            record = {
                "step": step, "timestamp": "2026-05-01T12:00:00.000+00:00", "loss": loss,
                "grad_norm": abs(rng.gauss(0.2, 0.05)), "step_time_s": 1.9 + rng.random() * 0.2,
                "samples_per_s": 0.5, "gradient_stability": 0.5 + rng.gauss(0, 0.05),
                "gradient_stability_avg": 0.52, "expert": expert, "learning_rate": 1e-4, "lr_0": 1e-4,
                "lr_1": 1e-4, "alpha_enabled": True, "phase": ("foundation", "balance", "emphasis")[phase_idx],
                "phase_idx": phase_idx, "steps_in_phase": step % 1000, "conv_alpha": None,
                "linear_alpha": (16.0, 24.0, 32.0)[phase_idx], "loss_slope": -1e-5, "loss_r2": 0.02,
                "loss_cv": 0.3, "loss_samples": 200,
            }
            handle.write(json.dumps(record) + "\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(client: httpx.Client, url: str, params: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    response = client.get(url, params=params)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed, response.json()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--keep", help="reuse / keep the metrics file here (it is ~0.5 GB)")
    args = parser.parse_args()

    import uvicorn

    from aitk.ui.server import create_app
    from aitk.ui.settings import UISettings

    with tempfile.TemporaryDirectory(prefix="aitk-bench-ui-") as tmp:
        root = Path(tmp)
        settings = UISettings.from_env({}, home=root / "home", training_folder=root / "out", datasets_folder=root / "data")
        app = create_app(settings)
        job = app.state.ctx.store.add_job(name="bench", config_yaml="job: extension\n",
                                          training_folder=str(settings.training_folder))
        run = settings.training_folder / "bench"
        run.mkdir(parents=True)
        metrics = run / "metrics_bench.jsonl"
        source = Path(args.keep) if args.keep else None
        started = time.perf_counter()
        if source is not None and source.is_file() and sum(1 for _ in open(source, "rb")) == args.lines:
            metrics.symlink_to(source.resolve())
            print(f"reusing {source}")
        else:
            write_metrics(source or metrics, 0, args.lines)
            if source is not None:
                metrics.symlink_to(source.resolve())
            print(f"wrote {args.lines:,} lines ({metrics.stat().st_size / 1e6:.0f} MB) in "
                  f"{time.perf_counter() - started:.1f} s")

        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/api/jobs/{job.id}/metrics"
        results: dict[str, float] = {}
        with httpx.Client(timeout=60) as client:
            # the server's own first request (connection, thread pool) is not the metrics endpoint's cost
            warm_up, _ = timed(client, f"http://127.0.0.1:{port}/api/jobs", {})
            print(f"first request to the server (GET /api/jobs): {warm_up * 1000:.0f} ms")
            cold, answer = timed(client, url, {"points": 1000})
            results["first request (file not read yet)"] = cold
            print(f"first request: {cold * 1000:.0f} ms, complete={answer['complete']}, "
                  f"{answer['rows']:,} lines indexed so far")
            started = time.perf_counter()
            while not answer["complete"] or answer["rows"] < args.lines:
                time.sleep(0.5)
                _, answer = timed(client, url, {"fields": "loss", "points": 10})
            print(f"background indexing finished {time.perf_counter() - started + cold:.1f} s after the first "
                  f"request ({answer['rows']:,} lines)")
            for label, params in [
                ("all chart fields x (all + 2 experts), 1000 points", {"points": 1000}),
                ("loss x (all + 2 experts), 1000 points", {"fields": "loss", "points": 1000}),
                ("loss, zoomed to steps 250,000-750,000", {"fields": "loss", "points": 1000,
                                                             "step_min": 250_000, "step_max": 750_000}),
            ]:
                times = [timed(client, url, params)[0] for _ in range(15)]
                results[label] = statistics.median(times)
                print(f"{label}: median {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms")
            size = metrics.stat().st_size
            write_metrics(metrics.resolve(), args.lines, args.lines + 20)
            try:
                elapsed, tail = timed(client, url, {"since_step": args.lines - 1, "points": 1000})
            finally:
                os.truncate(metrics.resolve(), size)  # a kept file stays as it was
            results["since_step after 20 new lines"] = elapsed
            rows = next(s for s in tail["series"] if s["field"] == "loss" and s["expert"] is None)
            print(f"since_step after 20 appended lines: {elapsed * 1000:.1f} ms ({len(rows['step'])} new points)")
        server.should_exit = True
        thread.join(timeout=10)
    worst = max(results.values())
    verdict = "PASS" if worst < TARGET_S else "FAIL"
    print(f"{verdict}: slowest answer {worst * 1000:.0f} ms (target {TARGET_S * 1000:.0f} ms)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
