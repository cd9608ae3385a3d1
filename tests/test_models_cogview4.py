"""CogView4 on the tiny random-init model of the real classes: the pipeline's GLM encoding and
velocity, the flow-matching objective with CogView4's resolution-dependent shift, loading from a
transformer-only folder, and runs whose files load in diffusers exactly (LoRA, DoRA), LoKr through
aitk's own loader, a quantized base, and the tools.

Everything runs offline on CPU in fp32 with 64 px images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from aitk.config.schema import ModelConfig, TrainConfig
from aitk.models.base import NoisyBatch, PromptEmbeds
from aitk.models.cogview4 import CogView4Adapter, CogView4InputError, build_tiny_cogview4, cogview4_shift
from aitk.models.flow_matching import time_shift
import family_checks as family
from interop_results import record
from upstream_jobs import extras_on_path  # noqa: F401 - autouse fixture: torchao for model.quantize

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def cogview4_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cogview4(tmp_path_factory.mktemp("cogview4-model") / "tiny-cogview4")


def make_adapter(folder: Path | str, **model_fields: Any) -> CogView4Adapter:
    adapter = CogView4Adapter(ModelConfig(name_or_path=str(folder), arch="cogview4", **model_fields), CPU, torch.float32)
    adapter.load()
    return adapter


@pytest.fixture(scope="session")
def cogview(cogview4_model: Path) -> CogView4Adapter:
    return make_adapter(cogview4_model)


# --- the model ---------------------------------------------------------------------------------


def test_tiny_model_loads_as_the_real_pipeline(cogview4_model: Path) -> None:
    from diffusers import CogView4Pipeline

    size = sum(p.stat().st_size for p in cogview4_model.rglob("*") if p.is_file())
    assert size < 10 * 2**20, size
    pipe = CogView4Pipeline.from_pretrained(cogview4_model)
    assert type(pipe.text_encoder).__name__ == "GlmModel"
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a").input_ids[:2]) == ["[gMASK]", "<sop>"]
    assert build_tiny_cogview4(cogview4_model) == cogview4_model  # kept, not rebuilt


def test_load_facts(cogview: CogView4Adapter) -> None:
    for module in (cogview.transformer, cogview.vae, cogview.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())
    assert cogview.max_sequence_length == 64  # the tiny tokenizer's length caps the pipeline's 1024
    assert cogview.scheduler_config["use_dynamic_shifting"] and cogview.scheduler_config["base_shift"] == 0.25
    assert CogView4Adapter.bucket_divisibility == 16 and not cogview.uses_controls
    assert cogview.network_candidates(False) is None  # every Linear of the transformer, as ai-toolkit
    assert cogview.offload_blocks(cogview.transformer) == list(cogview.transformer.transformer_blocks)
    assert cogview.offload_blocks(cogview.text_encoder) == list(cogview.text_encoder.layers)
    assert cogview.lora_key_stem("transformer_blocks.0.attn1.to_q") == "diffusion_model.transformer_blocks.0.attn1.to_q"


def test_encode_prompts_is_the_pipeline_encoding(cogview: CogView4Adapter, cogview4_model: Path) -> None:
    from diffusers import CogView4Pipeline

    cond = cogview.encode_prompts(["a red circle", "a blue square on a grey ground, " * 2])
    short = cogview.encode_prompts(["a red circle"])
    assert short.hidden_states.shape == (1, 16, 32) and cond.hidden_states.shape == (2, 64, 32)
    # each prompt encoded alone (its own left padding to 16), the shorter right-padded with zeros
    assert torch.equal(cond.hidden_states[0, :16], short.hidden_states[0]) and not cond.hidden_states[0, 16:].any()
    assert cond.extra["mask"].sum(1).tolist() == [16, 64]
    pipe = CogView4Pipeline.from_pretrained(cogview4_model)
    embeds, _ = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False, max_sequence_length=64)
    assert torch.equal(short.hidden_states, embeds)


# --- the objective -----------------------------------------------------------------------------


def test_noisy_batch_is_rectified_flow_with_cogview4s_shift(cogview: CogView4Adapter) -> None:
    latents = cogview.encode_images(family.pixels(1))
    assert latents.shape == (2, 16, 8, 8) and torch.equal(latents, cogview.encode_images(family.pixels(1)))
    a = cogview.make_noisy_batch(latents, TrainConfig(timestep_type="shift"), torch.Generator().manual_seed(5))
    s = (a.timesteps / 1000).view(-1, 1, 1, 1)
    noise = (a.noisy_latents - (1 - s) * latents) / s
    torch.testing.assert_close(a.target, noise - latents, rtol=1e-4, atol=1e-4)
    # 16 tokens of 2x2 patches: the pipeline's factor sqrt(16 / 256) * 0.75 + 0.25 as a linear shift
    shift = cogview4_shift(cogview.scheduler_config, 16)
    assert shift == pytest.approx(0.4375)
    u = torch.rand(2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(a.timesteps / 1000, time_shift(u, math.log(shift)).float())
    family.check_weighted_loss_and_min_snr_refused(cogview, latents, 5)
    with pytest.raises(CogView4InputError, match="bypass_guidance_embedding"):
        cogview.make_noisy_batch(latents, TrainConfig(bypass_guidance_embedding=True), None)
    with pytest.raises(CogView4InputError, match="divisible"):
        cogview.make_noisy_batch(torch.zeros(1, 16, 7, 8), TrainConfig(), None)


def test_predict_is_the_velocity_the_pipeline_steps_with(cogview: CogView4Adapter) -> None:
    """One guided pipeline step: what the transformer saw and gave (cond pass), read back through
    `predict`, and the scheduler's sigmas are the shifted ones training draws from."""
    seen: list[dict[str, Any]] = []
    handle = cogview.transformer.register_forward_hook(lambda m, a, k, o: seen.append({**k, "out": o[0]}),
                                                       with_kwargs=True)
    try:
        pipe = cogview.sample_pipeline()
        pipe.set_progress_bar_config(disable=True)
        pipe(prompt="a red circle", negative_prompt="blurry", height=64, width=64, num_inference_steps=1,
             guidance_scale=3.0, max_sequence_length=64, output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert len(seen) == 2  # classifier-free guidance: cond, then uncond
    cond = cogview.encode_prompts(["a red circle"])
    assert torch.equal(seen[0]["encoder_hidden_states"], cond.hidden_states)
    assert seen[0]["original_size"].tolist() == [[64.0, 64.0]] and not seen[0]["crop_coords"].any()
    x = seen[0]["hidden_states"]
    batch = NoisyBatch(x, seen[0]["timestep"], torch.zeros_like(x))
    with torch.no_grad():
        pred = cogview.predict(batch, cond)
    torch.testing.assert_close(pred, seen[0]["out"], rtol=1e-5, atol=1e-5)
    assert float(seen[0]["timestep"][0]) == pytest.approx(1000.0)  # the first step is pure noise
    latents = pipe(prompt_embeds=cond.hidden_states, negative_prompt_embeds=cogview.encode_prompts([""]).hidden_states,
                   height=64, width=64, num_inference_steps=2, output_type="latent").images
    assert cogview.decode_latents(latents)[0].size == (64, 64)


def test_a_batch_of_prompts_of_different_lengths_predicts_as_each_prompt_alone(cogview: CogView4Adapter) -> None:
    prompts = ["a red circle", "a blue square on a grey ground, " * 2]
    batch = cogview.make_noisy_batch(cogview.encode_images(family.pixels(4)), TrainConfig(), torch.Generator().manual_seed(3))
    with torch.no_grad():
        together = cogview.predict(batch, cogview.encode_prompts(prompts))
        alone = [cogview.predict(NoisyBatch(batch.noisy_latents[i : i + 1], batch.timesteps[i : i + 1],
                                            batch.target[i : i + 1]), cogview.encode_prompts([p]))
                 for i, p in enumerate(prompts)]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)
    padded = PromptEmbeds(cogview.encode_prompts(prompts).hidden_states)  # no mask: zeros are tokens too
    with torch.no_grad():
        assert (cogview.predict(batch, padded)[0] - alone[0][0]).abs().max() > 1e-4


