"""Stable Diffusion 3 / 3.5 (`model.arch: sd3`) on tiny random-init models of the real classes,
large-like and medium-like (SD 3.5 medium's dual-attention block): loading, the pipeline's text
encoding, rectified flow with SD 3's shift, LoRA targets and key names, LoRA / DoRA / LoKr / a
qint8 base training end to end, diffusers' exact load of the files, `aitk convert` / `merge` /
`lora info`, and the memory plan against a measured step.

Everything runs offline on CPU in fp32 with 64 px images.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest's job builders

from aitk.config.schema import ModelConfig, TrainConfig  # noqa: E402
from aitk.models.base import ModelLoadError, PartConfigs  # noqa: E402
from aitk.models.flow_matching import FlowMatchingConfigError  # noqa: E402
from aitk.models.sd3 import SD3Adapter, SD3InputError, build_tiny_sd3, sd3_lora_candidates  # noqa: E402
import family_checks as family  # noqa: E402
from interop_results import record  # noqa: E402
from test_tools import aitk  # noqa: E402

CPU = torch.device("cpu")
PROMPT = "a red circle, shp style"


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sd3_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd3-models")
    return {v: build_tiny_sd3(root / f"tiny-sd3-{v}", v) for v in ("large", "medium")}


def make_adapter(folder: Path, **model_fields: Any) -> SD3Adapter:
    return family.load_adapter(SD3Adapter, folder, "sd3", **model_fields)


@pytest.fixture(scope="session")
def large(sd3_models: dict[str, Path]) -> SD3Adapter:
    return make_adapter(sd3_models["large"])


@pytest.fixture(scope="session")
def medium(sd3_models: dict[str, Path]) -> SD3Adapter:
    return make_adapter(sd3_models["medium"])


# --- the tiny models and loading ---------------------------------------------------------------


def test_tiny_models_are_large_like_and_medium_like(sd3_models: dict[str, Path], large: SD3Adapter,
                                                    medium: SD3Adapter) -> None:
    for folder in sd3_models.values():
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        assert size < 10 * 2**20, size
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"][1] == "T5EncoderModel"
    assert tuple(medium.transformer.config.dual_attention_layers) == (0,)
    assert tuple(large.transformer.config.dual_attention_layers) == ()
    assert hasattr(medium.transformer.transformer_blocks[0], "attn2") and medium.transformer.transformer_blocks[0].attn2
    assert getattr(large.transformer.transformer_blocks[0], "attn2", None) is None
    assert large.modelspec_architecture == "stable-diffusion-3-5-large/lora"
    assert medium.modelspec_architecture == "stable-diffusion-3-5-medium/lora"
    assert large.base_model_version == "sd_3" and SD3Adapter.bucket_divisibility == 16
    for adapter in (large, medium):
        for module in (adapter.transformer, adapter.vae, *adapter.text_encoders().values()):
            assert not any(p.requires_grad for p in module.parameters())
        assert adapter.max_sequence_length == 32  # capped by the tiny T5 tokenizer
        assert adapter.scheduler_config["shift"] == 3.0
        assert [type(b).__name__ for b in adapter.offload_blocks(adapter.transformer)] == ["JointTransformerBlock"] * 2


def test_lora_targets_and_key_names(large: SD3Adapter, medium: SD3Adapter) -> None:
    names = sd3_lora_candidates(large.transformer)
    # block 0: 8 attention projections + 4 feed-forward layers; the last block is context
    # pre-only (no to_add_out, no ff_context): 7 + 2
    assert len(names) == 12 + 9 and "transformer_blocks.1.attn.to_add_out" not in names
    assert not any("norm" in n or "embed" in n or "proj_out" == n for n in names)
    medium_names = sd3_lora_candidates(medium.transformer)
    assert set(medium_names) - set(names) == {f"transformer_blocks.0.attn2.{t}" for t in ("to_q", "to_k", "to_v",
                                                                                         "to_out.0")}
    assert medium.network_candidates(include_conv=True) == medium_names  # the patch conv is never a target
    # ComfyUI's SD3 names: transformer.<diffusers path> (mapped onto the MMDiT by mmdit_to_diffusers)
    assert medium.lora_key_stem("transformer_blocks.0.attn2.to_q") == "transformer.transformer_blocks.0.attn2.to_q"
    assert medium.lora_weight_names == ("lora_A", "lora_B") and medium.diffusers_lora_prefix == "transformer"


def test_lora_files_are_told_apart_and_the_model_card_names_the_licence() -> None:
    from aitk.hub import CardInfo, model_card
    from aitk.models.sd3 import is_sd3_lora

    ours = ["transformer.transformer_blocks.3.attn.add_q_proj.lora_A.weight", "transformer.transformer_blocks.3.alpha"]
    assert is_sd3_lora(ours) and is_sd3_lora(["lora_transformer_transformer_blocks_0_attn2_to_q.lora_down.weight"])
    assert not is_sd3_lora(ours + ["transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"])  # FLUX
    assert not is_sd3_lora(["transformer.transformer_blocks.0.img_mlp.net.2.lora_A.weight"])  # Qwen-Image
    assert not is_sd3_lora(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"])
    card = model_card(CardInfo(title="t", base_model="stabilityai/stable-diffusion-3.5-large", architecture="sd3"))
    assert "license_name: stabilityai-ai-community" in card and "- sd3" in card


def test_load_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model.name_or_path"):
        make_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"model.name_or_path.*text_encoder_3/"):
        make_adapter(tmp_path / "empty")
    (tmp_path / "sd3.5_large.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="single file"):
        make_adapter(tmp_path / "sd3.5_large.safetensors")


def test_encode_prompts_is_the_pipeline_encoding(medium: SD3Adapter) -> None:
    embeds = medium.encode_prompts(["a red circle", "a blue square"])
    # 77 CLIP tokens (CLIP-L 32 + CLIP-G 48 wide, zero-padded to T5's 96) then 32 T5 tokens
    assert embeds.hidden_states.shape == (2, 77 + 32, 96) and embeds.extra["pooled"].shape == (2, 32 + 48)
    assert embeds.hidden_states[:, :77, 80:].eq(0).all() and embeds.hidden_states[:, 77:, 80:].abs().sum() > 0
    hidden, _, pooled, _ = medium.sample_pipeline().encode_prompt(
        prompt=["a blue square"], prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
        max_sequence_length=32,
    )
    torch.testing.assert_close(embeds.hidden_states[1:], hidden)
    torch.testing.assert_close(embeds.extra["pooled"][1:], pooled)
    latents = medium.encode_images(family.pixels(1))
    assert latents.shape == (2, 16, 8, 8) and torch.equal(latents, medium.encode_images(family.pixels(1)))


# --- the objective -----------------------------------------------------------------------------


def test_rectified_flow_with_sd3_shift_and_raw_timesteps(large: SD3Adapter) -> None:
    latents = large.encode_images(family.pixels(2))
    linear = large.make_noisy_batch(latents, TrainConfig(timestep_type="linear"), torch.Generator().manual_seed(5))
    again = large.make_noisy_batch(latents, TrainConfig(timestep_type="linear"), torch.Generator().manual_seed(5))
    assert torch.equal(linear.noisy_latents, again.noisy_latents) and torch.equal(linear.timesteps, again.timesteps)
    s = (linear.timesteps / 1000).view(-1, 1, 1, 1)
    noise = (linear.noisy_latents - (1 - s) * latents) / s
    torch.testing.assert_close(linear.target, noise - latents, rtol=1e-4, atol=1e-4)
    assert abs(noise.std().item() - 1.0) < 0.2 and linear.loss_weights is None

    # shift: the same uniform draw through SD 3's fixed shift 3: sigma = 3u / (1 + 2u), at every size
    for size in (8, 32):
        shifted = large.make_noisy_batch(torch.zeros(64, 16, size, size), TrainConfig(timestep_type="shift"),
                                         torch.Generator().manual_seed(1))
        u = large.make_noisy_batch(torch.zeros(64, 16, size, size), TrainConfig(timestep_type="linear"),
                                   torch.Generator().manual_seed(1)).timesteps / 1000
        torch.testing.assert_close(shifted.timesteps / 1000, 3 * u / (1 + 2 * u))
    weighted = large.make_noisy_batch(latents, TrainConfig(timestep_type="weighted"), torch.Generator().manual_seed(5))
    assert weighted.loss_weights is not None and weighted.loss_weights.shape == (2,)

    # the transformer sees the timestep 1000 * sigma unchanged, as StableDiffusion3Pipeline passes it
    seen: dict[str, Any] = {}
    handle = large.transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.update(timestep=kwargs["timestep"]), with_kwargs=True)
    try:
        with torch.no_grad():
            out = large.predict(linear, large.encode_prompts(["a", "b"]))
    finally:
        handle.remove()
    assert torch.equal(seen["timestep"], linear.timesteps) and out.shape == latents.shape
    with pytest.raises(SD3InputError, match="patch size"):
        large.predict(large.make_noisy_batch(torch.zeros(1, 16, 7, 8), TrainConfig(), None), large.encode_prompts(["a"]))


def test_bound_adapter_defaults_and_dynamic_shifting(large: SD3Adapter) -> None:
    """bind() without a scheduler config (what the plan gives) is SD 3's shift 3; a config with
    use_dynamic_shifting shifts by image size as the pipeline does."""
    parts = {"transformer": large.transformer, "vae": large.vae}
    plain = SD3Adapter(large.model_cfg, CPU, torch.float32)
    plain.bind(parts, PartConfigs({"vae": dict(large.vae.config)}))
    assert plain.shift_mu(8, 8) == pytest.approx(math.log(3.0)) == plain.shift_mu(128, 128)
    assert plain.max_sequence_length == 256 and plain.clip_length == 77
    noisy, cond = plain.example_batch(2, (64, 48), 1, expert="main", with_controls=False)
    assert noisy.noisy_latents.shape == (2, 16, 6, 8) and cond.hidden_states.shape == (2, 77 + 256, 96)
    with torch.no_grad():
        assert plain.predict(noisy, cond).shape == noisy.noisy_latents.shape
    too_long = SD3Adapter(ModelConfig(name_or_path="x", arch="sd3", model_kwargs={"max_sequence_length": 1000}),
                          CPU, torch.float32)
    with pytest.raises(SD3InputError, match="model.model_kwargs.max_sequence_length"):
        too_long.bind(parts, PartConfigs())
    dynamic = SD3Adapter(large.model_cfg, CPU, torch.float32)
    dynamic.bind(parts, PartConfigs({}, {"shift": 3.0, "use_dynamic_shifting": True}))
    assert dynamic.shift_mu(8, 8) < dynamic.shift_mu(128, 128)


def test_min_snr_gamma_and_unknown_timestep_types_are_refused(large: SD3Adapter) -> None:
    latents = torch.zeros(1, 16, 4, 4)
    with pytest.raises(FlowMatchingConfigError, match="train.min_snr_gamma"):
        large.make_noisy_batch(latents, TrainConfig(min_snr_gamma=5.0), None)
    with pytest.raises(FlowMatchingConfigError, match="train.timestep_type"):
        large.make_noisy_batch(latents, TrainConfig.model_construct(timestep_type="one_step"), None)


# --- end to end --------------------------------------------------------------------------------


def _job(tmp_path: Path, name: str, model_dir: Path, data: Path, **changes: Any) -> Path:
    return family.write_job(tmp_path, name, model_dir, data, {
        "model": {"arch": "sd3"},
        "train": {"steps": 12, "batch_size": 2, "lr": 5e-3, "timestep_type": "linear", "lr_scheduler": "constant"},
        "network": {"type": "lora", "linear": 8, "linear_alpha": 16},
        "sample": {"sample_every": 1000, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 4.0,
                   "prompts": ["a red circle, [trigger] style"], "neg": "blurry", "seed": 5},
    }, changes)


def _train(job_path: Path) -> tuple[Any, Any]:
    trainer, result = family.train(job_path)
    assert result.state == "completed"
    return trainer, result


_losses = family.losses


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def _render(pipe: Any) -> torch.Tensor:
    """Latents of a 2-step preview with classifier-free guidance (negative prompt included)."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPT, negative_prompt="blurry", height=64, width=64, num_inference_steps=2,
                guidance_scale=4.0, max_sequence_length=32, generator=torch.Generator().manual_seed(3),
                output_type="latent").images


