"""logging.use_wandb / log_every / verbose and performance_log_every on the tiny SD 1.5 model."""

from __future__ import annotations

import json
import re
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aitk.config.loader import load_job_file
from aitk.config.validate import validate_command
from aitk.trainer.loop import Trainer
from aitk.trainer.step_report import window_values

TIMING_FIELDS = ("time_data_s", "time_forward_s", "time_backward_s", "time_optimizer_s")
SAMPLE = {"sample_every": 3, "width": 64, "height": 64, "sample_steps": 1, "prompts": ["a red circle"]}


def train(job_path: Path, **kwargs):
    loaded = load_job_file(job_path)
    trainer = Trainer(loaded.job, loaded.job.config.process[0], **kwargs)
    return trainer, trainer.run()


def read_metrics(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"metrics_{name}.jsonl").read_text().splitlines()]


def wandb_records(path: Path) -> Iterator[object]:
    """The records of a W&B transaction log (.wandb: a LevelDB-style log of 32 KiB blocks whose
    chunks carry wandb.proto Record messages), parsed with W&B's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, position, chunks = 32768, 7, []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:
            position += left
            continue
        if position + 7 + length > len(data):
            return  # a chunk still being written
        chunks.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def finished_log(path: Path, timeout_s: float = 60.0) -> Path:
    """`path` once W&B's service has written its exit record: `run.finish()` returns before the
    service process has flushed the file to disk."""
    deadline = time.monotonic() + timeout_s
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)):
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout_s} s"
        time.sleep(0.1)
    return path


def wandb_history(path: Path) -> tuple[dict[int, dict[str, object]], dict[str, object], list[str]]:
    """(history rows by step as {key: value}, the run's config, the run ids seen)."""
    finished_log(path)
    rows: dict[int, dict[str, object]] = {}
    config: dict[str, object] = {}
    ids: list[str] = []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            ids.append(record.run.run_id)
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.setdefault(int(row["_step"]), {}).update(row)
    return rows, config, ids


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for variable in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_wandb_offline_run_has_losses_previews_config_and_resumes(make_job, offline_wandb):
    job = make_job(
        "wb", train={"steps": 6, "lr_scheduler": "constant"}, logging={"use_wandb": True, "log_every": 2},
        sample=SAMPLE,
    )

    def stop_at_4(trainer: Trainer, step: int) -> None:
        if step == 4:
            trainer.stop.request("test")

    trainer, first = train(job, on_step_end=stop_at_4)
    assert first.state == "stopped" and first.step == 4
    run_dir = first.output_dir
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    [first_log] = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))

    _, second = train(job)
    assert second.state == "completed" and second.step == 6
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id  # the resumed run continues the W&B run
    logs = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(logs) == 2
    second_log = next(p for p in logs if p != first_log)

    losses = [m["loss"] for m in read_metrics(run_dir, "wb")]
    assert len(losses) == 6  # the metrics file keeps every step
    rows, config, ids = wandb_history(first_log)
    assert ids == [run_id]
    # log_every 2: W&B gets the mean loss of steps 1-2 and 3-4 at steps 2 and 4
    loss_steps = sorted(step for step, row in rows.items() if "loss" in row)
    assert loss_steps == [2, 4]
    assert rows[2]["loss"] == pytest.approx((losses[0] + losses[1]) / 2, rel=1e-6)
    assert rows[4]["loss"] == pytest.approx((losses[2] + losses[3]) / 2, rel=1e-6)
    assert rows[2]["learning_rate"] == pytest.approx(1e-3)
    # previews before training and at step 3, each an image with its prompt as caption
    image_steps = sorted(step for step, row in rows.items() if "sample_0/_type" in row)
    assert image_steps == [0, 3]
    assert rows[3]["sample_0/_type"] == "image-file" and rows[3]["sample_0/caption"] == "a red circle"
    assert rows[3]["sample_0/width"] == 64
    media = list(first_log.parent.glob("files/media/images/sample_0_*.jpg"))
    assert len(media) == 2 and all(p.stat().st_size > 0 for p in media)
    # the run config is the job as run
    assert config["config"]["name"] == "wb"
    assert config["config"]["process"][0]["logging"]["use_wandb"] is True
    assert config["config"]["process"][0]["train"]["steps"] == 6

    rows, _, ids = wandb_history(second_log)
    assert ids == [run_id]
    assert sorted(step for step, row in rows.items() if "loss" in row) == [6]
    assert rows[6]["loss"] == pytest.approx((losses[4] + losses[5]) / 2, rel=1e-6)
    assert "sample_0/_type" in rows[6]  # the final preview
    assert "W&B run" in (run_dir / "log.txt").read_text()


def test_wandb_missing_fails_validate_and_the_run(make_job, monkeypatch, capsys):
    job = make_job("nowb", logging={"use_wandb": True, "log_every": 10, "verbose": True}, performance_log_every=5)
    assert validate_command([str(job)]) == 0  # installed here: every logging key is simply supported
    said = capsys.readouterr()
    assert said.out.strip().splitlines() == [f"OK {job}"] and not said.err
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    assert validate_command([str(job)]) == 1
    said = capsys.readouterr().err
    assert "config.process[0].logging.use_wandb" in said and "pip install wandb" in said
    loaded = load_job_file(job)
    from aitk.trainer.errors import TrainingAborted

    with pytest.raises(TrainingAborted, match="pip install wandb"):
        Trainer(loaded.job, loaded.job.config.process[0]).run()