# --- loading -----------------------------------------------------------------------------------


def test_transformer_folder_takes_its_other_parts_from_extras(
    cogview: CogView4Adapter, cogview4_model: Path, tmp_path: Path
) -> None:
    family.check_parts_from_extras(cogview, cogview4_model, make_adapter, tmp_path)


# --- end to end --------------------------------------------------------------------------------


def _job(tmp_path: Path, name: str, model_dir: Path, data: Path, **changes: Any) -> Path:
    return family.write_job(tmp_path, name, model_dir, data, {
        "model": {"arch": "cogview4"},
        "train": {"steps": 30, "batch_size": 2, "lr": 5e-3, "timestep_type": "weighted", "lr_scheduler": "constant"},
        "network": {"type": "lora", "linear": 8, "linear_alpha": 16},
        "save": {"save_every": 1000},
        "sample": {"sample_every": 15, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 3.0,
                   "prompts": ["a red circle, [trigger] style"], "seed": 5},
    }, changes)


def _render(pipe: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a red circle, shp style", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                max_sequence_length=64, generator=torch.Generator().manual_seed(3), output_type="latent").images


def _diffusers_diff(adapter: CogView4Adapter, model: Path, lora: Path) -> tuple[float, float]:
    from diffusers import CogView4Pipeline

    return family.diffusers_lora_diff(adapter, CogView4Pipeline, model, lora, _render)


def _round_trip(adapter: CogView4Adapter, model: Path, lora: Path, kind: str, **network: Any) -> float:
    return family.check_round_trip("cogview4", adapter, make_adapter(model), lora, kind, **network)


@pytest.fixture(scope="module")
def lora_run(cogview4_model: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("cogview4-lora")
    return (*family.train(_job(tmp, "cvlora", cogview4_model, shapes_dataset)), tmp)


def test_lora_trains_with_falling_loss_previews_and_file_names(lora_run: tuple) -> None:
    trainer, result, _ = lora_run
    family.check_falling_loss_and_previews(result, "cvlora")
    wrapped = trainer.network.wrapped_module_names()
    assert "transformer_blocks.1.attn1.to_q" in wrapped and "proj_out" in wrapped
    family.check_folded_lora_file(trainer, result.final_lora, "cogview4/lora", "cogview4", prefix="diffusion_model.",
                                  weight_names=("lora_A", "lora_B"))


def test_lora_converted_for_diffusers_loads_exactly(lora_run: tuple, cogview4_model: Path) -> None:
    """CogView4Pipeline's LoRA loader reads the diffusers layout only (no key conversion for this
    family): `aitk convert` writes it from the comfyui file, and back again unchanged."""
    from test_tools import aitk

    trainer, result, tmp = lora_run
    converted = family.diffusers_layout_round_trip(result.final_lora, "cogview4", tmp)
    diff, effect = _diffusers_diff(trainer.adapter, cogview4_model, converted)
    print(f"cogview4 lora: diffusers max abs diff {diff:.3g}, LoRA effect {effect:.3g}")
    record("cogview4", "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="diffusers")
    assert effect > 1e-3 and diff < 1e-4, (diff, effect)


def test_merge_round_trip_and_lora_info_know_cogview4(lora_run: tuple, cogview4_model: Path) -> None:
    from diffusers import CogView4Transformer2DModel

    trainer, result, tmp = lora_run
    bare = tmp / "no_header.safetensors"  # a copy without a header: guessed from its key names
    assert family.check_lora_info(trainer, result.final_lora, "cogview4", tmp)["architecture"] == "cogview4"
    pixart_like = {"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(1),
                   "transformer.transformer_blocks.0.attn2.to_q.lora_A.weight": torch.zeros(1)}
    assert CogView4Adapter.matches_lora_keys(load_file(str(bare))) and not CogView4Adapter.matches_lora_keys(pixart_like)
    adapter = trainer.adapter
    family.check_merge("cogview4", adapter, cogview4_model, result.final_lora, tmp, CogView4Transformer2DModel)
    _round_trip(adapter, cogview4_model, result.final_lora, "lora", linear_rank=8)


def test_dora_saved_for_diffusers_loads_exactly(cogview4_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, "cvdora", cogview4_model, shapes_dataset, **family.DORA_RUN)
    trainer, result = family.train(job)
    family.check_dora_loads_in_diffusers("cogview4", trainer, result, "cvdora",
                                         lambda adapter, lora: _diffusers_diff(adapter, cogview4_model, lora))


def test_lokr_with_cached_text_loads_back_exactly(cogview4_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    """LoKr with cached text embeddings (encoder released; previews from the cache); the file
    reads back exactly into a fresh network by aitk's loader."""
    job = _job(tmp_path, "cvlokr", cogview4_model, shapes_dataset, **family.CACHED_TEXT_LOKR_RUN)
    trainer, result = family.train(job)
    family.check_cached_text_lokr_run(trainer, result, "cvlokr", 6, "diffusion_model.")
    trainer.adapter.text_encoder = make_adapter(cogview4_model).text_encoder  # _round_trip encodes a prompt
    trainer.adapter._text_pipe = None
    _round_trip(trainer.adapter, cogview4_model, result.final_lora, "lokr", linear_rank=2, lokr_factor=-1)


def test_quantized_base_trains_a_full_precision_lora(cogview4_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    """qint8 base (torchao): the LoRA trains on it and its file changes the plain model in diffusers."""
    job = _job(tmp_path, "cvq", cogview4_model, shapes_dataset, **family.QUANTIZED_RUN)
    trainer, result = family.train(job)
    family.finite_run(result, "cvq")
    family.check_quantized_base(trainer, every=False)
    from diffusers import CogView4Pipeline

    converted = family.converted_file(result.final_lora, "diffusers", "cogview4", tmp_path / "cvq_diffusers.safetensors")
    family.check_lora_changes_pipeline(CogView4Pipeline.from_pretrained(cogview4_model), converted, _render)
