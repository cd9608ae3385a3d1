"""Qwen-Image on the tiny random-init model of the real classes: the pipeline's text encoding
(prompts of different lengths batched with a mask), 2x2 patch tokens and the VAE's normalisation,
the flow-matching objective with the scheduler's resolution-dependent shift and shift_terminal,
previews with ai-toolkit's guidance, where parts load from (a transformer file or folder with
extras_name_or_path), and runs whose files load in diffusers exactly (LoRA in both layouts, DoRA),
LoKr, a quantized base, the tools and the memory plan.

Everything runs offline on CPU in fp32 with 64 px images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aitk.config.schema import ModelConfig, TrainConfig
from aitk.models.base import ModelLoadError, NoisyBatch, PromptEmbeds
from aitk.models.flow_matching import time_shift
from aitk.models.qwen_image import (
    QwenImageAdapter,
    QwenImageInputError,
    build_tiny_qwen_image,
    image_seq_shift,
    pack_latents,
    stretch_to_terminal,
    training_sigmas,
    unpack_latents,
)
import family_checks as family
from conftest import base_process, deep_update, write_job
from interop_results import record
from upstream_jobs import extras_on_path  # noqa: F401 - autouse fixture: torchao for model.quantize

CPU = torch.device("cpu")


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def qwen_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen_image(tmp_path_factory.mktemp("qwen-image-model") / "tiny-qwen-image")


def make_adapter(folder: Path | str, **model_fields: Any) -> QwenImageAdapter:
    return family.load_adapter(QwenImageAdapter, folder, "qwen_image", **model_fields)


@pytest.fixture(scope="session")
def qwen(qwen_model: Path) -> QwenImageAdapter:
    return make_adapter(qwen_model)


# --- the model ---------------------------------------------------------------------------------


def test_tiny_model_is_the_real_pipeline_in_small(qwen_model: Path) -> None:
    from diffusers import QwenImagePipeline

    size = sum(p.stat().st_size for p in qwen_model.rglob("*") if p.is_file())
    assert size < 10 * 2**20, size
    pipe = QwenImagePipeline.from_pretrained(qwen_model)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    # the template's prefix is as many tokens as the pipeline drops: only the prompt is left
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    assert pipe.text_encoder.config.text_config.hidden_size == pipe.transformer.config.joint_attention_dim
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.in_channels == 64


def test_load_facts(qwen: QwenImageAdapter) -> None:
    assert qwen.text_encoder.model.visual is None  # text-only: the vision tower is dropped
    for module in (qwen.transformer, qwen.vae, qwen.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())
    assert qwen.vae.dtype == torch.float32 and qwen.max_sequence_length == 512
    assert QwenImageAdapter.bucket_divisibility == 32 and not qwen.uses_controls
    assert qwen.scheduler_config["shift_terminal"] == 0.02 and qwen.scheduler_config["max_shift"] == 0.9
    names = qwen.network_candidates(False)
    assert len(names) == 2 * 12 and "transformer_blocks.1.txt_mlp.net.2" in names
    assert not any("mod" in n or "norm" in n or "embed" in n for n in names)
    assert len(qwen.offload_blocks(qwen.transformer)) == 2 and len(qwen.offload_blocks(qwen.text_encoder)) == 2
    assert qwen.lora_key_stem("transformer_blocks.0.attn.to_add_out") == "diffusion_model.transformer_blocks.0.attn.to_add_out"
    ours = {"diffusion_model.transformer_blocks.0.img_mlp.net.2.lora_down.weight": torch.zeros(1)}
    flux = {"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.zeros(1),
            "diffusion_model.double_blocks.0.img_mlp.0.lora_down.weight": torch.zeros(1)}
    assert QwenImageAdapter.matches_lora_keys(ours) and not QwenImageAdapter.matches_lora_keys(flux)


def test_encode_prompts_is_the_pipeline_encoding_and_batches_with_a_mask(qwen: QwenImageAdapter) -> None:
    short, long = qwen.encode_prompts(["a red circle"]), qwen.encode_prompts(["a blue square on the left side"])
    hidden, mask = qwen.sample_pipeline().encode_prompt(prompt=["a red circle"], max_sequence_length=512)
    assert mask is None and torch.equal(short.hidden_states, hidden)  # one prompt: nothing padded
    assert short.extra["mask"].dtype == torch.long and short.extra["mask"].all()
    n, m = short.hidden_states.shape[1], long.hidden_states.shape[1]
    assert n < m and short.hidden_states.shape[2] == 32
    batch = PromptEmbeds.cat([short, long])  # zero-padded to the longer, the mask marks the padding
    assert batch.hidden_states.shape == (2, m, 32)
    assert batch.extra["mask"].tolist() == [[1] * n + [0] * (m - n), [1] * m]
    both, both_mask = qwen.sample_pipeline().encode_prompt(prompt=["a red circle", "a blue square on the left side"])
    torch.testing.assert_close(batch.hidden_states, both, rtol=1e-5, atol=1e-5)
    assert torch.equal(batch.extra["mask"], both_mask)
    # the padded batch predicts what each prompt gives alone
    latents = qwen.encode_images(family.pixels(1))
    noisy = qwen.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = qwen.predict(noisy, batch)
        alone = [qwen.predict(NoisyBatch(noisy.noisy_latents[i:i + 1], noisy.timesteps[i:i + 1], noisy.target[i:i + 1]),
                              e) for i, e in enumerate((short, long))]
    torch.testing.assert_close(out, torch.cat(alone), rtol=1e-5, atol=1e-5)
    other = qwen.predict(noisy, PromptEmbeds.cat([long, short]))
    assert (other - out).abs().max() > 1e-4  # the text conditions the prediction


def test_latents_and_tokens_are_the_pipelines(qwen: QwenImageAdapter) -> None:
    from diffusers import QwenImagePipeline

    latents = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(0))
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 4 * 3, 64) and torch.equal(unpack_latents(tokens, 8, 6), latents)
    torch.testing.assert_close(tokens[0, 1].view(16, 2, 2), latents[0, :, 0:2, 2:4])
    assert torch.equal(QwenImagePipeline._unpack_latents(tokens, 64, 48, 8)[:, :, 0], latents)
    with pytest.raises(QwenImageInputError, match="even"):
        pack_latents(torch.zeros(1, 16, 7, 8))
    encoded = qwen.encode_images(family.pixels(1))
    raw = qwen.vae.encode(family.pixels(1).unsqueeze(2)).latent_dist.mode()[:, :, 0]
    cfg = qwen.vae.config
    want = (raw - torch.tensor(cfg.latents_mean).view(1, 16, 1, 1)) / torch.tensor(cfg.latents_std).view(1, 16, 1, 1)
    assert encoded.shape == (2, 16, 8, 8) and torch.equal(encoded, qwen.encode_images(family.pixels(1)))
    torch.testing.assert_close(encoded, want)


def test_predict_is_the_velocity_the_pipeline_steps_with(qwen: QwenImageAdapter) -> None:
    latents = qwen.encode_images(family.pixels(2, b=1, h=64, w=96))
    cond = qwen.encode_prompts(["a red circle"])
    noisy = qwen.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = qwen.predict(noisy, cond)
        want = qwen.transformer(
            hidden_states=pack_latents(noisy.noisy_latents), timestep=noisy.timesteps / 1000,
            encoder_hidden_states=cond.hidden_states, img_shapes=[[(1, 4, 6)]], return_dict=False,
        )[0]
    assert out.shape == latents.shape == (1, 16, 8, 12)
    assert torch.equal(pack_latents(out), want)


# --- the objective -----------------------------------------------------------------------------


def test_noisy_batch_is_rectified_flow(qwen: QwenImageAdapter) -> None:
    latents = qwen.encode_images(family.pixels(3))
    cfg = TrainConfig(timestep_type="linear")
    a = qwen.make_noisy_batch(latents, cfg, torch.Generator().manual_seed(5))
    b = qwen.make_noisy_batch(latents, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(a.noisy_latents, b.noisy_latents) and torch.equal(a.timesteps, b.timesteps)
    assert a.loss_weights is None and ((a.timesteps > 0) & (a.timesteps <= 1000)).all()
    s = (a.timesteps / 1000).view(-1, 1, 1, 1)
    noise = (a.noisy_latents - (1 - s) * latents) / s
    torch.testing.assert_close(a.target, noise - latents, rtol=1e-4, atol=1e-4)
    family.check_weighted_loss_and_min_snr_refused(qwen, latents, 5)
    with pytest.raises(QwenImageInputError, match="train.bypass_guidance_embedding"):
        qwen.make_noisy_batch(latents, TrainConfig(bypass_guidance_embedding=True), None)


def test_shift_types_follow_the_scheduler_with_its_terminal(qwen: QwenImageAdapter) -> None:
    """The shift types draw through the schedule FlowMatchEulerDiscreteScheduler makes from Qwen-Image's
    config: resolution-dependent mu, then the stretch that ends the schedule at shift_terminal."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = qwen.scheduler_config
    mu = image_seq_shift(4096, config)
    assert mu == pytest.approx(0.5 + (0.9 - 0.5) * (4096 - 256) / (8192 - 256))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    grid = np.linspace(1.0, 1 / 1000, 1000)
    scheduler.set_timesteps(sigmas=grid, mu=mu)
    ours = stretch_to_terminal(time_shift(torch.tensor(grid, dtype=torch.float64), mu), mu, 0.02)
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), ours.double(), rtol=1e-6, atol=1e-6)
    assert float(ours[-1]) == pytest.approx(0.02)

    n = 2000
    for kind in ("shift", "flux_shift", "lumina2_shift"):
        small = training_sigmas(n, (16, 16), TrainConfig(timestep_type=kind), config, torch.Generator().manual_seed(0))
        large = training_sigmas(n, (128, 128), TrainConfig(timestep_type=kind), config, torch.Generator().manual_seed(0))
        assert (large >= small).all() and large.mean() > small.mean() + 0.02, kind
        assert small.min() >= 0.02 and large.max() <= 1.0  # the stretch lifts the lowest levels
    plain = training_sigmas(n, (16, 16), TrainConfig(timestep_type="linear"), config, torch.Generator().manual_seed(0))
    assert plain.min() < 0.01  # the other types are not stretched
    fixed = dict(config, use_dynamic_shifting=False, shift=3.0, shift_terminal=None)
    shifted = training_sigmas(n, (16, 16), TrainConfig(timestep_type="shift"), fixed, torch.Generator().manual_seed(0))
    kept = plain > 2e-3  # both are kept above SIGMA_MIN, each after its own map
    torch.testing.assert_close(shifted[kept], time_shift(plain.double(), math.log(3.0)).float()[kept],
                               rtol=1e-5, atol=1e-6)


