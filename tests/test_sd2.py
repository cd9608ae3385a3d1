"""Stable Diffusion 2.x on tiny SD 2-shaped models (aitk.models.sd.build_tiny_sd2): selection by
`arch: sd2` / `is_v2`, the prediction type from the model's scheduler, velocity targets, and a LoRA
file that diffusers loads and that says SD 2 in its metadata (kohya's and the SAI spec's values)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from aitk.config.loader import load_job_file
from aitk.config.schema import ModelConfig
from aitk.models.base import NoisyBatch
from aitk.models.registry import create_adapter
from aitk.models.sd import SD2Adapter
from aitk.models.sd import build_tiny_sd2
from aitk.trainer.loop import Trainer
from conftest import base_process, deep_update, write_job

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd2(tmp_path_factory.mktemp("models") / "tiny-sd2-768-v", "768-v")


@pytest.fixture(scope="session")
def tiny_sd2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd2(tmp_path_factory.mktemp("models") / "tiny-sd2-512", "512")


def _load(folder: Path, **model_fields) -> SD2Adapter:
    adapter = create_adapter(ModelConfig(name_or_path=str(folder), **model_fields), CPU, torch.float32)
    adapter.load()
    return adapter


def _velocity_of(adapter: SD2Adapter, latents: torch.Tensor, batch: NoisyBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(velocity, noise) of a noisy batch, from x_t = sqrt(ab) x0 + sqrt(1 - ab) noise and
    v = sqrt(ab) noise - sqrt(1 - ab) x0 with the model's own alphas_cumprod."""
    ab = adapter.noise_scheduler.alphas_cumprod[batch.timesteps.cpu()].view(-1, 1, 1, 1).to(latents)
    noise = (batch.noisy_latents.float() - ab.sqrt() * latents) / (1 - ab).sqrt()
    return ab.sqrt() * noise - (1 - ab).sqrt() * latents, noise


def test_sd2_loads_as_sd2_with_the_prediction_type_of_its_scheduler(tiny_sd2: Path, tiny_sd2_base: Path) -> None:
    assert ModelConfig(name_or_path="x", is_v2=True).resolved_arch == "sd2"
    v_model = _load(tiny_sd2, is_v2=True)  # the legacy flag, as ai-toolkit job files write it
    assert type(v_model) is SD2Adapter
    assert v_model.prediction_type == "v_prediction"  # from scheduler/, no is_v_pred needed
    assert (v_model.base_model_version, v_model.modelspec_architecture) == (
        "sd_v2_v", "stable-diffusion-v2-768-v/lora"
    )
    # the parts are SD 2's: OpenCLIP-style text encoder, linear attention projections
    assert v_model.text_encoder.config.hidden_act == "gelu" and v_model.tokenizer.pad_token == "!"
    assert v_model.unet.config.use_linear_projection and list(v_model.unet.config.attention_head_dim) == [2, 4]
    assert v_model.unet.config.cross_attention_dim == v_model.text_encoder.config.hidden_size

    base = _load(tiny_sd2_base, arch="sd2")
    assert base.prediction_type == "epsilon"
    assert (base.base_model_version, base.modelspec_architecture) == ("sd_v2", "stable-diffusion-v2-512/lora")
    forced = _load(tiny_sd2_base, arch="sd2", is_v_pred=True)
    assert forced.prediction_type == "v_prediction" and forced.base_model_version == "sd_v2_v"


def test_sd2_prompt_embeddings_are_the_pipelines(tiny_sd2: Path) -> None:
    from diffusers import StableDiffusionPipeline

    adapter = _load(tiny_sd2, arch="sd2")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd2, safety_checker=None)
    ours = adapter.encode_prompts(["a red circle"]).hidden_states
    theirs, _ = pipe.encode_prompt("a red circle", CPU, 1, False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_sd2_trains_on_velocity_and_its_lora_loads_in_diffusers(
    tiny_sd2: Path, shapes_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import StableDiffusionPipeline

    batches: list[tuple[torch.Tensor, NoisyBatch]] = []
    real = SD2Adapter.make_noisy_batch

    def recording(self, latents, train_cfg, generator, context=None):  # noqa: ANN001, ANN202
        batch = real(self, latents, train_cfg, generator, context)
        batches.append((latents.detach().float().clone(), batch))
        return batch

    monkeypatch.setattr(SD2Adapter, "make_noisy_batch", recording)
    process = deep_update(
        base_process(tiny_sd2, shapes_dataset, tmp_path / "out"),
        {"model": {"arch": "sd2"}, "train": {"steps": 8, "lr": 5e-3}},
    )
    loaded = load_job_file(write_job(tmp_path / "sd2.yaml", "sd2", process))
    trainer = Trainer(loaded.job, loaded.job.config.process[0])
    result = trainer.run()
    assert result.state == "completed" and result.step == 8

    # every step's target was the velocity, not the noise
    assert len(batches) == 8
    for latents, batch in batches:
        velocity, noise = _velocity_of(trainer.adapter, latents, batch)
        torch.testing.assert_close(batch.target, velocity, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(batch.target, noise, atol=1e-2)
    metrics = [json.loads(line) for line in (result.output_dir / "metrics_sd2.jsonl").read_text().splitlines()]
    assert len(metrics) == 8 and all(math.isfinite(m["loss"]) for m in metrics)

    # diffusers loads the file into SD 2's UNet and predicts what the trainer's UNet predicts
    unet = trainer.adapter.denoiser().eval()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([100, 700])
    cond = trainer.adapter.encode_prompts(["a red circle, shp", "a blue square"]).hidden_states
    with torch.no_grad():
        ours = unet(sample, timesteps, encoder_hidden_states=cond).sample
        fresh = StableDiffusionPipeline.from_pretrained(tiny_sd2, safety_checker=None)
        before = fresh.unet(sample, timesteps, encoder_hidden_states=cond).sample
        fresh.load_lora_weights(str(result.final_lora))
        theirs = fresh.unet(sample, timesteps, encoder_hidden_states=cond).sample
    assert (ours - before).abs().max() > 1e-3  # the LoRA changes the output, so the check can fail
    assert (ours - theirs).abs().max() < 1e-4

    with safe_open(str(result.final_lora), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert metadata["ss_base_model_version"] == "sd_v2_v" and metadata["ss_v2"] == "True"
    from aitk.tools.lora_info import lora_info

    info = lora_info(result.final_lora)  # `aitk lora info` names the model from the header
    assert info.architecture == "sd2" and "stable-diffusion-v2-768-v/lora" in info.architecture_source


@pytest.mark.parametrize(
    ("version", "v2"), [("sd_v1", "False"), ("sd_v2", "True"), ("sd_v2_v", "True"), ("sdxl_base_v1-0", "False")]
)
def test_ss_v2_follows_the_base_model_version(version: str, v2: str) -> None:
    from aitk.networks.metadata import lora_metadata

    metadata = lora_metadata(
        name="n", steps=1, network_dim=4, network_alpha=4, conv_dim=None, conv_alpha=None,
        base_model_version=version, architecture="a/lora", resolution=(64, 64), training_settings={},
        meta={"ss_v2": "forged"}, trigger_word=None,
    )
    assert metadata["ss_v2"] == v2  # computed, never taken from the meta block
