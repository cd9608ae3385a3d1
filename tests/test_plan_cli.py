"""`aitk plan` on the command line: upstream's 24 GB job files (no download, no weights), bad
input (one message, exit 1), JSON output, advice under a budget, and the accounting rules."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import base_process, write_job  # noqa: E402

UPSTREAM = Path(__file__).parent / "data" / "upstream_24gb"
GIB = 2**30
# upstream file -> fits in 24 GiB as written (the plan's finding; docs/memory.md has the figures)
FITS_24GB = {
    "train_lora_flux_24gb.yaml": True,
    "train_lora_flux_schnell_24gb.yaml": True,
    "train_lora_flux_kontext_24gb.yaml": True,
    "train_lora_wan21_14b_24gb.yaml": True,
    "train_lora_wan22_14b_24gb.yaml": True,
}


@pytest.mark.parametrize("name", sorted(FITS_24GB))
def test_upstream_24gb_jobs_are_planned_without_weights(name, monkeypatch):
    from aitk.plan import plan_job

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    start = time.perf_counter()
    plan = plan_job(UPSTREAM / name, gpu_memory=24 * GIB)
    print(f"{name}: planned in {time.perf_counter() - start:.1f} s")  # speed is bench/'s job, not a test's
    assert plan.fits is FITS_24GB[name], plan.render()
    assert 10 * GIB < plan.peak_device <= 24 * GIB
    assert plan.flops_per_step > 1e13 and plan.trainable_parameters > 1e7
    assert "aitk/plan/configs/" in plan.origin


def test_unsupported_arch_is_one_line(capsys, tmp_path):
    from aitk.cli import main

    job = _job(tmp_path, "OmniGen2/OmniGen2", arch="omnigen2")  # a family diffusers cannot load
    assert main(["plan", str(job)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'omnigen2' (OmniGen2) is not supported" in err


def _job(tmp_path: Path, model: str, **model_keys: object) -> Path:
    process = base_process(Path(model), tmp_path, tmp_path / "out")
    process["model"].update(model_keys)
    return write_job(tmp_path / "job.yaml", "job", process)


def _broken_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "broken"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    (folder / "unet" / "config.json").write_text("{ not json")
    return folder


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing job", "no such job file"),
        ("missing folder", "folder '/nonexistent/model' does not exist"),
        ("unknown hub id", "'someone/unknown-model' is a hub id whose configs aitk plan does not ship"),
        ("broken config", "unet/config.json: cannot be read as JSON"),
        ("bad size", "--gpu-memory: 'lots' is not a memory size"),
    ],
)
def test_bad_input_is_one_clear_message_and_exit_1(kind, expected, tmp_path, capsys):
    from aitk.cli import main

    if kind == "missing job":
        args = [str(tmp_path / "nope.yaml")]
    elif kind == "missing folder":
        args = [str(_job(tmp_path, "/nonexistent/model"))]
    elif kind == "unknown hub id":
        args = [str(_job(tmp_path, "someone/unknown-model"))]
    elif kind == "broken config":
        args = [str(_job(tmp_path, str(_broken_folder(tmp_path))))]
    else:
        args = [str(_job(tmp_path, "stable-diffusion-v1-5/stable-diffusion-v1-5")), "--gpu-memory", "lots"]
    assert main(["plan", *args]) == 1
    captured = capsys.readouterr()
    assert expected in captured.err and "Traceback" not in captured.err + captured.out
    assert len(captured.err.strip().splitlines()) == 1


def test_json_output_and_one_line(tiny_sd15, tmp_path, capsys):
    from aitk.cli import main
    from aitk.plan import plan_job

    job = _job(tmp_path, str(tiny_sd15))
    assert main(["plan", str(job), "--json", "--gpu-memory", "1GB"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True and data["peak_device"] == data["step"]["total"] > 0
    assert set(data["step"]) >= {"weights", "trainable", "optimizer", "gradients", "activations", "workspace"}
    assert data["not_counted"] and data["flops_per_step"] > 0
    line = plan_job(job, gpu_memory=2**30).one_line()
    assert line.startswith("plan: ") and "fits in 1.0 GiB" in line


def test_too_small_a_budget_gets_the_cheapest_settings_that_fit(tiny_sd15, tmp_path):
    from aitk.plan import plan_job
    from aitk.plan.report import suggestion_yaml

    job = _job(tmp_path, str(tiny_sd15))
    plan = plan_job(job)
    advised = plan_job(job, gpu_memory=plan.peak_device - 1)
    assert advised.fits is False and advised.suggestion is not None
    assert advised.suggestion_peak <= plan.peak_device - 1
    assert advised.suggestion.get("model.quantize") is True or advised.suggestion.get("train.gradient_checkpointing")
    snippet = suggestion_yaml(advised.suggestion)
    assert snippet.startswith(("model:", "train:")) and "fits in" in advised.render()
    hopeless = plan_job(job, gpu_memory=1024)
    assert hopeless.suggestion is None and "larger GPU" in hopeless.render()


def test_sizes_and_optimizer_state_rules():
    from aitk.plan.optimizer_state import state_bytes
    from aitk.plan.report import parse_size

    assert parse_size("24GB") == parse_size("24 GiB") == 24 * GIB and parse_size("16000MB") == 16000 * 2**20
    assert state_bytes("adamw", (64, 32), 4) == 2 * 64 * 32 * 4
    assert state_bytes("adamw8bit", (1024, 64), 4) == 2 * (1024 * 64 + 4 * 32)
    assert state_bytes("adafactor", (64, 32), 4) == 4 * (64 + 32)
    assert state_bytes("prodigy", (10,), 2) == 4 * 10 * 2 and state_bytes("lion", (10,), 4) == 40
    assert state_bytes("automagic", (8, 4), 4) == 32 * 3 + 4 * (8 + 4)