# --- previews ----------------------------------------------------------------------------------


def test_previews_take_guidance_as_the_true_cfg_scale(qwen: QwenImageAdapter, qwen_model: Path) -> None:
    from types import SimpleNamespace

    from diffusers import QwenImagePipeline

    def render(pipe: Any, **kwargs: Any) -> torch.Tensor:
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt="a red circle", height=64, width=96, num_inference_steps=2, output_type="latent",
                    generator=torch.Generator().manual_seed(4), **kwargs).images

    ours = qwen.sample_pipeline()
    guided, unguided = render(ours, guidance_scale=4.0), render(ours, guidance_scale=1.0)
    plain = QwenImagePipeline.from_pretrained(qwen_model)
    torch.testing.assert_close(guided, render(plain, true_cfg_scale=4.0, negative_prompt=""), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unguided, render(plain, true_cfg_scale=1.0), rtol=1e-5, atol=1e-5)
    assert (guided - unguided).abs().max() > 1e-3
    request = SimpleNamespace(prompt="a red circle", width=96, height=64)  # what preview_kwargs reads
    assert qwen.preview_kwargs(request) == {"max_sequence_length": 512}
    image = qwen.decode_latents(guided)[0]
    assert image.size == (96, 64)
    assert qwen.preview_sampler_note("flowmatch") is None and "flow-match" in qwen.preview_sampler_note("ddpm")


