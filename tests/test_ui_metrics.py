"""The UI's metrics API: downsampling keeps extremes and per-expert series, since_step returns only
new lines, the index follows a growing / rewritten file, and the HTTP route answers the same."""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest

from aitk.ui.metrics_index import ALL, BLOCK, MetricsIndex, MetricsRegistry
from aitk.ui.metrics_query import bucket_range, lines, query

EXPERTS = ("high_noise", "low_noise")


def make_lines(start: int, stop: int, *, experts: bool = True, seed: int = 0) -> list[dict]:
    """WAN 2.2-like metrics: experts alternate every 100 steps, each with its own phase; a few
    spikes; null stability on the first step; phases change at known steps."""
    rng = random.Random(seed + start)
    out = []
    for step in range(start, stop):
        expert = EXPERTS[(step // 100) % 2] if experts else None
        loss = 0.2 + 0.1 * math.exp(-step / 3000) + rng.gauss(0, 0.01)
        if step % 7919 == 123:
            loss = 5.0 + step / 1e6  # a spike: must survive downsampling
        if step % 6007 == 321:
            loss = -1.0 - step / 1e6  # a dip
        if expert == "high_noise":
            phase, idx = ("foundation", 0) if step < 4000 else ("balance", 1)
        else:
            phase, idx = ("foundation", 0) if step < 6000 else ("balance", 1)
        out.append({
            "step": step, "timestamp": "2026-01-01T00:00:00+00:00", "loss": loss,
            "gradient_stability": None if step == 0 else 0.5 + rng.gauss(0, 0.05),
            "learning_rate": 1e-4, "expert": expert, "alpha_enabled": True,
            "phase": phase, "phase_idx": idx, "linear_alpha": 16.0 if idx == 0 else 24.0,
        })
    return out


def write(path: Path, records: list[dict], mode: str = "w") -> None:
    with open(path, mode) as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def series(answer: dict, field: str, expert: str | None) -> dict:
    return next(s for s in answer["series"] if s["field"] == field and s["expert"] == expert)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    path = tmp_path_factory.mktemp("metrics") / "metrics_run.jsonl"
    records = make_lines(0, 20000)
    write(path, records)
    return path, records


def test_downsampling_keeps_extremes_per_expert(big):
    path, records = big
    index = MetricsIndex(path)
    assert index.refresh()
    answer = query(index.snapshot(["loss"]), ["loss"], points=200)
    assert answer["experts"] == list(EXPERTS) and answer["rows"] == len(records)
    for expert in (None, *EXPERTS):
        truth = {r["step"]: r["loss"] for r in records if expert is None or r["expert"] == expert}
        s = series(answer, "loss", expert)
        assert len(s["step"]) <= 200 and s["count"] == len(truth)
        assert s["step"] == sorted(s["step"])
        for step, value in zip(s["step"], s["value"]):
            assert truth[step] == value  # real points of this series, never averages
        # every spike and dip of this series is kept, and so are its global extremes
        spikes = [st for st, v in truth.items() if v > 4 or v < 0]
        assert spikes and set(spikes) <= set(s["step"])
        assert min(truth.values()) in s["value"] and max(truth.values()) in s["value"]


def test_block_statistics_match_brute_force(big):
    path, records = big
    index = MetricsIndex(path)
    index.refresh()
    snap = index.snapshot(["loss", "gradient_stability"])
    for field in ("loss", "gradient_stability"):
        for code, expert in [(ALL, None), (0, "high_noise"), (1, "low_noise")]:
            values = np.array([np.nan if r[field] is None else r[field] for r in records
                               if expert is None or r["expert"] == expert])
            n, nbuckets = len(values), 37
            got = bucket_range(snap, field, code, 0, n, nbuckets)
            per = -(-(-(-n // nbuckets)) // BLOCK)  # bucket size rounded up to whole blocks
            full = (n // BLOCK) * BLOCK
            edges = list(range(0, full, per * BLOCK)) + [full] + ([n] if n > full else [])
            lows, highs, means = [], [], []
            for lo, hi in zip(edges[:-1], edges[1:]):
                chunk = values[lo:hi]
                lows.append(np.nanmin(chunk))
                highs.append(np.nanmax(chunk))
                means.append(np.nanmean(chunk))
            assert got.low.tolist() == lows and got.high.tolist() == highs
            assert np.allclose(got.total / got.count, means, rtol=1e-12)
            assert np.array_equal(values[got.low_at], got.low) and np.array_equal(values[got.high_at], got.high)


def test_trend_follows_a_linear_series(tmp_path):
    path = tmp_path / "m.jsonl"
    write(path, [{"step": s, "loss": s * 0.001, "expert": None} for s in range(10000)])
    index = MetricsIndex(path)
    index.refresh()
    s = series(query(index.snapshot(["loss"]), ["loss"], points=300, trend_points=40), "loss", None)
    trend = s["trend"]
    assert 30 <= len(trend["step"]) <= 40
    assert trend["value"] == sorted(trend["value"])
    for step, value in zip(trend["step"], trend["value"]):
        assert abs(value - step * 0.001) <= 0.001  # a bucket's mean sits at its centre


def test_since_step_returns_only_new_lines_and_follows_the_file(tmp_path):
    path = tmp_path / "metrics_run.jsonl"
    write(path, make_lines(0, 1000))
    index = MetricsIndex(path)
    index.refresh()
    first = query(index.snapshot(["loss"]), ["loss"], points=100)
    assert first["last_step"] == 999
    # the run appends 100 steps and is in the middle of writing the next line
    write(path, make_lines(1000, 1100), mode="a")
    with open(path, "a") as handle:
        handle.write('{"step": 1100, "loss": 0.3')
    assert index.refresh()
    new = query(index.snapshot(["loss"]), ["loss"], points=1000, since_step=999)
    assert series(new, "loss", None)["step"] == list(range(1000, 1100))
    high = series(new, "loss", "high_noise")["step"]
    assert high == [s for s in range(1000, 1100) if (s // 100) % 2 == 0]
    assert new["last_step"] == 1099
    assert [line["step"] for line in lines(index.snapshot([]), 1089, 50)] == list(range(1090, 1100))
    with open(path, "a") as handle:
        handle.write(', "expert": "low_noise"}\n')
    index.refresh()
    newest = query(index.snapshot(["loss"]), ["loss"], since_step=1099)
    assert series(newest, "loss", None)["step"] == [1100]
    assert newest["latest"]["low_noise"]["step"] == 1100 and newest["latest"]["all"]["step"] == 1100
    # nothing new: empty series, same last step
    again = query(index.snapshot(["loss"]), ["loss"], since_step=1100)
    assert series(again, "loss", None)["step"] == []


def test_a_rewritten_file_is_read_again(tmp_path):
    """A resumed run drops the lines after its checkpoint (atomic rewrite, new inode) and a fresh
    run empties the file in place; the index must not keep the dropped lines."""
    path = tmp_path / "m.jsonl"
    write(path, make_lines(0, 500))
    index = MetricsIndex(path)
    index.refresh()
    tmp = tmp_path / "m.tmp"
    write(tmp, make_lines(0, 300))
    os.replace(tmp, path)
    index.refresh()
    assert query(index.snapshot(["loss"]), ["loss"])["last_step"] == 299
    path.write_text("")
    write(path, make_lines(0, 10, experts=False))
    index.refresh()
    answer = query(index.snapshot(["loss"]), ["loss"])
    assert answer["rows"] == 10 and answer["experts"] == []


def test_transitions_nulls_and_damaged_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    records = make_lines(0, 8000)
    write(path, records[:5000])
    with open(path, "a") as handle:
        handle.write("{not json\n")
    write(path, records[5000:], mode="a")
    index = MetricsIndex(path)
    index.refresh()
    answer = query(index.snapshot(["gradient_stability", "loss"]), ["gradient_stability", "loss"], points=20000)
    assert answer["rows"] == 8000
    assert answer["transitions"] == [
        {"step": 4000, "expert": "high_noise", "from_phase": "foundation", "to_phase": "balance"},
        {"step": 6100, "expert": "low_noise", "from_phase": "foundation", "to_phase": "balance"},
    ]
    stability = series(answer, "gradient_stability", None)
    assert 0 not in stability["step"] and stability["count"] == 7999  # null is skipped, never NaN
    assert all(v is not None for v in stability["value"])


def test_registry_answers_within_budget_and_finishes_in_the_background(tmp_path):
    path = tmp_path / "m.jsonl"
    write(path, make_lines(0, 40000))
    registry = MetricsRegistry(budget_s=0.0)
    try:
        index, complete = registry.fresh(path)
        assert not complete and 0 < index.rows < 40000  # one chunk read, the rest later
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            index, complete = registry.fresh(path)
            if complete and index.rows == 40000:
                break
            time.sleep(0.05)
        assert complete and index.rows == 40000
    finally:
        registry.close()


def test_metrics_route(tmp_path):
    from fastapi.testclient import TestClient

    from aitk.ui.server import create_app
    from aitk.ui.settings import UISettings
    from aitk.ui.store import Store

    settings = UISettings.from_env({}, home=tmp_path / "home", training_folder=tmp_path / "out",
                                   datasets_folder=tmp_path / "data")
    app = create_app(settings)
    store: Store = app.state.ctx.store
    job = store.add_job(name="wan", config_yaml="job: extension\n", training_folder=str(settings.training_folder))
    run = settings.training_folder / "wan"
    run.mkdir(parents=True)
    write(run / "metrics_wan.jsonl", make_lines(0, 3000))
    with TestClient(app) as client:
        for _ in range(200):  # each request indexes as far as its time budget allows (less on a busy machine)
            answer = client.get(f"/api/jobs/{job.id}/metrics", params={"fields": "loss,linear_alpha", "points": 50}).json()
            if answer["complete"]:
                break
        assert answer["complete"] and answer["experts"] == list(EXPERTS)
        assert {(s["field"], s["expert"]) for s in answer["series"]} == {
            (f, e) for f in ("loss", "linear_alpha") for e in (None, *EXPERTS)
        }
        assert all(len(s["step"]) <= 50 for s in answer["series"])
        tail = client.get(f"/api/jobs/{job.id}/metrics", params={"fields": "loss", "since_step": 2989}).json()
        assert series(tail, "loss", None)["step"] == list(range(2990, 3000))
        raw = client.get(f"/api/jobs/{job.id}/metrics/lines", params={"since_step": 2997}).json()
        assert [line["step"] for line in raw["lines"]] == [2998, 2999]
        default = client.get(f"/api/jobs/{job.id}/metrics").json()
        assert {s["field"] for s in default["series"]} >= {"loss", "gradient_stability", "linear_alpha", "phase_idx"}
