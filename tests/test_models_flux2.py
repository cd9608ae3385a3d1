"""FLUX.2 dev and Klein base on their tiny random-init models: the pipelines' prompt encodings,
the VAE's normalised patch latents, the flow-matching objective, LoRA targets and original-layout
key names, and end-to-end runs (LoRA, DoRA, LoKr, a qint8 base) whose files diffusers loads to the
same output and `aitk convert` / `merge` / `lora info` read.

Everything runs offline on CPU in fp32 with 64 px images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from aitk.config.schema import ModelConfig, TrainConfig
from aitk.models.base import ModelLoadError
from aitk.models.flow_matching import sample_sigmas
from aitk.models.flux2 import (
    Flux2Adapter,
    Flux2Klein4BAdapter,
    Flux2Klein9BAdapter,
    is_flux2_lora,
    lora_key_stem,
    module_for_stem,
)
from conftest import build_tiny_model
import family_checks as family
from upstream_jobs import extras_on_path  # noqa: F401 - autouse fixture: torchao for model.quantize

CPU = torch.device("cpu")
PROMPT = "a red circle, shp style"
ADAPTERS = {"flux2": Flux2Adapter, "flux2_klein_4b": Flux2Klein4BAdapter, "flux2_klein_9b": Flux2Klein9BAdapter}
VARIANT = {"flux2": "flux2_dev", "flux2_klein_4b": "flux2_klein_4b", "flux2_klein_9b": "flux2_klein_9b"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("flux2-models")


def model_dir(models: Path, arch: str) -> Path:
    return build_tiny_model(VARIANT[arch], models)


def make_adapter(folder: Path | str, arch: str = "flux2", **model_fields: Any) -> Flux2Adapter:
    adapter = ADAPTERS[arch](ModelConfig(name_or_path=str(folder), arch=arch, **model_fields), CPU, torch.float32)
    adapter.load()
    return adapter


@pytest.fixture(scope="module")
def dev(models: Path) -> Flux2Adapter:
    return make_adapter(model_dir(models, "flux2"))


@pytest.fixture(scope="module")
def klein(models: Path) -> Flux2Adapter:
    return make_adapter(model_dir(models, "flux2_klein_4b"), "flux2_klein_4b")


def _pipeline_class(arch: str) -> type:
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    return Flux2Pipeline if arch == "flux2" else Flux2KleinPipeline


# --- the tiny models and loading --------------------------------------------------------------------


def test_tiny_models_are_the_real_classes_and_small(models: Path, dev: Flux2Adapter, klein: Flux2Adapter) -> None:
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Mistral3ForConditionalGeneration, Qwen3ForCausalLM

    for arch in ADAPTERS:
        size = sum(p.stat().st_size for p in model_dir(models, arch).rglob("*") if p.is_file())
        assert size < 10 * 2**20, size
    assert isinstance(dev.text_encoder, Mistral3ForConditionalGeneration) and dev.text_encoder.model.vision_tower is None
    assert isinstance(klein.text_encoder, Qwen3ForCausalLM)
    for adapter in (dev, klein):
        assert isinstance(adapter.transformer, Flux2Transformer2DModel) and isinstance(adapter.vae, AutoencoderKLFlux2)
        assert adapter.max_sequence_length == 64 and adapter.bucket_divisibility == 16
        for module in (adapter.transformer, adapter.vae, adapter.text_encoder):
            assert not any(p.requires_grad for p in module.parameters())
    assert dev.has_guidance and not klein.has_guidance
    nine = make_adapter(model_dir(models, "flux2_klein_9b"), "flux2_klein_9b")
    assert nine.base_model_version == "flux2_klein_9b" and nine.modelspec_architecture == "flux-2-klein-9b/lora"
    assert Flux2Klein4BAdapter.card_license == {"license": "apache-2.0"}


def test_load_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model.name_or_path.*neither"):
        make_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="could not load a FLUX.2 dev model"):
        make_adapter(tmp_path / "empty")
    (tmp_path / "model.ckpt").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no .safetensors"):
        make_adapter(tmp_path / "model.ckpt")


@pytest.mark.parametrize("arch", list(ADAPTERS))
def test_presets_validate(arch: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from aitk.config.validate import validate_command
    from aitk.ui.presets import PRESETS

    job = PRESETS[arch]["job"]
    job["config"]["process"][0]["datasets"][0]["folder_path"] = str(tmp_path)
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(job))
    assert validate_command([str(path)]) == 0, capsys.readouterr()
    assert "warning" not in capsys.readouterr().out


def test_transformer_folder_with_extras(models: Path, tmp_path: Path) -> None:
    """A transformer-only folder takes the VAE, text encoder and tokenizer from extras_name_or_path."""
    import shutil

    folder = model_dir(models, "flux2_klein_4b")
    shutil.copytree(folder / "transformer", tmp_path / "transformer_only")
    adapter = make_adapter(tmp_path / "transformer_only", "flux2_klein_4b", extras_name_or_path=str(folder))
    assert adapter.parts_source == str(folder) and adapter.text_encoder_id().split("|")[1] == str(folder)


# --- prompts, latents and the objective --------------------------------------------------------------


@pytest.mark.parametrize("arch", ["flux2", "flux2_klein_4b"])
def test_prompts_are_the_pipelines_encoding(arch: str, models: Path, dev: Flux2Adapter, klein: Flux2Adapter) -> None:
    adapter = dev if arch == "flux2" else klein
    cond = adapter.encode_prompts([PROMPT, "x"])
    stock = _pipeline_class(arch).from_pretrained(model_dir(models, arch))
    hidden, _ = stock.encode_prompt([PROMPT, "x"], max_sequence_length=64)
    assert cond.hidden_states.shape == (2, 64, 48) and torch.equal(cond.hidden_states, hidden)
    assert not torch.equal(cond.hidden_states[0], cond.hidden_states[1])
    assert adapter.text_encoder_id().endswith("|len:64")


def test_latents_are_the_pipelines_normalised_patches(dev: Flux2Adapter) -> None:
    from diffusers import Flux2Pipeline

    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = dev.encode_images(pixels)
    stock = Flux2Pipeline(scheduler=None, vae=dev.vae, text_encoder=None, tokenizer=None, transformer=None)
    assert latents.shape == (1, 32, 4, 4)
    torch.testing.assert_close(latents, stock._encode_vae_image(pixels, None))
    assert dev.vae.bn.running_mean.abs().sum() > 0  # the normalisation is not the identity
    decoded = dev.decode_latents(latents)[0]
    assert decoded.size == (64, 64)


def test_prediction_is_the_transformer_on_packed_tokens(dev: Flux2Adapter) -> None:
    batch = family.noisy_batch(dev, timestep_type="linear")
    sigma = batch.timesteps / 1000
    latents = dev.encode_images(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    noise = (batch.noisy_latents - (1 - sigma.view(-1, 1, 1, 1)) * latents) / sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(batch.target, noise - latents, rtol=1e-4, atol=1e-4)  # rectified flow
    cond = dev.encode_prompts([PROMPT, PROMPT])
    from diffusers import Flux2Pipeline

    tokens = Flux2Pipeline._pack_latents(batch.noisy_latents)
    with torch.no_grad():
        pred = dev.predict(batch, cond)
        raw = dev.transformer(tokens, cond.hidden_states, sigma, Flux2Pipeline._prepare_latent_ids(batch.noisy_latents),
                              Flux2Pipeline._prepare_text_ids(cond.hidden_states), torch.ones(2)).sample
        other = dev.transformer(tokens, cond.hidden_states, sigma, Flux2Pipeline._prepare_latent_ids(batch.noisy_latents),
                                Flux2Pipeline._prepare_text_ids(cond.hidden_states), torch.full((2,), 4.0)).sample
    assert pred.shape == latents.shape
    torch.testing.assert_close(pred.flatten(2).transpose(1, 2), raw)  # guidance 1.0 by default
    assert not torch.allclose(raw, other)  # the guidance embedding is live


def test_shift_types_use_the_resolution_dependent_shift(dev: Flux2Adapter) -> None:
    from aitk.models.flux.latents import image_seq_shift

    n = 256
    small = dev.make_noisy_batch(torch.zeros(n, 32, 4, 4), TrainConfig(timestep_type="shift"), torch.Generator().manual_seed(1))
    large = dev.make_noisy_batch(torch.zeros(n, 32, 64, 64), TrainConfig(timestep_type="shift"), torch.Generator().manual_seed(1))
    assert (large.timesteps > small.timesteps).all()  # the same draws, shifted further at 4096 tokens
    want = sample_sigmas(n, TrainConfig(timestep_type="shift"), torch.Generator().manual_seed(1),
                         mu=image_seq_shift(64 * 64, dev.scheduler_config))
    torch.testing.assert_close(large.timesteps, want * 1000)
    family.check_weighted_loss_and_min_snr_refused(dev, dev.encode_images(family.pixels(0)), 0)


# --- LoRA names ------------------------------------------------------------------------------------


def test_lora_targets_and_original_names(dev: Flux2Adapter) -> None:
    names = dev.network_candidates(False)
    assert len(names) == 2 * 12 + 2 * 2  # 12 Linear layers per double block, 2 per single block
    family.check_original_names(lora_key_stem, module_for_stem, dev.transformer, {
        "transformer_blocks.1.attn.to_out.0": "diffusion_model.double_blocks.1.img_attn.proj",
        "transformer_blocks.0.attn.add_k_proj": "diffusion_model.double_blocks.0.txt_attn.qkv.k",
        "transformer_blocks.0.ff_context.linear_out": "diffusion_model.double_blocks.0.txt_mlp.2",
        "single_transformer_blocks.1.attn.to_qkv_mlp_proj": "diffusion_model.single_blocks.1.linear1",
        "proj_out": "diffusion_model.final_layer.linear",
    }, unnamed="transformer_blocks.0.attn.norm_q")
    assert dev.offload_blocks(dev.transformer)[0] is dev.transformer.transformer_blocks[0]
    assert is_flux2_lora({"diffusion_model.double_blocks.0.img_attn.qkv.q.lora_A.weight": torch.zeros(1)})
    assert not is_flux2_lora({"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.zeros(1)})


# --- end to end ------------------------------------------------------------------------------------


def _job(tmp_path: Path, name: str, folder: Path, data: Path, arch: str = "flux2", **changes: Any) -> Path:
    return family.write_job(tmp_path, name, folder, data, {
        "model": {"arch": arch},
        "train": {"steps": 12, "batch_size": 2, "lr": 5e-3, "timestep_type": "weighted"},
        "network": {"type": "lora", "linear": 4, "linear_alpha": 8},
        "sample": {"sample_every": 1000, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 4.0,
                   "neg": "", "prompts": ["a red circle, [trigger] style"], "seed": 5},
    }, changes)


def _render(pipe: Any, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(**embeds, height=64, width=64, num_inference_steps=2, guidance_scale=4.0, max_sequence_length=64,
                generator=torch.Generator().manual_seed(3), output_type="latent").images


def _embeds(adapter: Flux2Adapter) -> dict[str, torch.Tensor]:
    return adapter.preview_prompt_kwargs(adapter.encode_prompts([PROMPT]), adapter.encode_prompts([""]))


def _diffusers_diff(trainer: Any, arch: str, model: Path, lora: Path) -> tuple[float, float]:
    """(max |ours - diffusers with the file|, max |ours - the base model|) of a 2-step render from
    the same prompt embeddings (Klein: with classifier-free guidance)."""
    embeds = _embeds(trainer.adapter)
    return family.diffusers_lora_diff(trainer.adapter, _pipeline_class(arch), model, lora,
                                      lambda pipe: _render(pipe, embeds))


@pytest.fixture(scope="module")
def lora_run(models: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("flux2-lora")
    job = _job(tmp, "lora", model_dir(models, "flux2"), shapes_dataset, train={"steps": 30, "timestep_type": "sigmoid"})
    return (*family.train_to_the_end(job), tmp)


def test_lora_trains_with_original_names(lora_run: tuple) -> None:
    trainer, result, losses, _ = lora_run
    assert len(losses) == 30 and np.mean(losses[-10:]) < np.mean(losses[:10]), losses
    tensors = load_file(str(result.final_lora))
    wrapped = trainer.network.wrapped_module_names()
    parts = ("lora_A.weight", "lora_B.weight")  # alpha / rank folded into lora_B, no .alpha
    # q / k / v are written as one LoRA on ComfyUI's fused img_attn / txt_attn qkv: rank 3r
    stems = {lora_key_stem(m).removesuffix(".q").removesuffix(".k").removesuffix(".v") for m in wrapped}
    assert set(tensors) == {f"{stem}.{s}" for stem in stems for s in parts}
    fused = {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith("_attn.qkv.lora_A.weight")}
    assert fused and all(tensors[f"{stem}.lora_A.weight"].shape[0] == 12 for stem in fused)
    with safe_open(str(result.final_lora), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "flux-2-dev/lora" and meta["ss_base_model_version"] == "flux2"


@pytest.mark.parametrize(("arch", "kind"), [("flux2", "lora"), ("flux2_klein_4b", "lora"), ("flux2", "dora")])
def test_diffusers_layout_loads_exactly_in_diffusers(arch: str, kind: str, models: Path, shapes_dataset: Path,
                                                     tmp_path: Path) -> None:
    network = {"type": "lora", "linear": 4, "linear_alpha": 8, "dora": kind == "dora"}
    model = model_dir(models, arch)
    job = _job(tmp_path, kind, model, shapes_dataset, arch, network=network, train={"steps": 6},
               save={"save_format": "diffusers"})
    trainer, result, losses = family.train_to_the_end(job)
    family.check_diffusers_layout_run(arch, kind, result, losses, lambda lora: _diffusers_diff(trainer, arch, model, lora))


def test_tools_know_flux2_files(lora_run: tuple, models: Path) -> None:
    """`aitk lora info` names the arch, `aitk convert` turns the comfyui file into the diffusers
    layout (which diffusers loads exactly) and back bit for bit, `aitk merge` bakes it into a
    folder Flux2Pipeline loads."""
    from diffusers import Flux2Pipeline

    from aitk.tools.lora_info import _guess_arch, lora_info

    trainer, result, _, tmp = lora_run
    model = model_dir(models, "flux2")
    info = lora_info(result.final_lora)
    assert info.architecture == "flux2" and info.network_type == "lora" and info.ranks == {"4": 28}
    original = load_file(str(result.final_lora))
    assert "flux2" in _guess_arch(original)
    # diffusers' reader of original-layout FLUX.2 files wants fused qkv and no .alpha: the default file
    Flux2Pipeline.from_pretrained(model).load_lora_weights(str(result.final_lora))
    family.check_conversion_loads_in_diffusers("flux2", result.final_lora, tmp,
                                               lambda lora: _diffusers_diff(trainer, "flux2", model, lora))
    embeds = _embeds(trainer.adapter)
    family.check_merged_folder_renders_alike("flux2", trainer, model, result.final_lora, tmp, Flux2Pipeline,
                                             lambda pipe: _render(pipe, embeds))


def test_lokr_trains(models: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, "lokr", model_dir(models, "flux2_klein_4b"), shapes_dataset, "flux2_klein_4b",
               network={"type": "lokr", "lokr_factor": 4}, train={"steps": 6})
    trainer, result, losses = family.train_to_the_end(job)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert trainer.network.first.algo == "lokr"
    tensors = load_file(str(result.final_lora))
    assert any(k.endswith(".lokr_w1") for k in tensors) and all(k.startswith("diffusion_model.") for k in tensors)


def test_a_qint8_base_trains(models: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, "q8", model_dir(models, "flux2"), shapes_dataset, model={"quantize": True, "qtype": "qint8"},
               train={"timestep_type": "sigmoid", "steps": 16})
    trainer, result, losses = family.train_to_the_end(job)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    family.check_quantized_base(trainer)
    assert result.final_lora.is_file()


def test_previews_and_validate_warn_on_control_path(models: Path, shapes_dataset: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Previews render through the Klein pipeline (with its negative prompt); FLUX.2 trains
    text-to-image only here, so `aitk validate` says a control_path is unused."""
    from aitk.config.validate import validate_command

    job = _job(tmp_path, "prev", model_dir(models, "flux2_klein_4b"), shapes_dataset, "flux2_klein_4b",
               train={"steps": 2}, sample={"sample_every": 2, "neg": "blurry"})
    _, result, _ = family.train_to_the_end(job)
    assert sorted(p.suffix for p in (result.output_dir / "samples").iterdir()) == [".jpg", ".jpg"]
    text = job.read_text().replace("folder_path:", f"control_path: {shapes_dataset}\n      folder_path:", 1)
    job.write_text(text)
    validate_command([str(job)])
    assert "control_path" in capsys.readouterr().out