# --- where the parts come from -----------------------------------------------------------------


def test_transformer_only_sources_take_their_other_parts_from_extras(
    qwen: QwenImageAdapter, qwen_model: Path, tmp_path: Path
) -> None:
    import shutil

    single = tmp_path / "qwen_image_transformer.safetensors"
    shutil.copy(qwen_model / "transformer" / "diffusion_pytorch_model.safetensors", single)
    folder = tmp_path / "finetune"
    shutil.copytree(qwen_model / "transformer", folder / "transformer")
    want = qwen.transformer.state_dict()
    for source in (single, folder):
        loaded = make_adapter(source, extras_name_or_path=str(qwen_model))
        assert all(torch.equal(v, want[k]) for k, v in loaded.transformer.state_dict().items())
        assert loaded.text_encoder is not None and loaded.text_encoder.model.visual is None


def test_load_errors_name_the_key(tmp_path: Path, qwen_model: Path) -> None:
    import shutil

    with pytest.raises(ModelLoadError, match="model.name_or_path.*neither an existing path nor a hub id"):
        make_adapter(tmp_path / "missing")
    shutil.copytree(qwen_model / "transformer", tmp_path / "finetune" / "transformer")
    with pytest.raises(ModelLoadError, match="has no text_encoder/; set model.extras_name_or_path"):
        make_adapter(tmp_path / "finetune")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="no .safetensors"):
        make_adapter(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"could not load a Qwen-Image model.*transformer/"):
        make_adapter(tmp_path / "empty")
    with pytest.raises(ValueError, match="model.model_kwargs.max_sequence_length"):
        make_adapter(qwen_model, model_kwargs={"max_sequence_length": 2048})


