"""`aitk run` holds back the collector's full passes while a run starts (aitk/startup_gc.py)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from aitk import startup_gc

REPO = Path(__file__).resolve().parents[1]

# `aitk run` with a collector callback: prints how many full passes ran before the training loop
# began and before the first step ended, and the frozen-object count the loop saw; `neutered`
# turns the policy off for comparison.
RUN_COUNTING_FULL_PASSES = """
import gc, json, runpy, sys
from aitk import startup_gc
from aitk.trainer import loop
full_passes = []
seen = {}
gc.callbacks.append(lambda phase, info: full_passes.append(1) if phase == "stop" and info["generation"] == 2 else None)
if sys.argv[2] == "neutered":
    startup_gc.pause = lambda: None
resume = startup_gc.resume
def counting_resume():
    seen["passes_at_loop_start"] = len(full_passes)
    resume()
startup_gc.resume = counting_resume
def on_first_step(trainer, step):
    if step == 1:
        seen["passes"] = len(full_passes)
        seen["frozen"] = gc.get_freeze_count()
        seen["threshold"] = gc.get_threshold()
loop.Trainer.__init__.__kwdefaults__["on_step_end"] = on_first_step
sys.argv = ["aitk", "run", sys.argv[1]]
try:
    runpy.run_module("aitk", run_name="__main__")
finally:
    print("RESULT " + json.dumps({**seen, "after": gc.get_freeze_count()}))
"""


@pytest.fixture
def keep_collector():
    before = gc.get_threshold()
    yield
    startup_gc.restore()
    gc.set_threshold(*before)


def test_pause_holds_full_passes_only_and_resume_freezes_then_restore_thaws(keep_collector):
    before = gc.get_threshold()
    startup_gc.resume()  # not paused: nothing happens (a trainer used in-process)
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before

    startup_gc.pause()
    young0, young1, full = gc.get_threshold()
    assert (young0, young1) == before[:2] and full > 10**6  # young generations collected as before

    garbage = []
    garbage.append(garbage)  # a cycle made during start-up is still freed by a young collection
    del garbage
    assert gc.collect(1) >= 1

    class Node:
        pass

    old = Node()
    old.me = old  # a cycle old enough to reach the oldest generation during start-up...
    gc.collect(1)
    gc.collect(1)
    gone = weakref.ref(old)
    del old  # ...then garbage: the pass at resume frees it rather than freezing it for the run
    startup_gc.resume()
    assert gone() is None
    assert gc.get_freeze_count() > 1000 and gc.get_threshold() == before
    startup_gc.restore()
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before


def _run(job: Path, mode: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", RUN_COUNTING_FULL_PASSES, str(job), mode], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [part for part in done.stdout.splitlines() if part.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


def test_aitk_run_starts_without_full_passes_and_trains_with_the_collector_on(make_job):
    policy = _run(make_job("gc_policy", train={"steps": 2}), "policy")
    neutered = _run(make_job("gc_neutered", train={"steps": 2}), "neutered")
    # what start-up costs without the policy: full passes over every object
    assert neutered["passes_at_loop_start"] >= 1
    assert policy["passes_at_loop_start"] == 0
    assert policy["passes"] == 1  # the one at the loop's start, which frees start-up's cyclic garbage
    assert policy["frozen"] > 100_000  # the libraries and the model, never walked again during the steps
    assert policy["threshold"][2] < 1000  # full passes allowed again once the loop runs
    assert policy["after"] == 0  # the run's end thawed them
