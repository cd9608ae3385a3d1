"""Krea 2 on the tiny random-init model of the real classes: the pipeline's Qwen3-VL layer-stack
encoding and velocity, the flow-matching objective with Krea 2's resolution-dependent shift, the
LoRA names (ai-toolkit's / ComfyUI's original names, as diffusers' converter reads them), loading
from a transformer-only folder, the turbo training adapter, and runs whose files load in diffusers
exactly (LoRA, DoRA), LoKr through aitk's own loader, a quantized base, and the tools.

Everything runs offline on CPU in fp32 with 64 px images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import family_checks as family
from aitk.config.schema import TrainConfig
from aitk.models.base import NoisyBatch, PromptEmbeds
from aitk.models.flow_matching import resolution_shift, time_shift
from aitk.models.krea2 import Krea2Adapter, Krea2InputError, build_tiny_krea2, lora_key_stem, module_for_stem
from aitk.models.qwen_image import latents as qlatents
from interop_results import record
from upstream_jobs import extras_on_path  # noqa: F401 - autouse fixture: torchao for model.quantize

TEXT_LENGTH = 64  # tokens per prompt in these tests (the pipeline's 512 works alike, only slower)
ASSISTANT_MODULES = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.down", "text_fusion.refiner_blocks.0.attn.to_v"]


@pytest.fixture(scope="session")
def krea2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_krea2(tmp_path_factory.mktemp("krea2-model") / "tiny-krea2")


def make_adapter(folder: Path | str, **model_fields: Any) -> Krea2Adapter:
    model_fields.setdefault("model_kwargs", {"max_sequence_length": TEXT_LENGTH})
    return family.load_adapter(Krea2Adapter, folder, "krea2", **model_fields)


@pytest.fixture(scope="session")
def krea(krea2_model: Path) -> Krea2Adapter:
    return make_adapter(krea2_model)


def write_assistant(model: Path, path: Path) -> Path:
    """A random LoRA (rank 2, alpha 4) for the tiny transformer as ai-toolkit publishes its Krea 2
    training adapter: `diffusion_model.<original name>.lora_A / lora_B.weight`, no alpha."""
    from diffusers import Krea2Transformer2DModel

    from aitk.networks.export import network_to_kohya
    from aitk.networks.lora import inject_network

    transformer = Krea2Transformer2DModel.from_pretrained(model, subfolder="transformer")
    handle = inject_network(transformer, linear_rank=2, linear_alpha=4, candidates=ASSISTANT_MODULES, seed=3)
    family.randomize(handle, seed=4)
    tensors = network_to_kohya(handle, prefix="diffusion_model.", dtype=torch.float32, key_for=lora_key_stem,
                               weight_names=("lora_A", "lora_B"))
    save_file(family.alpha_folded(tensors), str(path))
    return path


# --- the model ---------------------------------------------------------------------------------


def test_tiny_model_loads_as_the_real_pipeline(krea2_model: Path) -> None:
    from diffusers import Krea2Pipeline

    size = sum(p.stat().st_size for p in krea2_model.rglob("*") if p.is_file())
    assert size < 10 * 2**20, size
    pipe = Krea2Pipeline.from_pretrained(krea2_model)
    assert type(pipe.text_encoder).__name__ == "Qwen3VLModel" and pipe.text_encoder_select_layers == (2, 3, 4)
    assert not pipe.config.is_distilled
    assert build_tiny_krea2(krea2_model) == krea2_model  # kept, not rebuilt


def test_load_facts(krea: Krea2Adapter) -> None:
    for module in (krea.transformer, krea.vae, krea.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())
    assert krea.text_encoder.visual is None  # text only
    assert krea.max_sequence_length == TEXT_LENGTH and krea.vae_scale_factor == 8
    assert krea.scheduler_config["max_image_seq_len"] == 6400 and krea.scheduler_config["max_shift"] == 1.15
    assert Krea2Adapter.bucket_divisibility == 16 and not krea.uses_controls
    assert krea.network_candidates(False) is None  # every Linear of the transformer, as ai-toolkit
    assert krea.offload_blocks(krea.transformer) == list(krea.transformer.transformer_blocks)
    assert len(krea.offload_blocks(krea.text_encoder)) == 4  # the text model's layers, no vision blocks


def test_lora_names_are_the_original_ones_diffusers_converts(krea: Krea2Adapter) -> None:
    """Every Linear of the transformer has one original name, and diffusers' reader of original
    (ai-toolkit / ComfyUI) files maps it back to the same module."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_krea2_lora_to_diffusers

    linears = [n for n, m in krea.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    assert krea.lora_key_stem("transformer_blocks.1.attn.to_out.0") == "diffusion_model.blocks.1.attn.wo"
    assert krea.lora_key_stem("text_fusion.projector") == "diffusion_model.txtfusion.projector"
    stems = {krea.lora_key_stem(n): n for n in linears}
    assert len(stems) == len(linears) and all(module_for_stem(s) == n for s, n in stems.items())
    converted = _convert_non_diffusers_krea2_lora_to_diffusers(
        {f"{s}.lora_A.weight": torch.zeros(1) for s in stems}
    )
    assert set(converted) == {f"transformer.{n}.lora_A.weight" for n in linears}
    with pytest.raises(ValueError, match="original checkpoint layout"):
        krea.lora_key_stem("transformer_blocks.0.attn.norm_q")


def test_encode_prompts_is_the_pipeline_encoding(krea: Krea2Adapter, krea2_model: Path) -> None:
    from diffusers import Krea2Pipeline

    prompts = ["a red circle", "a blue square on a grey ground, " * 2]
    cond = krea.encode_prompts(prompts)
    pipe = Krea2Pipeline.from_pretrained(krea2_model)
    hidden, mask = pipe.encode_prompt(prompts, max_sequence_length=TEXT_LENGTH)
    assert hidden.shape == (2, TEXT_LENGTH, 3, 32)
    lengths = mask.sum(1).tolist()
    assert cond.extra["mask"].sum(1).tolist() == lengths and cond.hidden_states.shape == (2, max(lengths), 3, 32)
    for i in range(2):  # each prompt's real tokens (the template suffix after the middle padding too), in order
        assert torch.equal(cond.hidden_states[i, : lengths[i]], hidden[i][mask[i]])
        assert not cond.hidden_states[i, lengths[i]:].any()
    assert krea.encode_prompts(prompts[:1]).hidden_states.shape[1] == lengths[0]


# --- the objective -----------------------------------------------------------------------------


def test_noisy_batch_is_rectified_flow_with_krea2s_shift(krea: Krea2Adapter) -> None:
    latents = krea.encode_images(family.pixels(1))
    assert latents.shape == (2, 16, 8, 8) and torch.equal(latents, krea.encode_images(family.pixels(1)))
    a = krea.make_noisy_batch(latents, TrainConfig(timestep_type="shift"), torch.Generator().manual_seed(5))
    s = (a.timesteps / 1000).view(-1, 1, 1, 1)
    noise = (a.noisy_latents - (1 - s) * latents) / s
    torch.testing.assert_close(a.target, noise - latents, rtol=1e-4, atol=1e-4)
    # 16 tokens of 2x2 patches: mu on the line from 0.5 at 256 tokens to 1.15 at 6400
    mu = resolution_shift(16, krea.scheduler_config)
    assert mu == pytest.approx(0.5 + (16 - 256) * 0.65 / 6144)
    u = torch.rand(2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(a.timesteps / 1000, time_shift(u, mu).float())
    family.check_weighted_loss_and_min_snr_refused(krea, latents, 5)
    with pytest.raises(Krea2InputError, match="bypass_guidance_embedding"):
        krea.make_noisy_batch(latents, TrainConfig(bypass_guidance_embedding=True), None)
    with pytest.raises(Krea2InputError, match="even height"):
        krea.make_noisy_batch(torch.zeros(1, 16, 7, 8), TrainConfig(), None)


def test_predict_is_the_velocity_the_pipeline_steps_with(krea: Krea2Adapter) -> None:
    """One guided pipeline step (sample guidance 3 = the pipeline's 2): what the transformer saw
    and gave (cond pass, the pipeline's padded prompt), read back through `predict` on our
    compact prompt."""
    seen: list[dict[str, Any]] = []
    handle = krea.transformer.register_forward_hook(lambda m, a, k, o: seen.append({**k, "out": o[0]}),
                                                    with_kwargs=True)
    try:
        pipe = krea.sample_pipeline()
        pipe.set_progress_bar_config(disable=True)
        pipe(prompt="a red circle", negative_prompt="blurry", height=64, width=64, num_inference_steps=1,
             guidance_scale=3.0, max_sequence_length=TEXT_LENGTH, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert len(seen) == 2 and pipe.guidance_scale == 2.0  # classifier-free guidance: cond, then uncond
    assert seen[0]["encoder_hidden_states"].shape[1] == TEXT_LENGTH  # padded in the pipeline
    x = qlatents.unpack_latents(seen[0]["hidden_states"], 8, 8)
    batch = NoisyBatch(x, seen[0]["timestep"] * 1000, torch.zeros_like(x))
    with torch.no_grad():
        pred = krea.predict(batch, krea.encode_prompts(["a red circle"]))
    torch.testing.assert_close(qlatents.pack_latents(pred), seen[0]["out"], rtol=1e-5, atol=1e-5)
    assert float(seen[0]["timestep"][0]) == pytest.approx(1.0)  # the first step is pure noise
    cond, uncond = krea.encode_prompts(["a red circle"]), krea.encode_prompts([""])
    latents = pipe(**krea.preview_prompt_kwargs(cond, uncond), height=64, width=64, num_inference_steps=2,
                   guidance_scale=2.0, output_type="latent").images
    assert krea.decode_latents(latents)[0].size == (64, 64)


def test_a_batch_of_prompts_of_different_lengths_predicts_as_each_prompt_alone(krea: Krea2Adapter) -> None:
    prompts = ["a red circle", "a blue square on a grey ground, " * 2]
    batch = krea.make_noisy_batch(krea.encode_images(family.pixels(4)), TrainConfig(), torch.Generator().manual_seed(3))
    with torch.no_grad():
        together = krea.predict(batch, krea.encode_prompts(prompts))
        alone = [krea.predict(NoisyBatch(batch.noisy_latents[i : i + 1], batch.timesteps[i : i + 1],
                                         batch.target[i : i + 1]), krea.encode_prompts([p]))
                 for i, p in enumerate(prompts)]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)
    cond = krea.encode_prompts(prompts)
    unmasked = PromptEmbeds(cond.hidden_states, {"mask": torch.ones_like(cond.extra["mask"])})  # zeros as tokens
    with torch.no_grad():
        assert (krea.predict(batch, unmasked)[0] - alone[0][0]).abs().max() > 1e-4


# --- loading -----------------------------------------------------------------------------------


def test_transformer_folder_takes_its_other_parts_from_extras(
    krea: Krea2Adapter, krea2_model: Path, tmp_path: Path
) -> None:
    def reads_the_extras_model_index(adapter: Krea2Adapter) -> None:
        assert adapter.pipeline_options["text_encoder_select_layers"] == [2, 3, 4]

    family.check_parts_from_extras(krea, krea2_model, make_adapter, tmp_path, reads_the_extras_model_index,
                                   file_refused=False)
    with pytest.raises(Krea2InputError, match="model.model_kwargs.edit"):
        make_adapter(krea2_model, model_kwargs={"edit": True})


# --- the training adapter ----------------------------------------------------------------------


def test_turbo_assistant_is_on_in_training_and_off_in_previews(tmp_path_factory: pytest.TempPathFactory) -> None:
    turbo_model = build_tiny_krea2(tmp_path_factory.mktemp("krea2-turbo") / "tiny-krea2-turbo", "turbo")
    path = write_assistant(turbo_model, tmp_path_factory.mktemp("krea2-assistant") / "adapter.safetensors")
    helped = make_adapter(turbo_model, assistant_lora_path=str(path))
    assert helped.has_assistant and helped._pipeline().config.is_distilled
    batch = helped.make_noisy_batch(helped.encode_images(family.pixels(5)), TrainConfig(),
                                    torch.Generator().manual_seed(9))
    cond = helped.encode_prompts(["a red circle"])
    family.check_assistant_on_in_training_off_in_previews(
        helped, make_adapter(turbo_model), batch, PromptEmbeds.cat([cond, cond]), ASSISTANT_MODULES,
        "text_fusion.refiner_blocks.0.attn.to_v", preview_tol=1e-6,
    )


# --- end to end --------------------------------------------------------------------------------


def _job(tmp_path: Path, name: str, model_dir: Path, data: Path, **changes: Any) -> Path:
    return family.write_job(tmp_path, name, model_dir, data, {
        "model": {"arch": "krea2", "model_kwargs": {"max_text_length": TEXT_LENGTH}},
        "train": {"steps": 30, "batch_size": 2, "lr": 5e-3, "timestep_type": "weighted", "lr_scheduler": "constant"},
        "network": {"type": "lora", "linear": 8, "linear_alpha": 16},
        "save": {"save_every": 1000},
        "sample": {"sample_every": 15, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 3.0,
                   "prompts": ["a red circle, [trigger] style"], "seed": 5},
    }, changes)


def _render(pipe: Any) -> torch.Tensor:
    """A seeded 2-step render with guidance 2 in the pipeline's convention (ours: sample guidance 3)."""
    pipe.set_progress_bar_config(disable=True)
    ours = type(pipe).__name__ == "Krea2PreviewPipeline"
    return pipe(prompt="a red circle, shp style", height=64, width=64, num_inference_steps=2,
                guidance_scale=3.0 if ours else 2.0, max_sequence_length=TEXT_LENGTH,
                generator=torch.Generator().manual_seed(3), output_type="latent").images


def _diffusers_diff(adapter: Krea2Adapter, model: Path, lora: Path) -> tuple[float, float]:
    from diffusers import Krea2Pipeline

    return family.diffusers_lora_diff(adapter, Krea2Pipeline, model, lora, _render)


def _round_trip(adapter: Krea2Adapter, model: Path, lora: Path, kind: str, **network: Any) -> float:
    return family.check_round_trip("krea2", adapter, make_adapter(model), lora, kind, **network)


@pytest.fixture(scope="module")
def lora_run(krea2_model: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("krea2-lora")
    return (*family.train(_job(tmp, "k2lora", krea2_model, shapes_dataset)), tmp)


def test_lora_trains_with_falling_loss_previews_and_file_names(lora_run: tuple) -> None:
    trainer, result, _ = lora_run
    family.check_falling_loss_and_previews(result, "k2lora")
    wrapped = trainer.network.wrapped_module_names()
    assert "transformer_blocks.1.attn.to_gate" in wrapped and "text_fusion.projector" in wrapped
    family.check_folded_lora_file(trainer, result.final_lora, "krea2/lora", "krea2", prefix="",
                                  weight_names=("lora_A", "lora_B"), stem_for=lora_key_stem)


def test_lora_loads_in_diffusers_exactly(lora_run: tuple, krea2_model: Path) -> None:
    """Krea2Pipeline's reader converts the original names but refuses `.alpha`: `aitk convert`
    writes the diffusers layout from the comfyui file (and back unchanged), which loads exactly;
    the comfyui file with alpha folded into lora_B (ai-toolkit's own layout) loads exactly too."""
    from test_tools import aitk

    trainer, result, tmp = lora_run
    converted = family.diffusers_layout_round_trip(result.final_lora, "krea2", tmp)
    original = load_file(str(result.final_lora))
    diff, effect = _diffusers_diff(trainer.adapter, krea2_model, converted)
    print(f"krea2 lora: diffusers max abs diff {diff:.3g}, LoRA effect {effect:.3g}")
    record("krea2", "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="diffusers")
    assert effect > 1e-3 and diff < 1e-4, (diff, effect)
    folded = tmp / "k2lora_original_names.safetensors"
    save_file(family.alpha_folded(original), str(folded))
    diff, _ = _diffusers_diff(trainer.adapter, krea2_model, folded)
    record("krea2", "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="comfyui",
           note="alpha folded into lora_B (ai-toolkit's layout)")
    assert diff < 1e-4, diff


def test_merge_round_trip_and_lora_info_know_krea2(lora_run: tuple, krea2_model: Path) -> None:
    from diffusers import Krea2Transformer2DModel

    trainer, result, tmp = lora_run
    guessed = family.check_lora_info(trainer, result.final_lora, "krea2", tmp)  # a copy without a header
    # named with WAN's while WAN's guess takes any `diffusion_model.blocks.` file (aitk.models.wan)
    assert "krea2" in guessed["architecture"], guessed
    assert not Krea2Adapter.matches_lora_keys({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(1)})
    adapter = trainer.adapter
    family.check_merge("krea2", adapter, krea2_model, result.final_lora, tmp, Krea2Transformer2DModel)
    _round_trip(adapter, krea2_model, result.final_lora, "lora", linear_rank=8)


def test_dora_saved_for_diffusers_loads_exactly(krea2_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, "k2dora", krea2_model, shapes_dataset, **family.DORA_RUN)
    trainer, result = family.train(job)
    family.check_dora_loads_in_diffusers("krea2", trainer, result, "k2dora",
                                         lambda adapter, lora: _diffusers_diff(adapter, krea2_model, lora))


def test_lokr_with_cached_text_loads_back_exactly(krea2_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    """LoKr with cached text embeddings (encoder released; previews from the cache); the file
    reads back exactly into a fresh network by aitk's loader."""
    job = _job(tmp_path, "k2lokr", krea2_model, shapes_dataset, **family.CACHED_TEXT_LOKR_RUN)
    trainer, result = family.train(job)
    family.check_cached_text_lokr_run(trainer, result, "k2lokr", 6, "diffusion_model.")
    trainer.adapter.text_encoder = make_adapter(krea2_model).text_encoder  # _round_trip encodes a prompt
    trainer.adapter._text_pipe = None
    _round_trip(trainer.adapter, krea2_model, result.final_lora, "lokr", linear_rank=2, lokr_factor=-1)


def test_quantized_base_trains_a_full_precision_lora(krea2_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    """qint8 base (torchao): the LoRA trains on it and its file changes the plain model in diffusers."""
    from diffusers import Krea2Pipeline

    job = _job(tmp_path, "k2q", krea2_model, shapes_dataset, **family.QUANTIZED_RUN)
    trainer, result = family.train(job)
    family.finite_run(result, "k2q")
    family.check_quantized_base(trainer, every=False)
    converted = family.converted_file(result.final_lora, "diffusers", "krea2", tmp_path / "k2q_diffusers.safetensors")
    family.check_lora_changes_pipeline(Krea2Pipeline.from_pretrained(krea2_model), converted, _render)


def test_presets_and_upstream_settings_validate_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from aitk.config.validate import validate_command

    for key in ("krea2", "krea2_turbo"):
        job, path = family.check_preset_validates_clean(key, tmp_path, capsys)
    job["config"]["process"][0]["train"]["attention_backend"] = "flash"  # no mask: padded batches need one
    path.write_text(yaml.safe_dump(job))
    assert validate_command([str(path)]) != 0
    assert "attention kernel without an attention mask" in "".join(capsys.readouterr())
