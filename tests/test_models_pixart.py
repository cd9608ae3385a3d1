"""PixArt-alpha and PixArt-Sigma on tiny random-init models of the real classes: the pipelines' text
encoding and noise prediction (learned sigma, alpha's size conditioning after resolution binning),
the DDPM objective, and runs whose LoRA files load as ComfyUI maps them (the PixArt pipelines have
no LoRA loader in diffusers), DoRA and LoKr, a quantized base, and the tools.

Everything runs offline on CPU in fp32 with 64 px images.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from aitk.config.schema import ModelConfig, TrainConfig
from aitk.models.base import ModelLoadError, NoisyBatch, PromptEmbeds
from aitk.models.pixart import PixArtAlphaAdapter, PixArtSigmaAdapter, binned_size, build_tiny_pixart
from aitk.models.sd.timesteps import DDPMTimestepError
import family_checks as family
from upstream_jobs import extras_on_path  # noqa: F401 - autouse fixture: torchao for model.quantize

CPU = torch.device("cpu")
ADAPTERS = {"alpha": PixArtAlphaAdapter, "sigma": PixArtSigmaAdapter}


@pytest.fixture(scope="session")
def pixart_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pixart-models")
    return {variant: build_tiny_pixart(root / variant, variant) for variant in ADAPTERS}


def make_adapter(folder: Path | str, variant: str, **model_fields: Any) -> PixArtAlphaAdapter:
    cls = ADAPTERS[variant]
    adapter = cls(ModelConfig(name_or_path=str(folder), arch=cls.arch_names[0], **model_fields), CPU, torch.float32)
    adapter.load()
    return adapter


@pytest.fixture(scope="session")
def alpha(pixart_models: dict[str, Path]) -> PixArtAlphaAdapter:
    return make_adapter(pixart_models["alpha"], "alpha")


@pytest.fixture(scope="session")
def sigma(pixart_models: dict[str, Path]) -> PixArtAlphaAdapter:
    return make_adapter(pixart_models["sigma"], "sigma")


# --- the model ---------------------------------------------------------------------------------


def test_tiny_models_load_as_the_real_pipelines(pixart_models: dict[str, Path]) -> None:
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    for variant, pipeline_class in (("alpha", PixArtAlphaPipeline), ("sigma", PixArtSigmaPipeline)):
        folder = pixart_models[variant]
        assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 10 * 2**20
        pipe = pipeline_class.from_pretrained(folder)
        assert type(pipe.text_encoder).__name__ == "T5EncoderModel"
        assert pipe.transformer.config.out_channels == 2 * pipe.transformer.config.in_channels
        assert pipe.transformer.use_additional_conditions == (variant == "alpha")
        assert build_tiny_pixart(folder, variant) == folder  # kept, not rebuilt


def test_load_facts(alpha: PixArtAlphaAdapter, sigma: PixArtAlphaAdapter) -> None:
    for adapter in (alpha, sigma):
        for module in (adapter.transformer, adapter.vae, adapter.text_encoder):
            assert not any(p.requires_grad for p in module.parameters())
        assert adapter.max_sequence_length == 32  # the tiny tokenizer's length caps 120 / 300
        assert adapter.learned_sigma and adapter.prediction_type == "epsilon"
        per_block = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                     "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
        assert adapter.network_candidates(True) == [f"transformer_blocks.{i}.{t}" for i in range(2) for t in per_block]
        assert adapter.offload_blocks(adapter.transformer) == list(adapter.transformer.transformer_blocks)
        # ComfyUI's PixArt names: transformer.<diffusers module path>, lora_A / lora_B and alpha
        assert adapter.lora_key_stem("transformer_blocks.1.attn2.to_k") == "transformer.transformer_blocks.1.attn2.to_k"
    assert alpha.size_conditioned and not sigma.size_conditioned
    assert (alpha.default_max_sequence_length, sigma.default_max_sequence_length) == (120, 300)
    assert alpha.scheduler_config["beta_schedule"] == "linear"


def test_load_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model.name_or_path.*neither"):
        make_adapter(tmp_path / "missing", "sigma")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model.name_or_path: could not load a PixArt-Sigma model"):
        make_adapter(tmp_path / "empty", "sigma")
    single = tmp_path / "pixart.safetensors"
    save_file({"x": torch.zeros(1)}, str(single))
    with pytest.raises(ModelLoadError, match="single file"):
        make_adapter(single, "alpha")


def test_encode_prompts_is_the_pipeline_encoding(sigma: PixArtAlphaAdapter, pixart_models: dict[str, Path]) -> None:
    from diffusers import PixArtSigmaPipeline

    cond = PromptEmbeds.cat([sigma.encode_prompts(["a red circle"]), sigma.encode_prompts(["a blue square on grey"])])
    assert cond.hidden_states.shape == (2, 32, 32)
    lengths = cond.extra["mask"].sum(1).tolist()
    assert lengths[0] < lengths[1] < 32
    embeds, mask, _, _ = PixArtSigmaPipeline.from_pretrained(pixart_models["sigma"]).encode_prompt(
        "a blue square on grey", do_classifier_free_guidance=False, max_sequence_length=32)
    assert torch.equal(cond.extra["mask"][1:], mask), (cond.extra["mask"], mask)
    torch.testing.assert_close(cond.hidden_states[1:], embeds.detach(), rtol=1e-5, atol=1e-5)


# --- the objective -----------------------------------------------------------------------------


def test_noisy_batch_is_ddpm_on_the_models_schedule(sigma: PixArtAlphaAdapter, pixart_models: dict[str, Path]) -> None:
    latents = sigma.encode_images(family.pixels(1))
    assert latents.shape == (2, 4, 8, 8)
    batch = sigma.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(5))
    assert batch.timesteps.dtype == torch.int64
    ac = sigma.noise_scheduler.alphas_cumprod[batch.timesteps].view(-1, 1, 1, 1)
    # the target is the noise that made the noisy latents from the clean ones
    torch.testing.assert_close(batch.noisy_latents, ac.sqrt() * latents + (1 - ac).sqrt() * batch.target)
    g = torch.Generator().manual_seed(5)
    torch.testing.assert_close(batch.target, torch.randn(latents.shape, generator=g))
    v = make_adapter(pixart_models["sigma"], "sigma", is_v_pred=True)
    vb = v.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(5))
    torch.testing.assert_close(vb.target, ac.sqrt() * batch.target - (1 - ac).sqrt() * latents)
    weighted = sigma.make_noisy_batch(latents, TrainConfig(min_snr_gamma=5.0), torch.Generator().manual_seed(5))
    snr = ac.flatten() / (1 - ac.flatten())
    torch.testing.assert_close(weighted.loss_weights, (snr.clamp(max=5.0) / snr).float())
    with pytest.raises(DDPMTimestepError, match="train.timestep_type"):
        sigma.make_noisy_batch(latents, TrainConfig(timestep_type="weighted"), None)


def test_size_conditioning_is_the_binned_bucket(alpha: PixArtAlphaAdapter) -> None:
    assert binned_size(64, 64, 128) == (1024, 1024)
    assert binned_size(512, 1024, 128) == (704, 1408)  # the 1024 bins' 0.5 ratio
    conditions = alpha.size_conditions(2, 48, 96)  # a 384 x 768 bucket
    assert conditions["resolution"].tolist() == [[704.0, 1408.0]] * 2
    torch.testing.assert_close(conditions["aspect_ratio"], torch.full((2, 1), 704 / 1408))


@pytest.mark.parametrize("variant", ["alpha", "sigma"])
def test_predict_is_the_noise_prediction_the_pipeline_steps_with(variant: str, request: Any) -> None:
    """One pipeline step at a bin size (the size conditioning is then the pipeline's too): what the
    transformer saw, read back through `predict`, gives the noise half of its output."""
    adapter = request.getfixturevalue(variant)
    seen: dict[str, Any] = {}

    def hook(_module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        seen.update(x=args[0], t=kwargs["timestep"], out=output[0], added=kwargs["added_cond_kwargs"])

    handle = adapter.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe = adapter.sample_pipeline()
        pipe.set_progress_bar_config(disable=True)
        pipe(prompt="a red circle", height=704, width=1408, num_inference_steps=1, guidance_scale=1.0,
             output_type="latent", generator=torch.Generator().manual_seed(0), **adapter.preview_kwargs(None))
    finally:
        handle.remove()
    if variant == "alpha":
        assert seen["added"]["resolution"].tolist() == [[704.0, 1408.0]]  # the 1024 bins' 0.5 ratio
    cond = adapter.encode_prompts(["a red circle"])
    x = seen["x"]
    with torch.no_grad():
        pred = adapter.predict(NoisyBatch(x, seen["t"], torch.zeros_like(x)), cond)
    torch.testing.assert_close(pred, seen["out"][:, :4], rtol=1e-5, atol=1e-5)
    assert seen["out"].shape[1] == 8 and pred.shape == x.shape


# --- training runs -----------------------------------------------------------------------------


def _job(tmp_path: Path, name: str, model_dir: Path, data: Path, arch: str, **changes: Any) -> Path:
    return family.write_job(tmp_path, name, model_dir, data, {
        "model": {"arch": arch},
        "train": {"steps": 30, "batch_size": 2, "lr": 5e-3, "lr_scheduler": "constant"},
        "network": {"type": "lora", "linear": 8, "linear_alpha": 16},
        "save": {"save_every": 1000},
        "sample": {"sample_every": 15, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 4.5,
                   "prompts": ["a red circle, [trigger] style"], "neg": "blurry", "seed": 5},
    }, changes)


def _render(pipe: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a red circle, shp style", height=64, width=64, num_inference_steps=2, guidance_scale=4.5,
                clean_caption=False, use_resolution_binning=False, max_sequence_length=32,
                generator=torch.Generator().manual_seed(3), output_type="latent").images


def load_as_comfyui_maps(transformer: torch.nn.Module, path: Path) -> None:
    """Put the LoRA file on `transformer` as ComfyUI reads it: each `transformer.<module path>`
    key stem names that module, up = lora_B, down = lora_A, scale alpha / rank; here as a peft
    adapter with each module's rank and alpha (the PixArt pipelines have no LoRA loader)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    tensors = load_file(str(path))
    modules = sorted(k[len("transformer."):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))
    assert modules and all(k.startswith("transformer.") for k in tensors)
    ranks = {re.escape(m): int(tensors[f"transformer.{m}.lora_A.weight"].shape[0]) for m in modules}
    alphas = {re.escape(m): float(tensors[f"transformer.{m}.alpha"]) for m in modules}
    config = LoraConfig(r=8, lora_alpha=8, target_modules=modules, rank_pattern=ranks, alpha_pattern=alphas)
    inject_adapter_in_model(config, transformer)
    state = {f"{m}.lora_{ab}.weight": tensors[f"transformer.{m}.lora_{ab}.weight"] for m in modules for ab in "AB"}
    result = set_peft_model_state_dict(transformer, state)
    assert not [k for k in result.unexpected_keys if "lora_" in k]


def _comfyui_diff(adapter: PixArtAlphaAdapter, model: Path, variant: str, lora: Path) -> tuple[float, float]:
    """(max |ours - the file put on a fresh model as ComfyUI maps it|, max |ours - the plain model|)."""
    adapter.denoiser().eval()
    ours = _render(adapter.sample_pipeline())
    fresh = make_adapter(model, variant)
    base = _render(fresh.sample_pipeline())
    load_as_comfyui_maps(fresh.transformer, lora)
    return float((ours - _render(fresh.sample_pipeline())).abs().max()), float((ours - base).abs().max())


def _round_trip(adapter: PixArtAlphaAdapter, model: Path, variant: str, lora: Path, kind: str, **network: Any) -> None:
    family.check_round_trip(adapter.arch_names[0], adapter, make_adapter(model, variant), lora, kind,
                            layout="comfyui", **network)


@pytest.fixture(scope="module")
def lora_run(pixart_models: dict[str, Path], shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("pixart-lora")
    return (*family.train(_job(tmp, "plora", pixart_models["alpha"], shapes_dataset, "pixart")), tmp)


def test_lora_trains_with_falling_loss_previews_and_comfyui_names(lora_run: tuple) -> None:
    trainer, result, _ = lora_run
    family.check_falling_loss_and_previews(result, "plora")
    assert trainer.network.wrapped_module_names() == trainer.adapter.network_candidates(False)
    family.check_lora_file(trainer, result.final_lora, "pixart-alpha/lora", "pixart", prefix="transformer.",
                           weight_names=("lora_A", "lora_B"))


def test_lora_loads_exactly_as_comfyui_maps_it(lora_run: tuple, pixart_models: dict[str, Path]) -> None:
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    assert not hasattr(PixArtAlphaPipeline, "load_lora_weights") and not hasattr(PixArtSigmaPipeline, "load_lora_weights")
    trainer, result, _ = lora_run
    diff, effect = _comfyui_diff(trainer.adapter, pixart_models["alpha"], "alpha", result.final_lora)
    assert effect > 1e-3 and diff < 1e-4, (diff, effect)


def test_tools_know_pixart(lora_run: tuple, pixart_models: dict[str, Path]) -> None:
    from diffusers import PixArtTransformer2DModel

    from test_tools import aitk

    trainer, result, tmp = lora_run
    info = family.lora_info(result.final_lora)
    assert info["architecture"] == "pixart" and info["modules"] == len(trainer.network.wrapped_module_names())
    family.diffusers_layout_round_trip(result.final_lora, "pixart", tmp)
    adapter = trainer.adapter
    family.check_merge("pixart", adapter, pixart_models["alpha"], result.final_lora, tmp, PixArtTransformer2DModel)
    _round_trip(adapter, pixart_models["alpha"], "alpha", result.final_lora, "lora", linear_rank=8)


def test_dora_and_lokr_on_sigma_with_cached_text(pixart_models: dict[str, Path], shapes_dataset: Path, tmp_path: Path) -> None:
    """Sigma with cached text embeddings and the encoder released (previews from the cache): a DoRA
    and a LoKr run whose files aitk reads back exactly."""
    model = pixart_models["sigma"]
    for kind, network in (("dora", {"dora": True, "linear": 4, "linear_alpha": 8}),
                          ("lokr", {"type": "lokr", "linear": 2, "linear_alpha": 4, "lokr_factor": -1})):
        (tmp_path / kind).mkdir()
        job = _job(tmp_path / kind, f"s{kind}", model, shapes_dataset, "pixart_sigma", network=network,
                   train={"steps": 6, "cache_text_embeddings": True}, sample={"sample_every": 6})
        trainer, result = family.train(job)
        family.finite_run(result, f"s{kind}")
        assert trainer.adapter.text_encoder is None
        assert sorted(p.name for p in (result.output_dir / "samples").iterdir()) == ["000000000_0.jpg", "000000006_0.jpg"]
        tensors = load_file(str(result.final_lora))
        assert tensors and all(k.startswith("transformer.transformer_blocks.") for k in tensors)
        rank = {"linear_rank": network["linear"]}
        _round_trip(trainer.adapter, model, "sigma", result.final_lora, kind, **rank)


def test_quantized_base_trains(pixart_models: dict[str, Path], shapes_dataset: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, "pq", pixart_models["sigma"], shapes_dataset, "pixart_sigma", train={"steps": 6},
               sample={"sample_every": 1000}, model={"quantize": True, "qtype": "qint8"})
    trainer, result = family.train(job)
    family.finite_run(result, "pq")
    family.check_quantized_base(trainer)
    fresh = make_adapter(pixart_models["sigma"], "sigma")
    before = _render(fresh.sample_pipeline())
    load_as_comfyui_maps(fresh.transformer, result.final_lora)
    assert (_render(fresh.sample_pipeline()) - before).abs().max() > 1e-4


def test_preset_and_corpus_job_validate_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from aitk.config.validate import validate_command

    job, path = family.check_preset_validates_clean("pixart_sigma", tmp_path, capsys)
    # a flow-matching setting on a DDPM model is refused before anything loads
    job["config"]["process"][0]["train"]["noise_scheduler"] = "flowmatch"
    path.write_text(yaml.safe_dump(job))
    validate_command([str(path)])
    printed = capsys.readouterr()
    assert "noise_scheduler" in printed.out + printed.err, printed


@pytest.mark.parametrize(("hub_id", "arch", "tokens"), [("PixArt-alpha/PixArt-XL-2-1024-MS", "pixart", 120),
                                                         ("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "pixart_sigma", 300)])
def test_shipped_plan_configs_build_the_real_sizes(hub_id: str, arch: str, tokens: int) -> None:
    """`aitk plan` reads the published configs shipped with aitk: on the meta device they build the
    0.6B transformer and T5-XXL's 4.8B encoder, and the bound adapter gives the trainer's shapes."""
    from aitk.plan.build import build_on_meta
    from aitk.plan.sources import model_spec

    spec = model_spec(hub_id, arch)
    parts = {name: build_on_meta(spec.parts[name]) for name in ("transformer", "text_encoder")}
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    assert 0.6e9 < count["transformer"] < 0.62e9 and 4.7e9 < count["text_encoder"] < 4.8e9, count
    cls = ADAPTERS["alpha" if arch == "pixart" else "sigma"]
    adapter = cls(ModelConfig(name_or_path=hub_id, arch=arch), CPU, torch.bfloat16)
    adapter.bind({"transformer": parts["transformer"]}, spec.configs({}))
    assert adapter.size_conditioned == (arch == "pixart") and adapter.learned_sigma
    with torch.device("meta"):
        batch, cond = adapter.example_batch(1, (1024, 768), 1, expert="main", with_controls=False)
    assert batch.noisy_latents.shape == (1, 4, 96, 128) and cond.hidden_states.shape == (1, tokens, 4096)
