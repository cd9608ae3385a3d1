"""Runs that fail say why and lose nothing: each failure reason injected into a real tiny run
(AITK_FAULT, aitk/trainer/faults.py) ends with that reason, its exit code, a message and a fix in
status.json and log.txt, and the last complete checkpoint intact; train.nan_policy skip / stop /
rollback; no LoRA file with a non-finite value is ever written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from aitk.trainer import faults
from aitk.trainer.checkpoint import list_checkpoints, verify_checkpoint
from aitk.trainer.failure import EXIT_CODES, classify

REPO = Path(__file__).resolve().parents[1]


def run(job: Path, monkeypatch: pytest.MonkeyPatch, fault: str | None = None, **trainer_kwargs: Any):
    """(trainer, result or None, the exception or None) of the job's first process, in this process."""
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    if fault is None:
        monkeypatch.delenv(faults.ENV, raising=False)
    else:
        monkeypatch.setenv(faults.ENV, fault)
    faults._faults.cache_clear()
    faults._nan_left.clear()
    loaded = load_job_file(job)
    trainer = Trainer(loaded.job, loaded.job.config.process[0], **trainer_kwargs)
    try:
        return trainer, trainer.run(), None
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return trainer, None, exc
    finally:
        monkeypatch.delenv(faults.ENV, raising=False)
        faults._faults.cache_clear()


def run_dir(job: Path) -> Path:
    import yaml

    raw = yaml.safe_load(job.read_text())
    return Path(raw["config"]["process"][0]["training_folder"]) / raw["config"]["name"]


def status_of(job: Path) -> dict[str, Any]:
    return json.loads((run_dir(job) / "status.json").read_text())


def metrics_of(job: Path) -> list[dict[str, Any]]:
    name = run_dir(job).name
    return [json.loads(line) for line in (run_dir(job) / f"metrics_{name}.jsonl").read_text().splitlines()]


def check_failed(job: Path, exc: BaseException | None, reason: str, step: int, checkpoint: int | None) -> dict:
    """The run ended with `reason` at `step`: status.json, the log's paragraph, the exit code, and
    the newest checkpoint (`checkpoint`) complete, with no partial one left."""
    assert exc is not None, "the run did not fail"
    failure = classify(exc)
    assert failure.reason == reason, (failure, exc)
    assert failure.exit_code == EXIT_CODES[reason]
    status = status_of(job)
    assert status["state"] == "error" and status["reason"] == reason, status
    assert status["message"] and status["fix"] and status["step"] == step, status
    log = (run_dir(job) / "log.txt").read_text()
    assert f"error ({reason}) at step {step}: {status['message'].splitlines()[0]}" in log
    assert f"fix: {status['fix']}" in log
    found = list_checkpoints(run_dir(job) / "checkpoints")
    if checkpoint is None:
        assert status["last_checkpoint"] is None and found == []
    else:
        assert found[0].step == checkpoint and verify_checkpoint(found[0].path) is None
        assert status["last_checkpoint"] == str(found[0].path)
        assert not [p for p in found[0].path.parent.iterdir() if p.name.startswith(".tmp-")]
    return status


def lora_files_are_finite(folder: Path) -> int:
    files = sorted(folder.glob("*.safetensors"))
    for file in files:
        assert all(torch.isfinite(t).all() for t in load_file(file).values()), file
    return len(files)


# --------------------------------------------------------------------------- nan_policy
def test_nan_policy_stop_stops_at_the_first_bad_step(make_job, monkeypatch):
    job = make_job("nanstop", train={"steps": 10, "nan_policy": "stop"}, save={"save_every": 2})
    _, _, exc = run(job, monkeypatch, "nan@5")
    status = check_failed(job, exc, "nan", 5, 4)
    assert "nan_policy is stop" in status["message"]
    assert lora_files_are_finite(run_dir(job)) == 2  # steps 2 and 4, nothing after


def test_nan_policy_skip_goes_on_and_counts_then_stops_after_the_patience(make_job, monkeypatch):
    job = make_job("nanskip", train={"steps": 10, "nan_patience": 3})
    _, result, exc = run(job, monkeypatch, "nan@4x2")  # two bad steps: fewer than the patience
    assert exc is None and result.state == "completed"
    lines = metrics_of(job)
    assert [line["update_skipped"] for line in lines] == [i in (4, 5) for i in range(10)]
    assert lines[-1]["nonfinite_steps"] == 2 and status_of(job)["nonfinite_steps"] == 2
    assert lora_files_are_finite(run_dir(job)) == 2  # the final file and its step-10 copy

    job = make_job("nanskip_stop", train={"steps": 10, "nan_patience": 3}, save={"save_every": 3})
    _, _, exc = run(job, monkeypatch, "nan@4")
    status = check_failed(job, exc, "nan", 6, 6)  # bad at steps 4, 5, 6; step 6's checkpoint is pre-NaN weights
    assert "3 steps in a row" in status["message"]
    assert lora_files_are_finite(run_dir(job)) == 2


