"""Z-Image on the tiny random-init model of the real classes: the pipeline's text encoding and
velocity, the flow-matching objective with ai-toolkit's fixed shift, where parts load from
(De-Turbo's transformer-only repo with extras_name_or_path, a single file), the Turbo training
adapter (on while training, off for previews), and runs whose files load in diffusers exactly
(LoRA in both layouts, DoRA), LoKr, a quantized base, and the tools.

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
from aitk.models.flow_matching import FlowMatchingConfigError, time_shift
from aitk.models.zimage import TRAIN_SHIFT, ZImageAdapter, ZImageInputError, build_tiny_zimage
import family_checks as family
from interop_results import record
from upstream_jobs import extras_on_path  # noqa: F401 - autouse fixture: torchao for model.quantize

CPU = torch.device("cpu")
#: a random LoRA standing in for ostris/zimage_turbo_training_adapter: a trained-network target,
#: a refiner layer and a modulation layer only the assistant has
ASSISTANT_MODULES = ["layers.0.attention.to_q", "noise_refiner.0.feed_forward.w1", "context_refiner.0.attention.to_v"]


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def zimage_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_zimage(tmp_path_factory.mktemp("zimage-model") / "tiny-zimage")


def make_adapter(folder: Path | str, **model_fields: Any) -> ZImageAdapter:
    return family.load_adapter(ZImageAdapter, folder, "zimage", **model_fields)


@pytest.fixture(scope="session")
def turbo(zimage_model: Path) -> ZImageAdapter:
    return make_adapter(zimage_model)


def write_assistant(model: Path, path: Path) -> Path:
    """A random LoRA (rank 2, alpha 4) for the tiny transformer in ComfyUI's names, as ai-toolkit
    publishes its training adapters (`diffusion_model.<module>.lora_A.weight`)."""
    from diffusers import ZImageTransformer2DModel

    from aitk.networks.export import save_lora
    from aitk.networks.lora import inject_network

    transformer = ZImageTransformer2DModel.from_pretrained(model, subfolder="transformer")
    handle = inject_network(transformer, linear_rank=2, linear_alpha=4, candidates=ASSISTANT_MODULES, seed=3)
    family.randomize(handle, seed=4)
    return save_lora(path, handle, save_format="comfyui", prefix="diffusion_model.", dtype=torch.float32,
                     weight_names=("lora_A", "lora_B"))


# --- the model ---------------------------------------------------------------------------------


def test_tiny_model_loads_as_the_real_pipeline(zimage_model: Path) -> None:
    from diffusers import ZImagePipeline

    size = sum(p.stat().st_size for p in zimage_model.rglob("*") if p.is_file())
    assert size < 10 * 2**20, size
    pipe = ZImagePipeline.from_pretrained(zimage_model)
    assert type(pipe.text_encoder).__name__ == "Qwen3Model" and type(pipe.tokenizer).__name__ == "Qwen2Tokenizer"
    assert build_tiny_zimage(zimage_model) == zimage_model  # kept, not rebuilt
    assert ZImagePipeline.from_pretrained(zimage_model).transformer.state_dict().keys() == \
        pipe.transformer.state_dict().keys()


def test_load_facts(turbo: ZImageAdapter) -> None:
    for module in (turbo.transformer, turbo.vae, turbo.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())
    assert turbo.max_sequence_length == 64  # the tiny tokenizer's length caps the pipeline's 512
    assert turbo.scheduler_config["shift"] == TRAIN_SHIFT and not turbo.scheduler_config["use_dynamic_shifting"]
    assert ZImageAdapter.bucket_divisibility == 16 and not turbo.uses_controls
    names = turbo.network_candidates(False)
    per_layer = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")
    assert names == [f"layers.{i}.{t}" for i in range(2) for t in per_layer]
    blocks = turbo.offload_blocks(turbo.transformer)  # in the order they run: refiners, then layers
    t = turbo.transformer
    assert blocks == [*t.noise_refiner, *t.context_refiner, *t.layers]
    assert turbo.offload_blocks(turbo.text_encoder) == list(turbo.text_encoder.layers)


def test_lora_key_names_are_comfyuis(turbo: ZImageAdapter) -> None:
    """ComfyUI maps Z-Image LoRA keys `diffusion_model.<diffusers module path>` for every Linear of
    the transformer (comfy.utils.z_image_to_diffusers: attention q / k / v into slices of the fused
    qkv, out, feed-forward, AdaLN modulation of each block, and the embedders / final layer)."""
    from aitk.networks.lora import eligible_modules

    block = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
             "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    t = turbo.transformer
    comfy = {f"{group}.{i}.{name}" for group, n in (("layers", 2), ("noise_refiner", 1), ("context_refiner", 1))
             for i in range(n) for name in block}
    comfy |= {f"{group}.{i}.adaLN_modulation.0" for group, n in (("layers", 2), ("noise_refiner", 1)) for i in range(n)}
    comfy |= {"all_x_embedder.2-1", "all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1",
              "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2"}
    assert set(eligible_modules(t)) == comfy
    assert {turbo.lora_key_stem(n) for n in comfy} == {f"diffusion_model.{n}" for n in comfy}


def test_encode_prompts_is_the_pipeline_encoding(turbo: ZImageAdapter, zimage_model: Path) -> None:
    from diffusers import ZImagePipeline

    a, b = turbo.encode_prompts(["a red circle"]), turbo.encode_prompts(["a blue square on grey"])
    cond = PromptEmbeds.cat([a, b])  # prompts of different lengths batch together
    assert cond.hidden_states.shape == (2, 64, 32) and cond.extra["mask"].dtype == torch.bool
    lengths = cond.extra["mask"].sum(1).tolist()
    assert lengths[0] < lengths[1] < 64 and not cond.hidden_states[0, lengths[0]:].any()
    embeds, _ = ZImagePipeline.from_pretrained(zimage_model).encode_prompt(
        "a blue square on grey", do_classifier_free_guidance=False, max_sequence_length=64)
    assert torch.equal(cond.hidden_states[1, : lengths[1]], embeds[0])


# --- the objective -----------------------------------------------------------------------------


def test_noisy_batch_is_rectified_flow_with_the_fixed_shift(turbo: ZImageAdapter) -> None:
    latents = turbo.encode_images(family.pixels(1))
    assert latents.shape == (2, 16, 8, 8) and torch.equal(latents, turbo.encode_images(family.pixels(1)))
    a = turbo.make_noisy_batch(latents, TrainConfig(timestep_type="shift"), torch.Generator().manual_seed(5))
    s = (a.timesteps / 1000).view(-1, 1, 1, 1)
    noise = (a.noisy_latents - (1 - s) * latents) / s
    torch.testing.assert_close(a.target, noise - latents, rtol=1e-4, atol=1e-4)
    # "shift" is ai-toolkit's fixed Z-Image shift of 3 on a uniform draw
    u = torch.rand(2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(a.timesteps / 1000, time_shift(u, math.log(TRAIN_SHIFT)).float())
    w = turbo.make_noisy_batch(latents, TrainConfig(timestep_type="weighted"), torch.Generator().manual_seed(5))
    assert w.loss_weights is not None and w.loss_weights.shape == (2,)
    with pytest.raises(FlowMatchingConfigError, match="train.min_snr_gamma"):
        turbo.make_noisy_batch(latents, TrainConfig(min_snr_gamma=5.0), None)
    with pytest.raises(ZImageInputError, match="bypass_guidance_embedding"):
        turbo.make_noisy_batch(latents, TrainConfig(bypass_guidance_embedding=True), None)
    with pytest.raises(ZImageInputError, match="even"):
        turbo.make_noisy_batch(torch.zeros(1, 16, 7, 8), TrainConfig(), None)


def test_predict_is_the_velocity_the_pipeline_steps_with(turbo: ZImageAdapter) -> None:
    """One pipeline step: what the transformer saw and gave, read back through `predict`, is
    the velocity the scheduler stepped with (noise - x0 in training's terms)."""
    seen: dict[str, Any] = {}

    def hook(_module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        seen.update(x=args[0], t=args[1], caps=args[2], out=output[0])

    handle = turbo.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe = turbo.sample_pipeline()
        pipe.set_progress_bar_config(disable=True)
        pipe(prompt="a red circle", height=64, width=64, num_inference_steps=1, guidance_scale=1.0,
             max_sequence_length=64, output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    cond = turbo.encode_prompts(["a red circle"])
    assert torch.equal(seen["caps"][0], cond.hidden_states[0][cond.extra["mask"][0]])
    x = seen["x"][0].squeeze(1)[None]
    batch = NoisyBatch(x, (1 - seen["t"]) * 1000, torch.zeros_like(x))
    with torch.no_grad():
        pred = turbo.predict(batch, cond)
    torch.testing.assert_close(pred, -seen["out"][0].squeeze(1)[None], rtol=1e-5, atol=1e-5)
    assert float(seen["t"][0]) == pytest.approx(0.0, abs=1e-6)  # the first step is pure noise: t = 0


def test_previews_take_ai_toolkits_guidance_scale(turbo: ZImageAdapter) -> None:
    """Previews: guidance_scale 1 is no guidance (one transformer pass per step), g > 1 is
    classifier-free guidance of scale g, the same images diffusers gives at g - 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    calls: list[int] = []
    handle = turbo.transformer.register_forward_hook(lambda m, a, o: calls.append(len(a[0])))

    def render(pipe: Any, g: float) -> torch.Tensor:
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt="a red circle", negative_prompt="blurry", height=72, width=64, num_inference_steps=2,
                    guidance_scale=g, max_sequence_length=64, output_type="latent",
                    generator=torch.Generator().manual_seed(1)).images

    try:
        ours = render(turbo.sample_pipeline(), 1.0)  # 72 px: floored to the 16 px the pipeline needs
        assert calls == [1, 1] and ours.shape == (1, 16, 8, 8)
        guided = render(turbo.sample_pipeline(), 3.0)
        assert calls[2:] == [2, 2]
    finally:
        handle.remove()
    plain = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(turbo.scheduler_config),
                           vae=turbo.vae, text_encoder=turbo.text_encoder, tokenizer=turbo.tokenizer,
                           transformer=turbo.transformer)
    plain.set_progress_bar_config(disable=True)
    theirs = plain(prompt="a red circle", negative_prompt="blurry", height=64, width=64, num_inference_steps=2,
                   guidance_scale=2.0, max_sequence_length=64, output_type="latent",
                   generator=torch.Generator().manual_seed(1)).images
    torch.testing.assert_close(guided, theirs)
    positive, negative = turbo.encode_prompts(["a red circle"]), turbo.encode_prompts(["blurry"])
    kwargs = turbo.preview_prompt_kwargs(positive, negative)
    from_cache = turbo.sample_pipeline()(**kwargs, height=64, width=64, num_inference_steps=2, guidance_scale=3.0,
                                         output_type="latent", generator=torch.Generator().manual_seed(1)).images
    torch.testing.assert_close(from_cache, guided)
    assert turbo.decode_latents(guided)[0].size == (64, 64)


# --- loading -----------------------------------------------------------------------------------


def _original_layout(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The transformer's weights in the original checkpoint's names (fused qkv, `out`, `q_norm`,
    unprefixed embedder / final layer), as single-file Z-Image checkpoints carry them."""
    state = transformer.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".attention.to_k.weight") or key.endswith(".attention.to_v.weight"):
            continue
        if key.endswith(".attention.to_q.weight"):
            stem = key[: -len("to_q.weight")]
            out[stem + "qkv.weight"] = torch.cat([value, state[stem + "to_k.weight"], state[stem + "to_v.weight"]])
            continue
        for old, new in ((".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
                         (".attention.norm_k.", ".attention.k_norm."), ("all_x_embedder.2-1.", "x_embedder."),
                         ("all_final_layer.2-1.", "final_layer.")):
            key = key.replace(old, new)
        out[key] = value.contiguous()
    return out


def test_transformer_only_sources_take_their_other_parts_from_extras(
    turbo: ZImageAdapter, zimage_model: Path, tmp_path: Path
) -> None:
    """De-Turbo's layout (a repo with transformer/ only) and a single .safetensors file load with
    model.extras_name_or_path giving the VAE, text encoder, tokenizer and scheduler."""
    import shutil

    deturbo = tmp_path / "de-turbo"
    shutil.copytree(zimage_model / "transformer", deturbo / "transformer")
    with pytest.raises(ModelLoadError, match="extras_name_or_path"):
        make_adapter(deturbo)
    single = tmp_path / "z_image_turbo.safetensors"
    save_file(_original_layout(turbo.transformer), str(single))
    want = turbo.transformer.state_dict()
    for source in (deturbo, deturbo / "transformer", single):
        adapter = make_adapter(source, extras_name_or_path=str(zimage_model))
        got = adapter.transformer.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), source
        assert adapter.text_encoder is not None and adapter.scheduler_config["shift"] == TRAIN_SHIFT


def test_load_errors_name_the_key(tmp_path: Path, zimage_model: Path) -> None:
    with pytest.raises(ModelLoadError, match="model.name_or_path.*neither"):
        make_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model.name_or_path.*extras_name_or_path"):
        make_adapter(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="model.name_or_path: could not load"):
        make_adapter(tmp_path / "empty", extras_name_or_path=str(zimage_model))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="no .safetensors"):
        make_adapter(tmp_path / "notes.txt")
    with pytest.raises(ModelLoadError, match=r"model.assistant_lora_path.*missing.safetensors"):
        make_adapter(zimage_model, assistant_lora_path=str(tmp_path / "missing.safetensors"))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"diffusion_model.no_such.lora_A.weight": torch.zeros(2, 32),
               "diffusion_model.no_such.lora_B.weight": torch.zeros(32, 2)}, str(foreign))
    with pytest.raises(ModelLoadError, match=r"model.assistant_lora_path.*does not match"):
        make_adapter(zimage_model, assistant_lora_path=str(foreign))