def _ours(trainer: Any) -> torch.Tensor:
    trainer.adapter.denoiser().eval()
    return _render(trainer.adapter.sample_pipeline())


def _fresh(folder: Path) -> Any:
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(folder)


def _diffusers_load(trainer: Any, model: Path, lora: Path, kind: str, note: str) -> float:
    """diffusers' load_lora_weights on a fresh pipeline against the trainer's own pipeline."""
    from diffusers import StableDiffusion3Pipeline

    diff, effect = family.diffusers_lora_diff(trainer.adapter, StableDiffusion3Pipeline, model, lora, _render)
    assert effect > 1e-3  # the network changes the output, so the check can fail
    record("sd3", kind, "diffusers load_lora_weights", diff < 1e-4, diff, layout="diffusers", note=note)
    return diff


def _merge_matches(trainer: Any, model: Path, lora: Path, kind: str, tmp_path: Path, note: str) -> None:
    code, out, err = aitk("merge", "--model", model, "--lora", lora, "--arch", "sd3", "-o", tmp_path / "merged",
                          "--dtype", "float32")
    assert code == 0, err
    assert f"merged {len(trainer.network.wrapped_module_names())} modules" in out
    diff = float((_render(_fresh(tmp_path / "merged")) - _ours(trainer)).abs().max())
    record("sd3", kind, "aitk merge", diff < 1e-4, diff, note=note)
    assert diff < 1e-4


