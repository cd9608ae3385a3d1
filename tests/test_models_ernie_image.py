"""ERNIE-Image on the tiny random-init model of the real classes: the pipeline's Mistral 3 encoding,
latents and velocity, the flow-matching objective with ai-toolkit's fixed shift, batches of prompts
of different lengths, where parts load from, and runs whose files load in diffusers exactly (LoRA in
the diffusers layout, DoRA), LoKr through aitk's own loader, a quantized base, the tools, the plan config
and the UI preset.

Everything runs offline on CPU in fp32 with 64 px images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from aitk.config.schema import ModelConfig, TrainConfig
from aitk.models.base import ModelLoadError, NoisyBatch, PromptEmbeds
from aitk.models.ernie_image import TRAIN_SHIFT, ErnieImageAdapter, ErnieImageInputError, build_tiny_ernie_image
from aitk.models.flow_matching import time_shift
import family_checks as family
from interop_results import record
from upstream_jobs import extras_on_path  # noqa: F401 - autouse fixture: torchao for model.quantize

CPU = torch.device("cpu")
PROMPTS = ["a red circle", "a blue square on a grey ground"]


@pytest.fixture(scope="session")
def ernie_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_ernie_image(tmp_path_factory.mktemp("ernie-model") / "tiny-ernie-image")


def make_adapter(folder: Path | str, **model_fields: Any) -> ErnieImageAdapter:
    return family.load_adapter(ErnieImageAdapter, folder, "ernie_image", **model_fields)


@pytest.fixture(scope="session")
def ernie(ernie_model: Path) -> ErnieImageAdapter:
    return make_adapter(ernie_model)


# --- the model ---------------------------------------------------------------------------------


def test_tiny_model_loads_as_the_real_pipeline(ernie_model: Path) -> None:
    from diffusers import ErnieImagePipeline

    size = sum(p.stat().st_size for p in ernie_model.rglob("*") if p.is_file())
    assert size < 10 * 2**20, size
    pipe = ErnieImagePipeline.from_pretrained(ernie_model)
    assert type(pipe.text_encoder).__name__ == "Mistral3Model" and type(pipe.vae).__name__ == "AutoencoderKLFlux2"
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a").input_ids) == ["<s>", "a"]
    assert build_tiny_ernie_image(ernie_model) == ernie_model  # kept, not rebuilt


def test_load_facts(ernie: ErnieImageAdapter) -> None:
    for module in (ernie.transformer, ernie.vae, ernie.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())
    assert ernie.text_encoder.vision_tower is None  # text-only prompts
    assert ernie.max_sequence_length == 64  # the tiny tokenizer's length caps the default 512
    assert ernie.scheduler_config["shift"] == 4.0 and not ernie.scheduler_config["use_dynamic_shifting"]
    assert ernie.vae_scale_factor == 16 and ErnieImageAdapter.bucket_divisibility == 16
    candidates = ernie.network_candidates(False)
    assert candidates and all(name.startswith("layers.") for name in candidates)
    assert {"layers.1.self_attention.to_q", "layers.0.mlp.linear_fc2"} <= set(candidates)
    assert ernie.offload_blocks(ernie.transformer) == list(ernie.transformer.layers)
    assert ernie.lora_key_stem("layers.0.self_attention.to_q") == "diffusion_model.layers.0.self_attention.to_q"


def test_encode_prompts_is_the_pipeline_encoding(ernie: ErnieImageAdapter, ernie_model: Path) -> None:
    from diffusers import ErnieImagePipeline

    cond = ernie.encode_prompts(PROMPTS)
    short = ernie.encode_prompts(PROMPTS[:1])
    # <s> + one token per byte: each prompt alone, the shorter right-padded with zeros under the mask
    assert cond.hidden_states.shape == (2, 31, 16) and cond.extra["mask"].sum(1).tolist() == [13, 31]
    assert torch.equal(cond.hidden_states[0, :13], short.hidden_states[0]) and not cond.hidden_states[0, 13:].any()
    pipe = ErnieImagePipeline.from_pretrained(ernie_model)
    for i, want in enumerate(pipe.encode_prompt(PROMPTS, CPU)):
        torch.testing.assert_close(cond.hidden_states[i, : want.shape[0]], want, rtol=0, atol=1e-6)
    # a limit cuts the hidden states: the causal text model gives what the cut prompt gives
    cut = make_adapter(ernie_model, model_kwargs={"max_sequence_length": 6}).encode_prompts(PROMPTS[1:])
    torch.testing.assert_close(cut.hidden_states[0], pipe.encode_prompt(PROMPTS[1][:5], CPU)[0], rtol=0, atol=1e-6)


def test_latents_are_the_pipelines_normalised_patches(ernie: ErnieImageAdapter) -> None:
    from diffusers import ErnieImagePipeline

    pixels = family.pixels(1)
    latents = ernie.encode_images(pixels)
    assert latents.shape == (2, 32, 4, 4) and torch.equal(latents, ernie.encode_images(pixels))
    with torch.no_grad():
        raw = ernie.vae.encode(pixels).latent_dist.mode()
    bn = ernie.vae.bn
    patches = ErnieImagePipeline._patchify_latents(raw)
    mean, std = bn.running_mean.view(1, -1, 1, 1), torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-5)
    torch.testing.assert_close(latents, (patches - mean) / std, rtol=1e-5, atol=1e-5)
    config_eps = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + ernie.vae.config.batch_norm_eps)
    assert ((patches - mean) / config_eps - latents).abs().max() > 1e-3  # the pipeline's eps, not the config's
    with torch.no_grad():
        torch.testing.assert_close(ernie._decode_pixels(latents), ernie.vae.decode(raw).sample, rtol=1e-4, atol=1e-4)


# --- the objective -----------------------------------------------------------------------------


def test_noisy_batch_is_rectified_flow_with_the_fixed_shift(ernie: ErnieImageAdapter) -> None:
    latents = ernie.encode_images(family.pixels(1))
    a = ernie.make_noisy_batch(latents, TrainConfig(timestep_type="shift"), torch.Generator().manual_seed(5))
    s = (a.timesteps / 1000).view(-1, 1, 1, 1)
    noise = (a.noisy_latents - (1 - s) * latents) / s
    torch.testing.assert_close(a.target, noise - latents, rtol=1e-4, atol=1e-4)
    u = torch.rand(2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(a.timesteps / 1000, time_shift(u, math.log(TRAIN_SHIFT)).float())
    family.check_weighted_loss_and_min_snr_refused(ernie, latents, 5)
    with pytest.raises(ErnieImageInputError, match="bypass_guidance_embedding"):
        ernie.make_noisy_batch(latents, TrainConfig(bypass_guidance_embedding=True), None)


def test_predict_is_the_velocity_the_pipeline_steps_with(ernie: ErnieImageAdapter) -> None:
    """One guided preview step at 72 px (floored to 64): what the transformer saw and gave on the
    cond half, read back through `predict`."""
    seen: list[dict[str, Any]] = []
    handle = ernie.transformer.register_forward_hook(lambda m, a, k, o: seen.append({**k, "out": o[0]}),
                                                     with_kwargs=True)
    try:
        pipe = ernie.sample_pipeline()
        pipe.set_progress_bar_config(disable=True)
        pipe(prompt=PROMPTS[0], negative_prompt="blurry", height=72, width=72, num_inference_steps=1,
             guidance_scale=3.0, output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert len(seen) == 1  # uncond and cond in one batch
    cond = ernie.encode_prompts([PROMPTS[0]])
    x = seen[0]["hidden_states"][1:]
    assert x.shape == (1, 32, 4, 4) and seen[0]["text_lens"].tolist() == [7, 13]  # "blurry", the prompt
    torch.testing.assert_close(seen[0]["text_bth"][1], cond.hidden_states[0])
    assert float(seen[0]["timestep"][0]) == pytest.approx(1000.0)  # the first step is pure noise
    with torch.no_grad():
        pred = ernie.predict(NoisyBatch(x, seen[0]["timestep"][1:], torch.zeros_like(x)), cond)
    torch.testing.assert_close(pred, seen[0]["out"][1:], rtol=1e-5, atol=1e-5)
    latents = pipe(**ernie.preview_prompt_kwargs(cond, ernie.encode_prompts([""])), height=64, width=64,
                   num_inference_steps=2, guidance_scale=1.0, output_type="latent").images
    assert ernie.decode_latents(latents)[0].size == (64, 64)


def test_a_batch_of_prompts_of_different_lengths_predicts_as_each_prompt_alone(ernie: ErnieImageAdapter) -> None:
    batch = family.noisy_batch(ernie, 4)
    with torch.no_grad():
        together = ernie.predict(batch, ernie.encode_prompts(PROMPTS))
        alone = [ernie.predict(NoisyBatch(batch.noisy_latents[i : i + 1], batch.timesteps[i : i + 1],
                                          batch.target[i : i + 1]), ernie.encode_prompts([p]))
                 for i, p in enumerate(PROMPTS)]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)
    padded = PromptEmbeds(ernie.encode_prompts(PROMPTS).hidden_states)  # no mask: zeros are tokens too
    with torch.no_grad():
        assert (ernie.predict(batch, padded)[0] - alone[0][0]).abs().max() > 1e-4


# --- loading -----------------------------------------------------------------------------------


def test_transformer_only_sources_take_their_other_parts_from_extras(
    ernie: ErnieImageAdapter, ernie_model: Path, tmp_path: Path
) -> None:
    import shutil

    only = tmp_path / "finetune"
    shutil.copytree(ernie_model / "transformer", only / "transformer")
    with pytest.raises(ModelLoadError, match="extras_name_or_path"):
        make_adapter(only)
    single = tmp_path / "ernie_image.safetensors"
    save_file(ernie.transformer.state_dict(), str(single))
    want = ernie.transformer.state_dict()
    for source in (only, only / "transformer", single):
        adapter = make_adapter(source, extras_name_or_path=str(ernie_model))
        got = adapter.transformer.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), source
        assert adapter.text_encoder is not None and adapter.latent_space_id() == ernie.latent_space_id()
    with pytest.raises(ModelLoadError, match="model.name_or_path.*neither"):
        make_adapter(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="no .safetensors"):
        make_adapter(tmp_path / "notes.txt")


# --- end to end --------------------------------------------------------------------------------


def _job(tmp_path: Path, name: str, model_dir: Path, data: Path, **changes: Any) -> Path:
    return family.write_job(tmp_path, name, model_dir, data, {
        "model": {"arch": "ernie_image"},
        "train": {"steps": 30, "batch_size": 2, "lr": 5e-3, "timestep_type": "weighted", "lr_scheduler": "constant"},
        "network": {"type": "lora", "linear": 8, "linear_alpha": 16},
        "sample": {"sample_every": 15, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 4.0,
                   "prompts": ["a red circle, [trigger] style"], "seed": 5},
    }, changes)


def _render(pipe: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a red circle, shp style", height=64, width=64, num_inference_steps=2, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(3), output_type="latent").images


def _diffusers_diff(adapter: ErnieImageAdapter, model: Path, lora: Path) -> tuple[float, float]:
    from diffusers import ErnieImagePipeline

    return family.diffusers_lora_diff(adapter, ErnieImagePipeline, model, lora, _render)


def _round_trip(adapter: ErnieImageAdapter, model: Path, lora: Path, kind: str, **network: Any) -> float:
    fresh = make_adapter(model)
    return family.check_round_trip("ernie_image", adapter, fresh, lora, kind, batch=family.noisy_batch(adapter, 2),
                                   cond=fresh.encode_prompts(PROMPTS), **network)


@pytest.fixture(scope="module")
def lora_run(ernie_model: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("ernie-lora")
    return (*family.train(_job(tmp, "elora", ernie_model, shapes_dataset)), tmp)


def test_lora_trains_with_falling_loss_previews_and_comfyui_names(lora_run: tuple) -> None:
    trainer, result, _ = lora_run
    family.check_falling_loss_and_previews(result, "elora")
    assert trainer.network.wrapped_module_names() == trainer.adapter.network_candidates(False)

    family.check_folded_lora_file(trainer, result.final_lora, "ernie-image/lora", "ernie_image", prefix="diffusion_model.",
                           weight_names=("lora_A", "lora_B"))


def test_lora_converted_for_diffusers_loads_exactly(lora_run: tuple, ernie_model: Path) -> None:
    """ErnieImagePipeline's LoRA loader renames `diffusion_model.` keys but refuses any key without
    "lora" in it, so the comfyui file's `.alpha` keys stop it (ai-toolkit's own files have no alpha:
    alpha = rank); the diffusers layout `aitk convert` writes (alphas in its metadata) loads exactly."""
    from diffusers import ErnieImagePipeline

    trainer, result, tmp = lora_run
    ErnieImagePipeline.from_pretrained(ernie_model).load_lora_weights(str(result.final_lora))  # no .alpha: loads
    converted = family.diffusers_layout_round_trip(result.final_lora, "ernie_image", tmp)
    diff, effect = _diffusers_diff(trainer.adapter, ernie_model, converted)
    print(f"ernie_image lora: diffusers max abs diff {diff:.3g}, LoRA effect {effect:.3g}")
    record("ernie_image", "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="diffusers")
    assert effect > 1e-3 and diff < 1e-4, (diff, effect)
    folded = tmp / "elora_no_alpha.safetensors"  # ai-toolkit's layout: alpha / rank folded into lora_B
    save_file(family.alpha_folded(load_file(str(result.final_lora))), str(folded))
    diff, effect = _diffusers_diff(trainer.adapter, ernie_model, folded)
    record("ernie_image", "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="comfyui",
           note="alpha folded into lora_B (ai-toolkit's layout)")
    assert effect > 1e-3 and diff < 1e-4, (diff, effect)


def test_merge_round_trip_and_lora_info_know_ernie_image(lora_run: tuple, ernie_model: Path) -> None:
    from diffusers import ErnieImageTransformer2DModel

    trainer, result, tmp = lora_run
    bare = tmp / "no_header.safetensors"  # a copy without a header: guessed from its key names
    assert family.check_lora_info(trainer, result.final_lora, "ernie_image", tmp)["architecture"] == "ernie_image"
    zimage_like = {"diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.zeros(1)}
    assert ErnieImageAdapter.matches_lora_keys(load_file(str(bare)))
    assert not ErnieImageAdapter.matches_lora_keys(zimage_like)
    adapter = trainer.adapter
    batch = family.noisy_batch(adapter, 1)
    cond = adapter.encode_prompts(PROMPTS)
    family.check_merge("ernie_image", adapter, ernie_model, result.final_lora, tmp, ErnieImageTransformer2DModel,
                       batch, cond)
    _round_trip(adapter, ernie_model, result.final_lora, "lora", linear_rank=8)


def test_dora_saved_for_diffusers_loads_exactly(ernie_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, "edora", ernie_model, shapes_dataset, **family.DORA_RUN)
    trainer, result = family.train(job)
    family.check_dora_loads_in_diffusers("ernie_image", trainer, result, "edora",
                                         lambda adapter, lora: _diffusers_diff(adapter, ernie_model, lora))


def test_lokr_with_cached_text_loads_back_exactly(ernie_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    """LoKr with cached text embeddings (encoder released; previews from the cache, prompts of
    every length with their masks); the file reads back exactly into a fresh network."""
    job = _job(tmp_path, "elokr", ernie_model, shapes_dataset, **family.CACHED_TEXT_LOKR_RUN)
    trainer, result = family.train(job)
    family.check_cached_text_lokr_run(trainer, result, "elokr", 6, "diffusion_model.layers.")
    trainer.adapter.text_encoder = make_adapter(ernie_model).text_encoder  # _round_trip encodes prompts
    trainer.adapter._text_pipe = None
    _round_trip(trainer.adapter, ernie_model, result.final_lora, "lokr", linear_rank=2, lokr_factor=-1)


def test_quantized_base_trains_a_full_precision_lora(ernie_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    """qint8 base (torchao): the LoRA trains on it and its file changes the plain model in diffusers."""
    from diffusers import ErnieImagePipeline

    job = _job(tmp_path, "eq", ernie_model, shapes_dataset, **family.QUANTIZED_RUN)
    trainer, result = family.train(job)
    family.finite_run(result, "eq")
    family.check_quantized_base(trainer)
    converted = family.converted_file(result.final_lora, "diffusers", "ernie_image", tmp_path / "eq_diffusers.safetensors")
    family.check_lora_changes_pipeline(ErnieImagePipeline.from_pretrained(ernie_model), converted, _render)


# --- plan and preset ---------------------------------------------------------------------------


def test_shipped_plan_config_builds_the_real_sizes() -> None:
    """`aitk plan` of baidu/ERNIE-Image (and -Turbo) reads the published configs shipped with aitk:
    on the meta device they build the 8B transformer and the Ministral 3 encoder, and the adapter
    bound to them gives the trainer's shapes (tests/test_plan.py checks the step memory)."""
    from aitk.plan.build import build_on_meta
    from aitk.plan.sources import model_spec

    spec = model_spec("baidu/ERNIE-Image", "ernie_image")
    assert model_spec("baidu/ERNIE-Image-Turbo", "ernie_image").label == spec.label
    parts = {name: build_on_meta(spec.parts[name]) for name in ("transformer", "text_encoder")}
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    assert 8.0e9 < count["transformer"] < 8.1e9 and 3.8e9 < count["text_encoder"] < 3.9e9, count
    adapter = ErnieImageAdapter(ModelConfig(name_or_path="baidu/ERNIE-Image", arch="ernie_image"), CPU, torch.bfloat16)
    adapter.bind({"transformer": parts["transformer"]}, spec.configs({}))
    with torch.device("meta"):
        batch, cond = adapter.example_batch(1, (1024, 768), 1, expert="main", with_controls=False)
    assert batch.noisy_latents.shape == (1, 128, 48, 64) and cond.hidden_states.shape == (1, 512, 3072)
    assert adapter.scheduler_config["shift"] == 4.0


def test_preset_validates_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    family.check_preset_validates_clean("ernie_image", tmp_path, capsys)
