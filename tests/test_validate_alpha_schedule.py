"""`aitk validate` gives the alpha schedule's start-up warnings before any model loads (issue #12
item 4): the same lines the run writes to its log, and errors under --strict."""

from __future__ import annotations

from pathlib import Path

import yaml

from aitk.config.loader import parse_job_text
from aitk.config.validate import validate_command
from aitk.models.archs import ADAPTERS, EXPERT_ARCHS
from aitk.schedule.job_checks import alpha_schedule_warnings, trained_experts

CONV_PHASES = {
    "enabled": True,
    "conv_alpha_phases": {"foundation": {"alpha": 4, "min_steps": 10}, "balance": {"alpha": 8}},
}


def job(arch: str, network: dict, model_kwargs: dict | None = None) -> dict:
    return {
        "job": "extension",
        "config": {
            "name": "alpha_check",
            "process": [{
                "type": "sd_trainer",
                "training_folder": "output",
                "model": {"name_or_path": "some/model", "arch": arch, "model_kwargs": model_kwargs or {}},
                "network": {"type": "lora", "linear": 8, "linear_alpha": 8, **network},
                "datasets": [{"folder_path": "/data/images"}],
                "train": {"steps": 100},
            }],
        },
    }


def warnings_of(data: dict) -> list[str]:
    return alpha_schedule_warnings(parse_job_text(yaml.safe_dump(data)).job)


def test_conv_phases_on_a_transformer_warn_with_the_key_path():
    found = warnings_of(job("flux", {"alpha_schedule": CONV_PHASES}))
    assert len(found) == 1
    assert found[0].startswith("config.process[0].network.alpha_schedule: ")
    assert "no conv layer of this model is wrapped" in found[0]
    assert "conv_alpha_phases" in found[0]


def test_conv_phases_on_a_locon_unet_are_fine_and_need_network_conv():
    assert warnings_of(job("sd15", {"conv": 4, "conv_alpha": 4, "alpha_schedule": CONV_PHASES})) == []
    without_conv = warnings_of(job("sdxl", {"alpha_schedule": CONV_PHASES}))
    assert len(without_conv) == 1 and "set network.conv" in without_conv[0]


def test_per_expert_names_are_checked_against_the_trained_experts():
    schedule = {
        "enabled": True,
        "alpha_phases": {"foundation": {"alpha": 4, "min_steps": 10}, "balance": {"alpha": 8}},
        "per_expert": {"low_noise": {"linear_alpha": 6}},
    }
    assert warnings_of(job("wan22_14b", {"alpha_schedule": schedule})) == []
    only_high = warnings_of(job("wan22_14b", {"alpha_schedule": schedule}, {"train_low_noise": False}))
    assert any("per_expert.low_noise matches no expert" in w for w in only_high)


def test_expert_facts_match_the_adapters():
    """archs.EXPERT_ARCHS says without importing torch what each adapter's experts() returns."""
    import importlib

    import torch

    for arch, spec in ADAPTERS.items():
        module, cls_name = spec.split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        two = bool(getattr(cls, "two_experts", False))
        assert (arch in EXPERT_ARCHS) == two, arch
    process = parse_job_text(yaml.safe_dump(job("wan22_14b_i2v", {}))).job.config.process[0]
    assert trained_experts(process) == ["high_noise", "low_noise"]
    from aitk.models.wan import HIGH_NOISE, LOW_NOISE

    assert EXPERT_ARCHS["wan22_14b"] == (HIGH_NOISE, LOW_NOISE)
    del torch


def test_validate_prints_it_and_strict_fails(tmp_path: Path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job("wan21", {"alpha_schedule": CONV_PHASES})))
    assert validate_command([str(path)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "no conv layer of this model is wrapped" in out
    assert validate_command([str(path)], strict=True) == 1
    assert "no conv layer of this model is wrapped" in capsys.readouterr().err


def test_data_and_lokr_start_warnings_are_in_the_loaded_job():
    from aitk.config.start_warnings import run_start_warnings

    data = job("wan21", {"type": "lokr", "lokr_full_rank": True, "alpha_schedule": {
        "enabled": True, "alpha_phases": {"a": {"alpha": 4, "min_steps": 10}, "b": {"alpha": 8}}}})
    data["config"]["process"][0]["datasets"] = [
        {"folder_path": "/data/clips", "num_frames": 9, "temporal_jitter": 2, "random_crop": True,
         "cache_latents_to_disk": True, "shuffle_tokens": True},
    ]
    data["config"]["process"][0]["train"]["cache_text_embeddings"] = True
    loaded = parse_job_text(yaml.safe_dump(data))
    found = run_start_warnings(loaded.job)
    assert all(w in loaded.warnings for w in found)
    text = "\n".join(found)
    assert "config.process[0].network.alpha_schedule: with lokr_full_rank" in text
    assert "config.process[0].datasets[0].random_crop: crops are fixed" in text
    assert "config.process[0].datasets[0].temporal_jitter:" in text
    assert "config.process[0].datasets[0]: shuffle_tokens" in text
    data["config"]["process"][0]["datasets"][0].update(cache_latents_to_disk=False, shuffle_tokens=False)
    assert not [w for w in run_start_warnings(parse_job_text(yaml.safe_dump(data)).job) if "datasets" in w]