@pytest.fixture(scope="module")
def shapes(shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    return Path(shutil.copytree(shapes_dataset, tmp_path_factory.mktemp("sd3-data") / "shapes"))


def test_lora_trains_and_its_files_load_in_diffusers_comfyui_layout_and_tools(
    sd3_models: dict[str, Path], shapes: Path, tmp_path: Path
) -> None:
    """Large-like, save_format comfyui: ComfyUI's SD3 names with the alpha in effect; diffusers
    refuses `.alpha` keys for SD 3, so its layout comes from `aitk convert` and loads exactly;
    `aitk merge` reproduces the trainer; `aitk lora info` names the family."""
    model = sd3_models["large"]
    trainer, result = _train(_job(tmp_path, "large", model, shapes))
    losses = _losses(result, "large")
    assert len(losses) == 12 and np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    wrapped = trainer.network.wrapped_module_names()
    assert set(wrapped) == set(sd3_lora_candidates(trainer.adapter.transformer))
    tensors = family.check_lora_file(trainer, result.final_lora, "stable-diffusion-3-5-large/lora", "sd_3",
                                     prefix="transformer.", weight_names=("lora_A", "lora_B"))
    assert "lora_adapter_metadata" not in _header(result.final_lora)

    with pytest.raises(ValueError, match="lora"):  # diffusers' SD 3 loader takes PEFT keys only
        _fresh(model).load_lora_weights(str(result.final_lora))
    converted = tmp_path / "large_diffusers.safetensors"
    code, _, err = aitk("convert", result.final_lora, "--to", "diffusers", "--arch", "sd3", "-o", converted)
    assert code == 0, err
    assert _diffusers_load(trainer, model, converted, "lora", "large, converted from comfyui") < 1e-4

    code, out, err = aitk("lora", "info", result.final_lora, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["architecture"] == "sd3" and "modelspec.architecture" in info["architecture_source"]
    assert info["network_type"] == "lora" and info["modules"] == len(wrapped) and info["alphas"] == {"16": len(wrapped)}
    headerless = tmp_path / "headerless.safetensors"  # a file from elsewhere: guessed from its keys
    save_file(tensors, str(headerless))
    code, out, err = aitk("lora", "info", headerless, "--json")
    assert code == 0 and json.loads(out)["architecture"] == "sd3", (out, err)
    _merge_matches(trainer, model, result.final_lora, "lora", tmp_path, "large")


def test_medium_lora_in_the_diffusers_layout_loads_exactly(sd3_models: dict[str, Path], shapes: Path,
                                                           tmp_path: Path) -> None:
    model = sd3_models["medium"]
    trainer, result = _train(_job(tmp_path, "medium", model, shapes, save={"save_format": "diffusers"},
                                  train={"timestep_type": "shift"}))
    tensors = load_file(str(result.final_lora))
    assert "transformer.transformer_blocks.0.attn2.to_q.lora_A.weight" in tensors
    assert not any(k.endswith(".alpha") for k in tensors)
    assert json.loads(_header(result.final_lora)["lora_adapter_metadata"])["transformer.lora_alpha"] == 16.0
    assert _diffusers_load(trainer, model, result.final_lora, "lora", "medium") < 1e-4


def test_cached_text_embeddings_release_all_three_encoders_and_previews_match(
    sd3_models: dict[str, Path], shapes: Path, tmp_path: Path
) -> None:
    """cache_text_embeddings: CLIP-L, CLIP-G and T5 are freed after caching; previews (with a
    negative prompt under guidance) render from the cached embeddings as they do from text."""
    from PIL import Image

    samples = {}
    for cache in (True, False):
        name = "cached" if cache else "plain"
        trainer, result = _train(_job(tmp_path, name, sd3_models["medium"], shapes,
                                      train={"steps": 2, "cache_text_embeddings": cache}))
        released = [getattr(trainer.adapter, n) is None for n in trainer.adapter.text_encoder_names]
        assert released == [cache] * 3
        final = sorted((result.output_dir / "samples").iterdir())[-1]
        samples[name] = np.asarray(Image.open(final), dtype=np.float32)
    assert np.abs(samples["cached"] - samples["plain"]).max() <= 2.0


def test_dora_trains_and_loads_exactly_in_diffusers(sd3_models: dict[str, Path], shapes: Path, tmp_path: Path) -> None:
    model = sd3_models["medium"]
    trainer, result = _train(_job(tmp_path, "dora", model, shapes, network={"type": "dora"},
                                  save={"save_format": "diffusers"}, train={"steps": 4}))
    assert all(math.isfinite(x) for x in _losses(result, "dora"))
    tensors = load_file(str(result.final_lora))
    assert any(k.endswith("lora_magnitude_vector") for k in tensors)
    assert _diffusers_load(trainer, model, result.final_lora, "dora", "medium") < 1e-4


def test_lokr_trains_and_merges_exactly(sd3_models: dict[str, Path], shapes: Path, tmp_path: Path) -> None:
    """diffusers cannot load LoKr: ComfyUI's LyCORIS keys under transformer.<path>, and `aitk merge`
    (the merged model re-loaded by diffusers) as the interop proof."""
    model = sd3_models["medium"]
    trainer, result = _train(_job(tmp_path, "lokr", model, shapes, network={"type": "lokr", "lokr_factor": 4},
                                  train={"steps": 4}))
    assert all(math.isfinite(x) for x in _losses(result, "lokr"))
    tensors = load_file(str(result.final_lora))
    assert "transformer.transformer_blocks.0.attn2.to_q.lokr_w1" in tensors
    assert all(k.startswith("transformer.transformer_blocks.") for k in tensors)
    _merge_matches(trainer, model, result.final_lora, "lokr", tmp_path, "medium")


def test_qint8_quantized_base_trains(sd3_models: dict[str, Path], shapes: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from aitk.extras import extras_dir

    monkeypatch.syspath_prepend(str(extras_dir()))  # torchao lives outside site-packages
    trainer, result = _train(_job(tmp_path, "q8", sd3_models["large"], shapes, model={"quantize": True, "qtype": "qint8"},
                                  train={"steps": 4}))
    losses = _losses(result, "q8")
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    blocks = trainer.adapter.transformer.transformer_blocks
    frozen = [m.base_layer for m in blocks.modules() if hasattr(m, "base_layer")]
    assert frozen and all("torchao" in type(m.weight).__module__ for m in frozen)


# --- the memory plan ---------------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "gc"), [("medium", False), ("large", True)])
def test_plan_matches_a_measured_cpu_step(variant: str, gc: bool, sd3_models: dict[str, Path], shapes: Path,
                                          tmp_path: Path) -> None:
    from conftest import base_process, deep_update, write_job

    from aitk.plan import plan_job
    from aitk.plan.measure import measure_step

    process = deep_update(base_process(sd3_models[variant], shapes, tmp_path / "out"),
                          {"model": {"arch": "sd3"}, "train": {"gradient_checkpointing": gc, "batch_size": 8}})
    process["datasets"][0]["resolution"] = [512]
    job = write_job(tmp_path / "plan.yaml", "plan", process)
    plan = plan_job(job)
    planned = plan.step.gradients + plan.step.activations + plan.step.workspace
    measured = measure_step(job).peak
    assert measured > 10 * 2**20 and abs(planned / measured - 1) <= 0.15, (planned, measured)


@pytest.mark.parametrize(("hub_id", "transformer_billions"), [
    ("stabilityai/stable-diffusion-3.5-large", 8.06), ("stabilityai/stable-diffusion-3.5-medium", 2.24),
])
def test_shipped_plan_configs_build_the_published_sizes(hub_id: str, transformer_billions: float) -> None:
    """`aitk plan` of a hub id reads aitk/plan/configs/sd3.5-*.json: each part builds at its real
    size (SD 3.5 large's MMDiT 8.1B, medium's 2.2B plus its 0.2B position table; CLIP-L 124M,
    CLIP-G 695M, T5-XXL's encoder 4.76B)."""
    from aitk.plan.build import build_on_meta
    from aitk.plan.sources import model_spec

    spec = model_spec(hub_id, "sd3")
    billions = {name: sum(p.numel() for p in build_on_meta(part).parameters()) / 1e9 for name, part in spec.parts.items()}
    assert billions["transformer"] == pytest.approx(transformer_billions, abs=0.01)
    assert billions["text_encoder"] == pytest.approx(0.124, abs=0.001)
    assert billions["text_encoder_2"] == pytest.approx(0.695, abs=0.001)
    assert billions["text_encoder_3"] == pytest.approx(4.762, abs=0.001)
    assert billions["vae"] == pytest.approx(0.084, abs=0.001)
    # default LoRA targets: 12 per block, 9 in the context pre-only last one, 4 per dual-attention block
    config = spec.parts["transformer"].config
    blocks, dual = config["num_layers"], len(config["dual_attention_layers"])
    targets = sd3_lora_candidates(build_on_meta(spec.parts["transformer"]))
    assert len(targets) == (blocks - 1) * 12 + 9 + 4 * dual and (dual == 13) == ("medium" in hub_id)
