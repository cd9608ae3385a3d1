"""The run as users drive it from a shell: SIGKILL mid-checkpoint, Ctrl+C, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def aitk(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "aitk", *args], cwd=REPO, env=full_env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs,
    )


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def run_dir_of(job: Path) -> Path:
    import yaml

    raw = yaml.safe_load(job.read_text())
    process = raw["config"]["process"][0]
    return Path(process["training_folder"]) / raw["config"]["name"]


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_one(make_job):
    job = make_job("killed", train={"steps": 30}, save={"save_every": 10})
    run_dir = run_dir_of(job)
    proc = aitk("run", str(job), env={"AITK_FAULT_PAUSE_CHECKPOINT": "20"})
    checkpoints = run_dir / "checkpoints"
    wait_for(lambda: any(checkpoints.glob(".tmp-000000020-*/PAUSED")))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # The half-written folder is not a checkpoint; the step-10 one is complete.
    assert not (checkpoints / "000000020").exists()
    assert (checkpoints / "000000010" / "manifest.json").is_file()

    rerun = aitk("run", str(job))
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    assert "resuming from" in output and "step 10 of 30" in output
    assert not list(checkpoints.glob(".tmp-*"))
    metrics = [json.loads(line) for line in (run_dir / "metrics_killed.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(30))
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"


def test_a_damaged_checkpoint_is_skipped_with_a_warning(make_job):
    job = make_job("damaged", train={"steps": 6}, save={"save_every": 2})
    first = aitk("run", str(job))
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    run_dir = run_dir_of(job)
    # Corrupt the newest checkpoint and make the job longer: the run must resume from step 4.
    (run_dir / "checkpoints" / "000000006" / "optimizer.pt").write_bytes(b"garbage")
    text = job.read_text().replace("steps: 6", "steps: 8")
    job.write_text(text)
    second = aitk("run", str(job))
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    assert "000000006 is skipped" in out and "does not match its checksum" in out
    assert list((run_dir / "checkpoints").glob("000000006.damaged-*"))
    assert "step 4 of 8" in out


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(make_job, sig, code):
    job = make_job("interrupted", train={"steps": 400})
    run_dir = run_dir_of(job)
    proc = aitk("run", str(job))
    metrics = run_dir / "metrics_interrupted.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, output
    assert "Traceback" not in output
    assert "Run the same job again to resume" in output
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped"
    step = status["step"]
    assert 3 <= step < 400
    assert (run_dir / "checkpoints" / f"{step:09d}" / "manifest.json").is_file()
    assert status["last_checkpoint"].endswith(f"{step:09d}")


def test_bad_job_file_gives_a_message_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: extension\nconfig:\n  name: x\n  process:\n    - type: sd_trainer\n"
                   "      training_folder: out\n      train: {lr: fast}\n"
                   "      datasets: [{folder_path: /nowhere}]\n      model: {name_or_path: /nowhere}\n")
    for args in (["run", str(bad)], [str(bad)]):
        proc = subprocess.run([sys.executable, "run.py", *args[-1:]] if args == [str(bad)] else
                              [sys.executable, "-m", "aitk", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        assert "config.process[0].train.lr" in proc.stderr


def test_missing_dataset_folder_fails_before_loading_the_model(make_job, tmp_path):
    job = make_job("nodata", dataset={"folder_path": str(tmp_path / "missing")})
    proc = aitk("run", str(job))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3  # reason data (docs/outputs.md)
    assert "Traceback" not in output
    assert str(tmp_path / "missing") in output
    assert "loading model" not in output


def test_validate_accepts_the_examples():
    examples = sorted(str(p) for p in (REPO / "config" / "examples").glob("*.yaml"))
    assert examples
    proc = subprocess.run([sys.executable, "-m", "aitk", "validate", *examples], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_save_now_and_sample_now_requests_reach_a_running_job(make_job):
    from aitk.config.loader import load_job_file
    from aitk.trainer.control import ControlRequests
    from aitk.trainer.loop import Trainer

    job = make_job("control", train={"steps": 8}, save={"save_every": 1000},
                   sample={"sample_every": 1000, "prompts": ["a red square"], "sample_steps": 2})

    def ask(trainer, step):
        if step == 3:
            requests = ControlRequests(trainer.paths.root / "control")
            requests.request("save_now")
            requests.request("sample_now")

    loaded = load_job_file(job)
    trainer = Trainer(loaded.job, loaded.job.config.process[0], on_step_end=ask)
    result = trainer.run()
    run = result.output_dir
    assert (run / "checkpoints" / "000000004").is_dir()  # acted on after the next step
    assert (run / "samples" / "000000004_0.jpg").is_file()
    assert not list((run / "control").iterdir())  # the requests were consumed
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["000000004", "000000008"]


def test_a_request_made_during_the_last_step_is_consumed(make_job):
    from aitk.config.loader import load_job_file
    from aitk.trainer.control import ControlRequests
    from aitk.trainer.loop import Trainer

    job = make_job("late_request", train={"steps": 3})

    def ask(trainer, step):
        if step == 2:  # read during step 3, the last one
            ControlRequests(trainer.paths.root / "control").request("sample_now")

    loaded = load_job_file(job)
    result = Trainer(loaded.job, loaded.job.config.process[0], on_step_end=ask).run()
    assert result.state == "completed"
    assert not list((result.output_dir / "control").iterdir())  # nothing left to fire on a later run


def test_unusable_checkpoint_folders_never_make_pruning_delete_new_saves(make_job, tmp_path):
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    job = make_job("damaged", train={"steps": 4}, save={"save_every": 2, "max_step_saves_to_keep": 1})
    loaded = load_job_file(job)
    process = loaded.job.config.process[0]
    damaged = tmp_path / "out" / "damaged" / "checkpoints" / "000000500"
    damaged.mkdir(parents=True)
    (damaged / "network.safetensors").write_bytes(b"half written")  # no manifest
    result = Trainer(loaded.job, process).run()
    folders = sorted(p.name for p in (result.output_dir / "checkpoints").iterdir())
    assert "000000004" in folders and "000000500" not in folders
    assert any(name.startswith("000000500.damaged-") for name in folders)
    assert (result.output_dir / "damaged.safetensors").is_file()
