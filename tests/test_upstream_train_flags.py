"""ai-toolkit keys that upstream's job files use and that act here as they do there:
`train.linear_timesteps`, `train.force_first_sample`, and the web UI's `arch: wan21:1b` form."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aitk.config.loader import load_job_file, parse_job_text
from aitk.config.start_warnings import run_start_warnings
from conftest import base_process, deep_update, write_job


def process_of(arch: str, train: dict) -> dict:
    return {
        "job": "extension",
        "config": {"name": "flags", "process": [{
            "training_folder": "out", "model": {"name_or_path": "some/model", "arch": arch},
            "datasets": [{"folder_path": "/data"}], "train": train,
        }]},
    }


def loaded(arch: str, train: dict):
    return parse_job_text(yaml.safe_dump(process_of(arch, train)))


@pytest.mark.parametrize("arch", ["flux", "flux_kontext", "wan21", "wan22_14b_i2v"])
def test_linear_timesteps_on_flow_models_is_weighted(arch):
    job = loaded(arch, {"linear_timesteps": True}).job
    assert job.config.process[0].train.timestep_type == "weighted"
    assert loaded(arch, {"linear_timesteps": True, "timestep_type": "linear"}).job.config.process[0].train.timestep_type == "weighted"
    assert loaded(arch, {}).job.config.process[0].train.timestep_type is None


def test_linear_timesteps_on_sd_keeps_uniform_draws_and_says_nothing():
    result = loaded("sdxl", {"linear_timesteps": True})
    assert result.job.config.process[0].train.timestep_type is None  # SD's default draw is uniform
    assert result.warnings == []


def test_linear_timesteps_with_another_type_warns_which_wins():
    result = loaded("flux", {"linear_timesteps": True, "timestep_type": "sigmoid"})
    assert result.job.config.process[0].train.timestep_type == "sigmoid"
    (warning,) = run_start_warnings(result.job)
    assert warning.startswith("config.process[0].train.linear_timesteps:") and "'sigmoid' wins" in warning
    assert warning in result.warnings


def test_linear_timesteps_weights_the_flux_loss(tmp_path_factory):
    """The FLUX adapter's noisy batch carries loss weights exactly when linear_timesteps is set."""
    import torch

    from conftest import build_tiny_model
    from aitk.models.registry import create_adapter

    folder = build_tiny_model("dev", tmp_path_factory.mktemp("flux_lt"))
    process = loaded("flux", {"linear_timesteps": True}).job.config.process[0]
    process.model.name_or_path = str(folder)
    adapter = create_adapter(process.model, torch.device("cpu"), torch.float32)
    adapter.load()
    latents = torch.randn(4, 16, 8, 8)
    weighted = adapter.make_noisy_batch(latents, process.train, torch.Generator().manual_seed(0))
    plain = adapter.make_noisy_batch(latents, loaded("flux", {}).job.config.process[0].train,
                                     torch.Generator().manual_seed(0))
    assert weighted.loss_weights is not None and plain.loss_weights is None
    assert not torch.allclose(weighted.loss_weights, torch.ones_like(weighted.loss_weights))


@pytest.mark.parametrize(("written", "arch"), [
    ("wan21:1b", "wan21"), ("wan21:14b", "wan21"), ("wan21_i2v:14b480p", "wan21_i2v"),
    ("wan22_14b:t2v", "wan22_14b"), ("flux_kontext", "flux_kontext"),
])
def test_the_web_uis_arch_variants_read_as_upstream_reads_them(written, arch):
    result = loaded(written, {})
    assert result.job.config.process[0].model.resolved_arch == arch
    assert not [w for w in result.warnings if "architecture" in w]


def test_an_unknown_arch_with_a_variant_still_fails_at_start():
    result = loaded("omnigen2:base", {})
    assert any("architecture 'omnigen2:base'" in w and "fails at start" in w for w in result.warnings)


def test_force_first_sample_previews_again_on_resume(tiny_sd15: Path, shapes_dataset: Path, tmp_path: Path):
    from aitk.trainer.loop import Trainer

    samples = tmp_path / "out" / "force_first" / "samples"

    def run(steps: int, force: bool) -> dict[str, int]:
        process = deep_update(base_process(tiny_sd15, shapes_dataset, tmp_path / "out"), {
            "train": {"steps": steps, "force_first_sample": force},
            "save": {"save_every": 1000},
            "sample": {"sample_every": 1000, "width": 64, "height": 64, "sample_steps": 1, "prompts": ["a shp"]},
        })
        job = load_job_file(write_job(tmp_path / "job.yaml", "force_first", process)).job
        Trainer(job, job.config.process[0]).run()
        return {p.name.split("_")[0]: p.stat().st_mtime_ns for p in samples.glob("*.jpg")}

    first = run(2, force=False)  # previews before step 0 and after the last step (2)
    assert sorted(first) == ["000000000", "000000002"]
    plain = run(3, force=False)  # resumes at 2: no preview before training
    assert plain["000000002"] == first["000000002"] and "000000003" in plain
    forced = run(4, force=True)  # resumes at 3: its preview before training is drawn again
    assert forced["000000003"] != plain["000000003"] and "000000004" in forced
    assert forced["000000002"] == first["000000002"]
