"""Data-parallel training with two processes on CPU (gloo), launched the way users launch it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def test_two_ranks_see_disjoint_samples_and_end_with_identical_weights(make_job, tmp_path):
    # 12 images, batch 2, 2 ranks: one epoch is 3 steps per rank.
    job = make_job("ddp", train={"steps": 3}, network={"linear": 4, "linear_alpha": 4, "dropout": 0.1})
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         str(REPO / "tests" / "dist_worker.py"), str(job), str(tmp_path)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert rank0["world_size"] == rank1["world_size"] == 2
    seen0 = {key for batch in rank0["seen"] for key in batch}
    seen1 = {key for batch in rank1["seen"] for key in batch}
    assert len(rank0["seen"]) == len(rank1["seen"]) == 3
    assert not seen0 & seen1
    assert len(seen0 | seen1) == 12
    for key, value in rank0["network"].items():
        assert torch.equal(value, rank1["network"][key]), key
    # Training moved the weights (lora_B starts at zero), so equality is not trivial.
    assert any(v.abs().sum() > 0 for k, v in rank0["network"].items() if "lora_B" in k)


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "aitk", "run"],
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", "aitk", "run"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launched_cli_run_uses_two_processes_and_writes_outputs_once(make_job, launcher):
    job = make_job("ddp_cli", train={"steps": 4}, save={"save_every": 2})
    proc = subprocess.run(
        [sys.executable, *LAUNCHERS[launcher], str(job)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import yaml

    raw = yaml.safe_load(job.read_text())
    run_dir = Path(raw["config"]["process"][0]["training_folder"]) / "ddp_cli"
    metrics = [json.loads(line) for line in (run_dir / "metrics_ddp_cli.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert all(m["samples_per_s"] > 0 for m in metrics)
    log = (run_dir / "log.txt").read_text()
    assert "2 processes" in log  # the run really was data parallel (accelerate --cpu would give 1)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    assert (run_dir / "ddp_cli.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["000000002", "000000004"]