def test_nan_policy_rollback_continues_from_the_checkpoint_with_half_the_rate(make_job, monkeypatch):
    job = make_job("nanroll", train={"steps": 12, "nan_policy": "rollback", "nan_patience": 3},
                   save={"save_every": 3})
    trainer, result, exc = run(job, monkeypatch, "nan@7x3")  # steps 7, 8, 9 bad -> back to checkpoint 6
    assert exc is None and result.state == "completed"
    lines = metrics_of(job)
    assert [line["step"] for line in lines] == list(range(12))  # each step once: the undone ones were dropped
    assert not any(line["update_skipped"] for line in lines)
    rates = [line["learning_rate"] for line in lines]
    assert rates[:6] == [pytest.approx(1e-3)] * 6 and rates[6:] == [pytest.approx(5e-4)] * 6
    assert trainer.state.nan_rollbacks == 1 and trainer.state.lr_factor == 0.5
    log = (run_dir(job) / "log.txt").read_text()
    assert "rollback 1 of 3: back to" in log and "000000006 (step 6)" in log
    assert lora_files_are_finite(run_dir(job)) >= 2
    status = status_of(job)
    assert status["state"] == "completed" and status["nan_rollbacks"] == 1 and status["nonfinite_steps"] == 3


def test_nan_policy_rollback_gives_up_after_three(make_job, monkeypatch):
    job = make_job("nanroll3", train={"steps": 12, "nan_policy": "rollback", "nan_patience": 2},
                   save={"save_every": 2})
    trainer, _, exc = run(job, monkeypatch, "nan@5")  # never recovers
    status = check_failed(job, exc, "nan", 7, 6)  # the 4th streak: steps 5 and 6 (6 was saved within it)
    assert "after 3 rollbacks" in status["message"] and trainer.state.nan_rollbacks == 3
    assert lora_files_are_finite(run_dir(job)) >= 1


def test_a_lora_file_with_non_finite_values_is_never_written(tmp_path):
    from aitk.networks.build import build_network
    from aitk.networks.export import NonFiniteWeightsError, save_lora

    handle = build_network(torch.nn.Sequential(torch.nn.Linear(8, 8)), linear_rank=2, linear_alpha=2.0, seed=1)
    with torch.no_grad():
        next(iter(handle.trainable_parameters())).fill_(float("nan"))
    target = tmp_path / "bad.safetensors"
    with pytest.raises(NonFiniteWeightsError, match="NaN or inf"):
        save_lora(target, handle, dtype=torch.float32)
    assert not target.exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- out of memory
def test_out_of_memory_in_a_step_stops_with_reason_oom(make_job, monkeypatch):
    job = make_job("oom", train={"steps": 10}, save={"save_every": 2})
    trainer, _, exc = run(job, monkeypatch, "oom@3")
    status = check_failed(job, exc, "oom", 3, 2)
    assert "out of memory in the training step at step 3" in status["message"]
    assert "batch_size" in status["fix"] and "aitk plan" in status["fix"]  # no device memory to plan for here
    assert all(p.grad is None for p in trainer.params)  # nothing of the failed step is kept


def test_out_of_memory_fix_is_the_plans_cheapest_fit(make_job):
    from aitk.config.loader import load_job_file
    from aitk.plan import plan_job
    from aitk.trainer.memory_check import fit_advice

    job = make_job("oomplan", train={"steps": 10, "batch_size": 4, "gradient_checkpointing": False})
    loaded = load_job_file(job)
    needed = plan_job(loaded.job).peak_device
    advice = fit_advice(loaded.job, 0, int(needed * 0.8))
    assert advice is not None and advice.startswith("change in the job: "), advice
    assert "train.batch_size" in advice or "gradient_checkpointing" in advice or "quantize" in advice


def test_out_of_memory_while_drawing_previews_skips_them_and_trains_on(make_job, monkeypatch):
    from aitk.trainer import sampling

    real = sampling.render_previews
    calls = {"n": 0}

    def render_or_run_out(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-3 previews
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB\nmore lines")
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "render_previews", render_or_run_out)
    job = make_job("oompreview", train={"steps": 6},
                   sample={"sample_every": 3, "prompts": ["a shp"], "width": 64, "height": 64, "sample_steps": 2})
    _, result, exc = run(job, monkeypatch)
    assert exc is None and result.state == "completed" and calls["n"] == 3
    log = (run_dir(job) / "log.txt").read_text()
    assert "warning: samples for step 3 failed (OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB)" in log
    assert sorted(p.name[:9] for p in (run_dir(job) / "samples").iterdir()) == ["000000000", "000000006"]