# --- the training adapter ----------------------------------------------------------------------


def test_assistant_is_on_in_training_and_off_in_previews(
    turbo: ZImageAdapter, zimage_model: Path, tmp_path: Path
) -> None:
    path = write_assistant(zimage_model, tmp_path / "assistant.safetensors")
    helped = make_adapter(zimage_model, assistant_lora_path=str(path))
    assert helped.has_assistant
    latents = helped.encode_images(family.pixels(5))
    batch = helped.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(9))
    cond = helped.encode_prompts(["a red circle"])
    family.check_assistant_on_in_training_off_in_previews(
        helped, make_adapter(zimage_model), batch, PromptEmbeds.cat([cond, cond]), ASSISTANT_MODULES,
        "noise_refiner.0.feed_forward.w1", preview_tol=1e-6,
    )


# --- end to end --------------------------------------------------------------------------------


def _job(tmp_path: Path, name: str, model_dir: Path, data: Path, **changes: Any) -> Path:
    return family.write_job(tmp_path, name, model_dir, data, {
        "model": {"arch": "zimage"},
        "train": {"steps": 30, "batch_size": 2, "lr": 5e-3, "timestep_type": "weighted", "lr_scheduler": "constant"},
        "network": {"type": "lora", "linear": 8, "linear_alpha": 16},
        "sample": {"sample_every": 15, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 1.0,
                   "prompts": ["a red circle, [trigger] style"], "seed": 5},
    }, changes)



