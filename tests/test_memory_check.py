"""`aitk run` on a GPU: the memory plan is made while the model loads, logged in one line, and a
warning names the shortfall when the device has less free memory than the plan's peak."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import base_process, write_job  # noqa: E402


def check_with_free(monkeypatch: pytest.MonkeyPatch, job_path: Path, free: int) -> list[str]:
    import aitk.trainer.memory_check as memory_check
    from aitk.config.loader import load_job_file

    monkeypatch.setattr(memory_check, "free_device_memory", lambda device: free)
    job = load_job_file(job_path).job
    lines: list[str] = []
    check = memory_check.PlanCheck(job, job.config.process[0], torch.device("cuda"), str(job_path), lines.append)
    check.start()
    check.report(timeout=120)
    return lines


def test_plan_line_and_shortfall_warning(monkeypatch, tiny_sd15, shapes_dataset, tmp_path):
    job_path = write_job(tmp_path / "job.yaml", "job", base_process(tiny_sd15, shapes_dataset, tmp_path / "out"))
    roomy = check_with_free(monkeypatch, job_path, 80 * 2**30)
    assert len(roomy) == 1 and roomy[0].startswith("plan: ") and "device peak" in roomy[0]
    tight = check_with_free(monkeypatch, job_path, 2**20)  # 1 MiB free
    assert tight[0] == roomy[0]
    assert "warning: the memory plan needs" in tight[1] and "1 MiB is free" in tight[1]
    assert f"aitk plan {job_path} --gpu-memory 1MB" in tight[1]
    from aitk.plan import parse_size

    assert parse_size("1MB") == 2**20  # the hint is a size `aitk plan` reads


def test_a_plan_that_cannot_be_made_is_a_note(monkeypatch, tiny_sd15, shapes_dataset, tmp_path):
    process = base_process(tiny_sd15, shapes_dataset, tmp_path / "out")
    process["model"]["name_or_path"] = str(tmp_path / "missing-model")
    job_path = write_job(tmp_path / "job.yaml", "job", process)
    lines = check_with_free(monkeypatch, job_path, 2**30)
    assert len(lines) == 1 and lines[0].startswith("note: no memory plan for this run (")
    assert "missing-model" in lines[0]


def test_cpu_runs_make_no_plan(tiny_sd15, shapes_dataset, tmp_path):
    from aitk.config.loader import load_job_file
    from aitk.trainer.memory_check import PlanCheck

    job_path = write_job(tmp_path / "job.yaml", "job", base_process(tiny_sd15, shapes_dataset, tmp_path / "out"))
    job = load_job_file(job_path).job
    lines: list[str] = []
    check = PlanCheck(job, job.config.process[0], torch.device("cpu"), "job.yaml", lines.append)
    check.start()
    check.report()
    assert lines == [] and check.plan is None