# --------------------------------------------------------------------------- disk
@pytest.mark.parametrize("fault, words", [("enospc", "No space left on device"), ("erofs", "Read-only file system")])
def test_a_refused_checkpoint_write_keeps_the_previous_checkpoint(make_job, monkeypatch, fault, words):
    job = make_job(f"disk_{fault}", train={"steps": 10}, save={"save_every": 2})
    _, _, exc = run(job, monkeypatch, f"{fault}@4")
    status = check_failed(job, exc, "io", 4, 2)
    assert words in status["message"] and "checkpoint of step 4" in status["message"]
    assert not (run_dir(job) / "checkpoints" / "000000004").exists()
    # started again once the disk has room, the run resumes from the checkpoint that stayed
    _, result, exc = run(job, monkeypatch)
    assert exc is None and result.state == "completed" and status_of(job)["reason"] is None
    assert "resuming from" in (run_dir(job) / "log.txt").read_text()


def test_too_little_free_space_stops_before_training(make_job, monkeypatch):
    job = make_job("nospace", train={"steps": 10}, sample={"sample_every": 5, "prompts": ["a shp"],
                                                          "width": 64, "height": 64})
    _, _, exc = run(job, monkeypatch, "free=1000")
    status = check_failed(job, exc, "io", 0, None)
    assert "not enough free space" in status["message"] and str(run_dir(job)) in status["message"]
    assert not (run_dir(job) / "samples").exists() or not any((run_dir(job) / "samples").iterdir())


def test_metrics_and_status_write_failures_are_warnings(make_job, monkeypatch):
    from aitk.trainer import reporting

    real = reporting.atomic_write_bytes
    calls = {"n": 0}

    def refuse_some(path, data):
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            raise OSError(28, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(reporting, "atomic_write_bytes", refuse_some)
    job = make_job("warnings", train={"steps": 6})
    _, result, exc = run(job, monkeypatch)
    assert exc is None and result.state == "completed"
    assert "warning: cannot write" in (run_dir(job) / "log.txt").read_text()


# --------------------------------------------------------------------------- config, data, model, internal
def test_a_corrupt_model_file_stops_with_reason_model(make_job, tiny_sd15, tmp_path, monkeypatch):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_sd15, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # a download cut short
    job = make_job("badmodel", model={"name_or_path": str(broken)})
    _, _, exc = run(job, monkeypatch)
    status = check_failed(job, exc, "model", 0, None)
    assert "unet" in status["message"] or str(broken) in status["message"]


def test_a_dataset_that_became_empty_stops_with_reason_data(make_job, shapes_dataset, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(shapes_dataset, data)
    job = make_job("emptied", dataset={"folder_path": str(data), "cache_latents": False}, train={"steps": 10},
                   save={"save_every": 2})

    def stop_at_4(trainer, step):
        if step == 4:
            trainer.stop.request("test")

    _, result, exc = run(job, monkeypatch, on_step_end=stop_at_4)
    assert exc is None and result.state == "stopped"
    for file in data.iterdir():
        if file.is_file():
            file.unlink()
    _, _, exc = run(job, monkeypatch)
    status = check_failed(job, exc, "data", 0, 4)
    assert str(data) in status["message"]


def test_an_unexpected_error_is_internal_with_its_traceback_in_the_log(make_job, monkeypatch):
    from aitk.models.sd.adapter import SD15Adapter

    def broken_predict(self, noisy, cond):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(SD15Adapter, "predict", broken_predict)
    job = make_job("internal", train={"steps": 4})
    _, _, exc = run(job, monkeypatch)
    status = check_failed(job, exc, "internal", 0, None)
    assert status["message"] == "ZeroDivisionError: a bug" and "bug in aitk" in status["fix"]
    log = (run_dir(job) / "log.txt").read_text()
    assert "Traceback (most recent call last)" in log and "broken_predict" in log


# --------------------------------------------------------------------------- the command line
def test_the_command_exits_with_the_reasons_code_and_says_the_fix(make_job):
    job = make_job("cli_nan", train={"steps": 6, "nan_policy": "stop"})
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", AITK_FAULT="nan@2")
    done = subprocess.run([sys.executable, "-m", "aitk", "run", str(job)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_CODES["nan"] == 5, done.stderr
    assert "reason nan" in done.stderr and "fix: " in done.stderr and "Traceback" not in done.stderr
    assert status_of(job)["reason"] == "nan"