def _render(pipe: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a red circle, shp style", height=64, width=64, num_inference_steps=2, guidance_scale=0.0,
                max_sequence_length=64, generator=torch.Generator().manual_seed(3), output_type="latent").images


def _diffusers_diff(adapter: ZImageAdapter, model: Path, lora: Path) -> tuple[float, float]:
    """(max |ours - diffusers with the file loaded|, max |ours - the plain model|): the adapter's
    own preview pipeline (guidance 0 -> max(0, 0 - 1): none either way) against
    ZImagePipeline.load_lora_weights."""
    from diffusers import ZImagePipeline

    return family.diffusers_lora_diff(adapter, ZImagePipeline, model, lora, _render)


def _round_trip(adapter: ZImageAdapter, model: Path, lora: Path, kind: str, **network: Any) -> ZImageAdapter:
    """family.check_round_trip into a fresh model; returns it."""
    fresh = make_adapter(model)
    family.check_round_trip("zimage", adapter, fresh, lora, kind, **network)
    return fresh


@pytest.fixture(scope="module")
def lora_run(zimage_model: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("zimage-lora")
    return (*family.train(_job(tmp, "zlora", zimage_model, shapes_dataset)), tmp)


def test_lora_trains_with_falling_loss_previews_and_comfyui_names(lora_run: tuple) -> None:
    trainer, result, _ = lora_run
    family.check_falling_loss_and_previews(result, "zlora")
    assert trainer.network.wrapped_module_names() == trainer.adapter.network_candidates(False)
    family.check_lora_file(trainer, result.final_lora, "z-image/lora", "zimage", prefix="diffusion_model.",
                           weight_names=("lora_A", "lora_B"))


def test_lora_loads_exactly_in_diffusers_in_both_layouts(lora_run: tuple, zimage_model: Path) -> None:
    trainer, result, tmp = lora_run
    converted = family.diffusers_layout_round_trip(result.final_lora, "zimage", tmp)
    for layout, path in (("comfyui", result.final_lora), ("diffusers", converted)):
        diff, effect = _diffusers_diff(trainer.adapter, zimage_model, path)
        record("zimage", "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout=layout)
        assert effect > 1e-3 and diff < 1e-4, (layout, diff, effect)


def test_merge_round_trip_and_lora_info_know_zimage(lora_run: tuple, zimage_model: Path) -> None:
    from diffusers import ZImageTransformer2DModel

    trainer, result, tmp = lora_run
    guessed = family.check_lora_info(trainer, result.final_lora, "zimage", tmp)  # a copy without a header
    assert guessed["architecture"] == "zimage" and "guessed" in guessed["architecture_source"]
    family.check_merge("zimage", trainer.adapter, zimage_model, result.final_lora, tmp, ZImageTransformer2DModel)
    _round_trip(trainer.adapter, zimage_model, result.final_lora, "lora", linear_rank=8)


def test_dora_saved_for_diffusers_loads_exactly(zimage_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, "zdora", zimage_model, shapes_dataset, train={"steps": 8},
               network=family.DORA_NETWORK, save={"save_format": "diffusers"},
               sample={"sample_every": 1000})
    trainer, result = family.train(job)
    family.check_dora_loads_in_diffusers("zimage", trainer, result, "zdora",
                                         lambda adapter, lora: _diffusers_diff(adapter, zimage_model, lora))
    _round_trip(trainer.adapter, zimage_model, result.final_lora, "dora", linear_rank=4)


def test_lokr_trains_in_comfyui_names_and_loads_in_aitk_and_diffusers(
    zimage_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    # with cached text embeddings (prompts of every length, their masks on disk) and the text encoder
    # released: previews render from the cached embeddings
    job = _job(tmp_path, "zlokr", zimage_model, shapes_dataset, train={"steps": 8, "cache_text_embeddings": True},
               sample={"sample_every": 8}, network=family.LOKR_NETWORK)
    trainer, result = family.train(job)
    family.check_cached_text_lokr_run(trainer, result, "zlokr", 8, "diffusion_model.layers.")
    # our own loader reads the file back into a fresh network of the same shape: the same output
    fresh = _round_trip(trainer.adapter, zimage_model, result.final_lora, "lokr", linear_rank=2)
    # diffusers reads ai-toolkit's Z-Image LoKr files (ComfyUI names, LyCORIS tensors) as well
    diff, effect = _diffusers_diff(fresh, zimage_model, result.final_lora)
    record("zimage", "lokr", "diffusers load_lora_weights", diff < 1e-4, diff)
    assert effect > 1e-4 and diff < 1e-4, (diff, effect)


def test_quantized_base_with_the_training_adapter_trains(
    zimage_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    """The Turbo preset's setup: qint8 base, the training adapter on, a full-precision LoRA on top
    that is saved alone and changes the plain model's output in diffusers."""
    from diffusers import ZImagePipeline

    assistant = write_assistant(zimage_model, tmp_path / "assistant.safetensors")
    job = _job(tmp_path, "zq", zimage_model, shapes_dataset, train={"steps": 10}, sample={"sample_every": 1000},
               model={"quantize": True, "qtype": "qint8", "assistant_lora_path": str(assistant)})
    trainer, result = family.train(job)
    assert result.state == "completed" and trainer.adapter.has_assistant
    family.finite_run(result, "zq")
    family.check_quantized_base(trainer)
    tensors = load_file(str(result.final_lora))
    assert not any("refiner" in k for k in tensors)  # the assistant's own layers are not saved
    assert tensors["diffusion_model.layers.0.attention.to_q.lora_A.weight"].shape[0] == 8
    family.check_lora_changes_pipeline(ZImagePipeline.from_pretrained(zimage_model), result.final_lora, _render)


def test_shipped_plan_config_builds_the_real_sizes() -> None:
    """`aitk plan` of Tongyi-MAI/Z-Image-Turbo (and Z-Image, De-Turbo) reads the published configs
    shipped with aitk: on the meta device they build the 6.15B transformer and Qwen3-4B, and the
    adapter bound to them gives the trainer's shapes (tests/test_plan.py checks the plan's step
    memory against a measured step on the tiny model)."""
    from aitk.models.base import PartConfigs
    from aitk.plan.build import build_on_meta
    from aitk.plan.sources import model_spec

    spec = model_spec("Tongyi-MAI/Z-Image-Turbo", "zimage")
    assert model_spec("ostris/Z-Image-De-Turbo", "zimage").label == spec.label
    parts = {name: build_on_meta(spec.parts[name]) for name in ("transformer", "text_encoder")}
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    assert 6.1e9 < count["transformer"] < 6.2e9 and 4.0e9 < count["text_encoder"] < 4.05e9, count
    adapter = ZImageAdapter(ModelConfig(name_or_path="Tongyi-MAI/Z-Image-Turbo", arch="zimage"), CPU, torch.bfloat16)
    adapter.bind({"transformer": parts["transformer"]}, spec.configs({}))
    with torch.device("meta"):
        batch, cond = adapter.example_batch(1, (1024, 768), 1, expert="main", with_controls=False)
    assert batch.noisy_latents.shape == (1, 16, 96, 128) and cond.hidden_states.shape == (1, 512, 2560)
    assert isinstance(spec.configs({}), PartConfigs) and adapter.scheduler_config["shift"] == TRAIN_SHIFT


def test_presets_validate_clean_and_extras_is_refused_elsewhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from aitk.config.validate import validate_command

    for key in ("zimage_turbo", "zimage_deturbo"):
        job, path = family.check_preset_validates_clean(key, tmp_path, capsys)
    model = job["config"]["process"][0]["model"]
    model.update(arch="flux", name_or_path="black-forest-labs/FLUX.1-dev")
    path.write_text(yaml.safe_dump(job))
    validate_command([str(path)])
    printed = capsys.readouterr()
    assert "model.extras_name_or_path: extras_name_or_path on this model" in printed.out + printed.err, printed