def test_log_every_and_verbose_lines(make_job):
    job = make_job("verbose", train={"steps": 7}, logging={"log_every": 3, "verbose": True})
    _, result = train(job)
    run_dir = result.output_dir
    metrics = read_metrics(run_dir, "verbose")
    assert [m["step"] for m in metrics] == list(range(7))
    assert not any(key in metrics[0] for key in TIMING_FIELDS)  # performance_log_every is off
    log = (run_dir / "log.txt").read_text()
    lines = re.findall(r"step (\d)/7: loss (\d+\.\d{4})( \(mean of (\d) steps\))?", log)
    assert [(step, count) for step, _, _, count in lines] == [("3", "3"), ("6", "3"), ("7", "")]
    losses = [m["loss"] for m in metrics]
    for (step, loss, _, _), window in zip(lines, (losses[0:3], losses[3:6], losses[6:7])):
        assert float(loss) == pytest.approx(sum(window) / len(window), abs=6e-5), step
    # set-up details: each model part's dtype and device, the optimizer group's modules and parameters
    assert re.search(r"verbose: model part denoiser:main: resident, [\d,]+ parameters in \d+ tensors, float32 on cpu", log)
    assert re.search(r"verbose: model part vae: parked .*, [\d,]+ parameters in \d+ tensors, float32 on cpu", log)
    assert "verbose: model part text_encoder: resident" in log
    group = re.search(r"verbose: group 0: (\d+) modules, ([\d,]+) parameters in (\d+) tensors, float32 on cpu", log)
    assert group is not None
    loaded = load_job_file(job)
    trainer = Trainer(loaded.job, loaded.job.config.process[0])
    trainer._setup()  # the same network again: its counts match the line
    assert int(group.group(1)) == len(trainer.network.wrapped_module_names())
    assert int(group.group(2).replace(",", "")) == sum(p.numel() for p in trainer.params)
    trainer.data.close()
    trainer.log.close()


def test_quiet_run_has_no_verbose_lines(make_job):
    _, result = train(make_job("quiet", train={"steps": 2}))
    log = (result.output_dir / "log.txt").read_text()
    assert "verbose:" not in log and "step 1/2" not in log and "performance" not in log


def test_performance_log_every_breaks_down_the_step(make_job):
    job = make_job(
        "perf", train={"steps": 4}, performance_log_every=2,
        model={"layer_offloading": True, "layer_offloading_transformer_percent": 0.5},
    )
    _, result = train(job)
    run_dir = result.output_dir
    metrics = read_metrics(run_dir, "perf")
    for record in metrics:
        phases = [record[key] for key in TIMING_FIELDS]
        assert all(value > 0 for value in phases), record
        assert sum(phases) <= record["step_time_s"], record
        # offloaded blocks are copied in forward and again in backward
        assert 0 < record["time_offload_s"] < record["time_forward_s"] + record["time_backward_s"], record
    # the phases cover the step: what is left (the health check, bookkeeping) is a few percent
    timed = sum(record[key] for record in metrics for key in TIMING_FIELDS)
    assert timed >= 0.85 * sum(record["step_time_s"] for record in metrics)
    log = (run_dir / "log.txt").read_text()
    lines = re.findall(r"performance, steps (\d)-(\d), mean per step: data ([\d.]+) s \(\d+%\), forward ([\d.]+) s"
                       r".*optimizer ([\d.]+) s \(\d+%\); step ([\d.]+) s; offload copies ([\d.]+) s", log)
    assert [(a, b) for a, b, *_ in lines] == [("1", "2"), ("3", "4")]
    for (first, last, data, forward, optimizer, step, offload), window in zip(lines, (metrics[0:2], metrics[2:4])):
        mean = sum(r["step_time_s"] for r in window) / 2
        assert float(step) == pytest.approx(mean, abs=6e-4)
        assert float(forward) == pytest.approx(sum(r["time_forward_s"] for r in window) / 2, abs=6e-4)
        assert float(offload) == pytest.approx(sum(r["time_offload_s"] for r in window) / 2, abs=6e-4)


def test_window_mean_skips_non_finite_steps_and_keeps_the_last_rate():
    records = [
        {"step": 0, "loss": 0.5, "grad_norm": 1.0, "step_time_s": 1.0, "samples_per_s": 2.0, "learning_rate": 1e-3,
         "lr_0": 1e-3, "expert": None},
        {"step": 1, "loss": None, "grad_norm": float("nan"), "step_time_s": 3.0, "samples_per_s": 4.0,
         "learning_rate": 5e-4, "lr_0": 5e-4, "expert": None},  # a skipped non-finite step
    ]
    values = window_values(records)
    assert values["loss"] == 0.5 and values["grad_norm"] == 1.0
    assert values["step_time_s"] == 2.0 and values["samples_per_s"] == pytest.approx((2 + 12) / 4)
    assert values["learning_rate"] == 5e-4 and values["lr_0"] == 5e-4 and values["steps_in_window"] == 2
    assert "step" not in values
