"""AuraFlow on the tiny random-init model of the real classes: the pipeline's text encoding and
velocity, the flow-matching objective with the scheduler's shift, and runs whose files load in
diffusers exactly (diffusers layout; ComfyUI's names with their alpha as ComfyUI maps them), DoRA,
LoKr, a quantized base, and the tools.

Everything runs offline on CPU in fp32 with 64 px images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from aitk.config.schema import ModelConfig, TrainConfig
from aitk.models.auraflow import AuraFlowAdapter, build_tiny_auraflow
from aitk.models.base import ModelLoadError, NoisyBatch, PromptEmbeds
from aitk.models.flow_matching import time_shift
import family_checks as family
from interop_results import record
from upstream_jobs import extras_on_path  # noqa: F401 - autouse fixture: torchao for model.quantize

CPU = family.CPU


@pytest.fixture(scope="session")
def auraflow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_auraflow(tmp_path_factory.mktemp("auraflow-model") / "tiny-auraflow")


def make_adapter(folder: Path | str, **model_fields: Any) -> AuraFlowAdapter:
    return family.load_adapter(AuraFlowAdapter, folder, "auraflow", **model_fields)


@pytest.fixture(scope="session")
def aura(auraflow_model: Path) -> AuraFlowAdapter:
    return make_adapter(auraflow_model)



# --- the model ---------------------------------------------------------------------------------


def test_tiny_model_loads_as_the_real_pipeline(auraflow_model: Path) -> None:
    from diffusers import AuraFlowPipeline

    assert sum(p.stat().st_size for p in auraflow_model.rglob("*") if p.is_file()) < 10 * 2**20
    pipe = AuraFlowPipeline.from_pretrained(auraflow_model)
    assert type(pipe.text_encoder).__name__ == "UMT5EncoderModel"
    assert build_tiny_auraflow(auraflow_model) == auraflow_model  # kept, not rebuilt


def test_load_facts(aura: AuraFlowAdapter) -> None:
    for module in (aura.transformer, aura.vae, aura.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())
    assert aura.max_sequence_length == 32 and aura.scheduler_config["shift"] == 1.73
    joint = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_k_proj", "attn.add_v_proj", "attn.add_q_proj",
             "attn.to_out.0", "attn.to_add_out", "ff.linear_1", "ff.linear_2", "ff.out_projection",
             "ff_context.linear_1", "ff_context.linear_2", "ff_context.out_projection")
    single = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.linear_1", "ff.linear_2", "ff.out_projection")
    names = aura.network_candidates(True)
    assert names == [f"joint_transformer_blocks.0.{t}" for t in joint] + [f"single_transformer_blocks.0.{t}" for t in single]
    t = aura.transformer
    assert aura.offload_blocks(t) == [*t.joint_transformer_blocks, *t.single_transformer_blocks]
    assert aura.lora_key_stem(names[0]) == "transformer.joint_transformer_blocks.0.attn.to_q"


def test_load_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model.name_or_path.*neither"):
        make_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="could not load an AuraFlow model"):
        make_adapter(tmp_path / "empty")


def test_encode_prompts_is_the_pipeline_encoding(aura: AuraFlowAdapter, auraflow_model: Path) -> None:
    from diffusers import AuraFlowPipeline

    cond = PromptEmbeds.cat([aura.encode_prompts(["a red circle"]), aura.encode_prompts(["a blue square on grey"])])
    assert cond.hidden_states.shape == (2, 32, 32)
    lengths = cond.extra["mask"].sum(1).tolist()
    assert lengths[0] < lengths[1] < 32 and not cond.hidden_states[0, lengths[0]:].any()  # padding zeroed
    embeds, _, _, _ = AuraFlowPipeline.from_pretrained(auraflow_model).encode_prompt(
        "a blue square on grey", do_classifier_free_guidance=False, max_sequence_length=32)
    torch.testing.assert_close(cond.hidden_states[1:], embeds.detach(), rtol=1e-5, atol=1e-5)


# --- the objective -----------------------------------------------------------------------------


def test_noisy_batch_is_rectified_flow_with_the_schedulers_shift(aura: AuraFlowAdapter) -> None:
    latents = aura.encode_images(family.pixels(1))
    assert latents.shape == (2, 4, 8, 8)
    a = aura.make_noisy_batch(latents, TrainConfig(timestep_type="shift"), torch.Generator().manual_seed(5))
    s = (a.timesteps / 1000).view(-1, 1, 1, 1)
    noise = (a.noisy_latents - (1 - s) * latents) / s
    torch.testing.assert_close(a.target, noise - latents, rtol=1e-4, atol=1e-4)
    u = torch.rand(2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(a.timesteps / 1000, time_shift(u, math.log(1.73)).float())
    family.check_weighted_loss_and_min_snr_refused(aura, latents, 5)


def test_predict_is_the_velocity_the_pipeline_steps_with(aura: AuraFlowAdapter) -> None:
    seen: dict[str, Any] = {}

    def hook(_module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        seen.update(x=args[0], t=kwargs["timestep"], out=output[0])

    handle = aura.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe = aura.sample_pipeline()
        pipe.set_progress_bar_config(disable=True)
        pipe(prompt="a red circle", height=64, width=96, num_inference_steps=1, guidance_scale=1.0,
             max_sequence_length=32, output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert float(seen["t"][0]) == pytest.approx(1.0)  # the first step is pure noise: sigma 1
    cond = aura.encode_prompts(["a red circle"])
    x = seen["x"]
    with torch.no_grad():
        pred = aura.predict(NoisyBatch(x, seen["t"] * 1000, torch.zeros_like(x)), cond)
    torch.testing.assert_close(pred, seen["out"], rtol=1e-5, atol=1e-5)


# --- training runs -----------------------------------------------------------------------------


def _job(tmp_path: Path, name: str, model_dir: Path, data: Path, **changes: Any) -> Path:
    return family.write_job(tmp_path, name, model_dir, data, {
        "model": {"arch": "auraflow"},
        "train": {"steps": 30, "batch_size": 2, "lr": 1e-2, "lr_scheduler": "constant"},
        "network": {"type": "lora", "linear": 8, "linear_alpha": 16},
        "save": {"save_every": 1000},
        "sample": {"sample_every": 15, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 3.5,
                   "prompts": ["a red circle, [trigger] style"], "neg": "blurry", "seed": 5},
    }, changes)



def _render(pipe: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a red circle, shp style", height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
                max_sequence_length=32, generator=torch.Generator().manual_seed(3), output_type="latent").images


def _diffusers_diff(adapter: AuraFlowAdapter, model: Path, lora: Path) -> tuple[float, float]:
    """(max |ours - AuraFlowPipeline.load_lora_weights|, max |ours - the plain model|)."""
    from diffusers import AuraFlowPipeline

    return family.diffusers_lora_diff(adapter, AuraFlowPipeline, model, lora, _render)


def _round_trip(adapter: AuraFlowAdapter, model: Path, lora: Path, kind: str, **network: Any) -> None:
    family.check_round_trip("auraflow", adapter, make_adapter(model), lora, kind, layout="comfyui", **network)


@pytest.fixture(scope="module")
def lora_run(auraflow_model: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("auraflow-lora")
    return (*family.train(_job(tmp, "alora", auraflow_model, shapes_dataset)), tmp)


def test_lora_trains_with_falling_loss_previews_and_comfyui_names(lora_run: tuple) -> None:
    trainer, result, _ = lora_run
    family.check_falling_loss_and_previews(result, "alora")
    assert trainer.network.wrapped_module_names() == trainer.adapter.network_candidates(False)

    family.check_folded_lora_file(trainer, result.final_lora, "auraflow/lora", "auraflow", prefix="transformer.",
                           weight_names=("lora_A", "lora_B"))


def test_lora_loads_exactly_in_diffusers_and_as_comfyui_maps_it(lora_run: tuple, auraflow_model: Path) -> None:
    """diffusers' AuraFlow loader reads the diffusers layout (`aitk convert`); it refuses the
    ComfyUI layout's `.alpha` keys, which ComfyUI reads (checked by putting the file on the
    transformer as ComfyUI maps it)."""
    trainer, result, tmp = lora_run
    converted = family.converted_file(result.final_lora, "diffusers", "auraflow", tmp / "alora_diffusers.safetensors")
    diff, effect = _diffusers_diff(trainer.adapter, auraflow_model, converted)
    record("auraflow", "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="diffusers")
    assert effect > 1e-3 and diff < 1e-4, (diff, effect)
    # the default file (alpha folded into lora_B: ComfyUI's scale 1) loads as it is
    diff, effect = _diffusers_diff(trainer.adapter, auraflow_model, result.final_lora)
    assert effect > 1e-3 and diff < 1e-4, (diff, effect)


def test_tools_know_auraflow(lora_run: tuple, auraflow_model: Path) -> None:
    from diffusers import AuraFlowTransformer2DModel

    trainer, result, tmp = lora_run
    info = family.lora_info(result.final_lora)
    assert info["architecture"] == "auraflow" and info["modules"] == len(trainer.network.wrapped_module_names())
    adapter = trainer.adapter
    family.check_merge("auraflow", adapter, auraflow_model, result.final_lora, tmp, AuraFlowTransformer2DModel)
    _round_trip(adapter, auraflow_model, result.final_lora, "lora", linear_rank=8)


def test_dora_saved_for_diffusers_loads_exactly(auraflow_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, "adora", auraflow_model, shapes_dataset, **family.DORA_RUN)
    trainer, result = family.train(job)
    family.check_dora_loads_in_diffusers("auraflow", trainer, result, "adora",
                                         lambda adapter, lora: _diffusers_diff(adapter, auraflow_model, lora))


def test_lokr_with_cached_text_trains_and_loads_back(auraflow_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, "alokr", auraflow_model, shapes_dataset, **family.CACHED_TEXT_LOKR_RUN)
    trainer, result = family.train(job)
    family.check_cached_text_lokr_run(trainer, result, "alokr", 6, "")  # previews from the cached embeddings
    _round_trip(trainer.adapter, auraflow_model, result.final_lora, "lokr", linear_rank=2)


def test_quantized_base_trains(auraflow_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, "aq", auraflow_model, shapes_dataset, **family.QUANTIZED_RUN, save={"save_format": "diffusers"})
    trainer, result = family.train(job)
    family.finite_run(result, "aq")
    family.check_quantized_base(trainer)
    from diffusers import AuraFlowPipeline

    family.check_lora_changes_pipeline(AuraFlowPipeline.from_pretrained(auraflow_model), result.final_lora, _render)


def test_preset_validates_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    family.check_preset_validates_clean("auraflow", tmp_path, capsys)


def test_shipped_plan_config_builds_the_real_sizes() -> None:
    """`aitk plan` of fal/AuraFlow-v0.3 reads the published configs shipped with aitk: the 6.8B
    transformer and Pile-T5 XL's 1.2B encoder on the meta device, and the trainer's shapes."""
    from aitk.plan.build import build_on_meta
    from aitk.plan.sources import model_spec

    spec = model_spec("fal/AuraFlow-v0.3", "auraflow")
    parts = {name: build_on_meta(spec.parts[name]) for name in ("transformer", "text_encoder")}
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    assert 6.8e9 < count["transformer"] < 6.9e9 and 1.2e9 < count["text_encoder"] < 1.25e9, count
    adapter = AuraFlowAdapter(ModelConfig(name_or_path="fal/AuraFlow-v0.3", arch="auraflow"), CPU, torch.bfloat16)
    adapter.bind({"transformer": parts["transformer"]}, spec.configs({}))
    with torch.device("meta"):
        batch, cond = adapter.example_batch(1, (1024, 768), 1, expert="main", with_controls=False)
    assert batch.noisy_latents.shape == (1, 4, 96, 128) and cond.hidden_states.shape == (1, 256, 2048)