# --- end to end --------------------------------------------------------------------------------


def _job(tmp_path: Path, name: str, model_dir: Path, data: Path, **changes: Any) -> Path:
    return family.write_job(tmp_path, name, model_dir, data, {
        "model": {"arch": "qwen_image"},
        "train": {"steps": 30, "batch_size": 2, "lr": 5e-3, "timestep_type": "weighted", "lr_scheduler": "constant"},
        "network": {"type": "lora", "linear": 8, "linear_alpha": 16},
        "sample": {"sample_every": 15, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 3.0,
                   "prompts": ["a red circle, [trigger] style"], "seed": 5},
    }, changes)



def _render(pipe: Any) -> torch.Tensor:
    """A guided render (true CFG 3 with a negative prompt: both branches see the LoRA)."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a red circle, shp style", negative_prompt="blurry", true_cfg_scale=3.0, height=64, width=64,
                num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="latent").images


def _diffusers_diff(trainer: Any, model: Path, lora: Path) -> tuple[float, float]:
    """(max |ours - diffusers with the file loaded|, max |ours - the plain model|): the trainer's
    own preview pipeline against QwenImagePipeline.load_lora_weights on a fresh pipeline."""
    from diffusers import QwenImagePipeline

    return family.diffusers_lora_diff(trainer.adapter, QwenImagePipeline, model, lora, _render)


@pytest.fixture(scope="module")
def lora_run(qwen_model: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("qwen-image-lora")
    return (*family.train(_job(tmp, "qlora", qwen_model, shapes_dataset)), tmp)


def test_lora_trains_with_falling_loss_previews_and_comfyui_names(lora_run: tuple) -> None:
    trainer, result, _ = lora_run
    family.check_falling_loss_and_previews(result, "qlora")
    assert trainer.network.wrapped_module_names() == trainer.adapter.network_candidates(False)
    family.check_lora_file(trainer, result.final_lora, "qwen-image/lora", "qwen_image", prefix="diffusion_model.",
                           weight_names=("lora_down", "lora_up"))


def test_lora_loads_exactly_in_diffusers_in_both_layouts(lora_run: tuple, qwen_model: Path) -> None:
    trainer, result, tmp = lora_run
    converted = family.diffusers_layout_round_trip(result.final_lora, "qwen_image", tmp)
    for layout, path in (("comfyui", result.final_lora), ("diffusers", converted)):
        diff, effect = _diffusers_diff(trainer, qwen_model, path)
        record("qwen_image", "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout=layout)
        assert effect > 1e-3 and diff < 1e-4, (layout, diff, effect)


def test_merge_and_lora_info_know_qwen_image(lora_run: tuple, qwen_model: Path) -> None:
    from diffusers import QwenImageTransformer2DModel

    trainer, result, tmp = lora_run
    guessed = family.check_lora_info(trainer, result.final_lora, "qwen_image", tmp)  # the key names alone
    assert guessed["architecture"] == "qwen_image"
    adapter = trainer.adapter
    batch, _ = family.red_circle_inputs(adapter, 2)
    cond = PromptEmbeds.cat([adapter.encode_prompts(["a red circle"]), adapter.encode_prompts(["a blue square"])])
    family.check_merge("qwen_image", adapter, qwen_model, result.final_lora, tmp, QwenImageTransformer2DModel,
                       batch, cond)


def test_dora_saved_for_diffusers_loads_exactly(qwen_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, "qdora", qwen_model, shapes_dataset, train={"steps": 6},
               network=family.DORA_NETWORK, save={"save_format": "diffusers"},
               sample={"sample_every": 1000})
    trainer, result = family.train(job)
    family.check_dora_loads_in_diffusers("qwen_image", trainer, result, "qdora",
                                         lambda adapter, lora: _diffusers_diff(trainer, qwen_model, lora))


def test_lokr_trains_in_comfyui_names_and_round_trips(qwen_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, "qlokr", qwen_model, shapes_dataset, train={"steps": 6}, sample={"sample_every": 1000},
               network=family.LOKR_NETWORK)
    trainer, result = family.train(job)
    family.finite_run(result, "qlokr")
    tensors = load_file(str(result.final_lora))
    assert tensors and all(k.startswith("diffusion_model.transformer_blocks.") for k in tensors)
    assert any(k.endswith(".lokr_w1") for k in tensors)
    family.check_round_trip("qwen_image", trainer.adapter, make_adapter(qwen_model), result.final_lora, "lokr",
                            linear_rank=2)


def test_quantized_base_trains(qwen_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    from diffusers import QwenImagePipeline

    job = _job(tmp_path, "qq", qwen_model, shapes_dataset, train={"steps": 8}, sample={"sample_every": 1000},
               model={"quantize": True, "qtype": "qint8"})
    trainer, result = family.train(job)
    family.finite_run(result, "qq")
    family.check_quantized_base(trainer)
    family.check_lora_changes_pipeline(QwenImagePipeline.from_pretrained(qwen_model), result.final_lora, _render)


# --- the memory plan ---------------------------------------------------------------------------


def test_plan_matches_a_measured_cpu_step(qwen_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    """The plan's step memory against the CPU allocator's (tests/test_plan.py's check), with
    captions capped at 16 tokens so the plan's prompt length is the measured one."""
    from aitk.plan import plan_job
    from aitk.plan.measure import measure_step

    process = deep_update(base_process(qwen_model, shapes_dataset, tmp_path / "out"), {
        "model": {"arch": "qwen_image", "model_kwargs": {"max_sequence_length": 16}},
        "train": {"gradient_checkpointing": False, "batch_size": 4},
    })
    process["datasets"][0]["resolution"] = [512]
    job = write_job(tmp_path / "plan.yaml", "plan", process)
    plan = plan_job(job)
    planned = plan.step.gradients + plan.step.activations + plan.step.workspace
    measured = measure_step(job).peak
    assert measured > 10 * 2**20, measured
    assert abs(planned / measured - 1) <= 0.15, (planned, measured, plan.step)


def test_plan_covers_the_real_model_from_shipped_configs() -> None:
    """`aitk plan` for Qwen/Qwen-Image(-2512) reads the published configs shipped with aitk (nothing
    is downloaded): its parts build at their real sizes, and the adapter binds to them and makes the
    trainer's batch shapes (a full plan of the 20B model traces for a minute: run by hand, see
    docs/models.md)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from aitk.plan.build import build_on_meta
    from aitk.plan.sources import model_spec

    spec = model_spec("Qwen/Qwen-Image-2512", "qwen_image")
    parts = {name: build_on_meta(part) for name, part in spec.parts.items()}
    billions = {name: sum(p.numel() for p in m.parameters()) / 1e9 for name, m in parts.items()}
    assert 20.3 < billions["transformer"] < 20.5 and 8.2 < billions["text_encoder"] < 8.4, billions
    assert 0.1 < billions["vae"] < 0.15, billions
    adapter = QwenImageAdapter(ModelConfig(name_or_path="Qwen/Qwen-Image-2512", arch="qwen_image"), CPU, torch.bfloat16)
    adapter.bind({"transformer": parts["transformer"]}, spec.configs({}))
    assert adapter.scheduler_config["shift_terminal"] == 0.02 and adapter.vae_scale_factor == 8
    with FakeTensorMode():
        noisy, cond = adapter.example_batch(1, (1024, 768), 1, expert="main", with_controls=False)
    assert noisy.noisy_latents.shape == (1, 16, 96, 128) and cond.hidden_states.shape == (1, 512, 3584)
    assert not adapter.transformer.pos_embed.pos_freqs.is_meta  # the RoPE tables the plan traces with


def test_presets_validate_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from aitk.config.validate import validate_command
    from aitk.ui.presets import PRESETS

    for key in ("qwen_image", "qwen_image_2512"):
        job = PRESETS[key]["job"]
        job["config"]["process"][0]["datasets"][0]["folder_path"] = str(tmp_path)
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump(job))
        assert validate_command([str(path)]) == 0
        printed = capsys.readouterr()
        assert "warning" not in printed.out + printed.err, (key, printed)
