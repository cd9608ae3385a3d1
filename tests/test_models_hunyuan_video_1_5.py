"""HunyuanVideo 1.5 (T2V and I2V) on tiny random-init models of the real classes: the pipelines'
prompt encoding (Qwen2.5-VL past the template, ByT5 glyphs), the flow-matching objective and the
transformer call the pipelines make, I2V conditioning equal to the I2V pipeline's own, ComfyUI's
LoRA names (fused q / k / v), an I2V run on clips of mixed length, fps and aspect (loss falls, mp4 +
WebP previews, stop at 15 + resume bit-identical), files that load exactly into diffusers'
transformer (the pipelines have no load_lora_weights), aitk's loader / merge / convert / lora info,
LoKr, DoRA and a quantized base.

Everything runs offline on CPU in fp32 with clips of at most 64 px; prompts are 32 Qwen tokens
(model_kwargs.max_sequence_length) to keep the steps short.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from aitk.config.schema import TrainConfig
from aitk.models import archs
from aitk.models.base import BatchContext, ModelLoadError, PromptEmbeds
from aitk.models.hunyuan_video_1_5 import (
    HunyuanVideo15Adapter,
    HunyuanVideo15I2VAdapter,
    HunyuanVideo15InputError,
    build_tiny_hunyuan_video_15,
    lora_key_stem,
    module_for_stem,
)
import family_checks as family
from interop_results import record
from upstream_jobs import extras_on_path  # noqa: F401 - autouse fixture: torchao for model.quantize

CPU = torch.device("cpu")
T2V, I2V = "hunyuan_video_1_5", "hunyuan_video_1_5_i2v"
TEXT_TOKENS = 32
MODEL_KWARGS = {"max_sequence_length": TEXT_TOKENS}


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hunyuan-video-15")
    return {T2V: build_tiny_hunyuan_video_15(root / "t2v", "t2v"), I2V: build_tiny_hunyuan_video_15(root / "i2v", "i2v")}


def make_adapter(folder: Path | str, arch: str = T2V, **fields: Any) -> HunyuanVideo15Adapter:
    cls = HunyuanVideo15I2VAdapter if arch == I2V else HunyuanVideo15Adapter
    fields.setdefault("model_kwargs", MODEL_KWARGS)
    return family.load_adapter(cls, folder, arch, **fields)


@pytest.fixture(scope="session")
def t2v(models: dict[str, Path]) -> HunyuanVideo15Adapter:
    return make_adapter(models[T2V])


@pytest.fixture(scope="session")
def i2v(models: dict[str, Path]) -> HunyuanVideo15I2VAdapter:
    return make_adapter(models[I2V], I2V)


def pipeline(models: dict[str, Path], arch: str) -> Any:
    from diffusers import HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Pipeline

    cls = HunyuanVideo15ImageToVideoPipeline if arch == I2V else HunyuanVideo15Pipeline
    pipe = cls.from_pretrained(models[arch], dtype=torch.float32)
    pipe.tokenizer_max_length = TEXT_TOKENS
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clip(seed: int, frames: int = 5, h: int = 32, w: int = 48) -> torch.Tensor:
    return torch.rand(2, 3, frames, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def picture(seed: int, w: int = 48, h: int = 32) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(array)


def to_pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float().div(127.5).sub(1).unsqueeze(0)


# --- the model ---------------------------------------------------------------------------------


def test_tiny_models_load_as_the_real_pipelines(models: dict[str, Path]) -> None:
    for arch, folder in models.items():
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        assert size < 10 * 2**20, (arch, size)
        pipe = pipeline(models, arch)
        assert type(pipe.text_encoder).__name__ == "Qwen2_5_VLTextModel"
        assert type(pipe.tokenizer_2).__name__ == "ByT5Tokenizer" 
        assert pipe.transformer.config.task_type == ("i2v" if arch == I2V else "t2v")
        assert (arch == I2V) == (getattr(pipe, "image_encoder", None) is not None)
    assert build_tiny_hunyuan_video_15(models[T2V], "t2v") == models[T2V]  # kept, not rebuilt


def test_facts_of_both_archs(t2v: HunyuanVideo15Adapter, i2v: HunyuanVideo15I2VAdapter, models: dict[str, Path]) -> None:
    for adapter in (t2v, i2v):
        arch = adapter.arch_names[0]
        assert archs.DATA_FACTS[arch] == (adapter.bucket_divisibility, adapter.frame_rule) == (16, "4k+1")
        assert (arch in archs.FIRST_FRAME_ARCHS) == adapter.i2v and arch in archs.MASKED_ATTENTION_ARCHS
        assert arch not in archs.CONV_ARCHS  # no convolutions a network wraps: conv alpha phases warn
        for module in (adapter.transformer, adapter.vae, adapter.text_encoder, adapter.text_encoder_2):
            assert not any(p.requires_grad for p in module.parameters())
        assert adapter.max_sequence_length == TEXT_TOKENS and adapter.scheduler_config["shift"] == 5.0
        assert adapter.offload_blocks(adapter.transformer) == list(adapter.transformer.transformer_blocks)
    assert i2v.image_encoder is not None and i2v.feature_extractor is not None and t2v.image_encoder is None
    with pytest.raises(ModelLoadError, match="hunyuan_video_1_5_i2v"):  # an I2V folder under the T2V arch
        make_adapter(models[I2V], T2V)
    with pytest.raises(ModelLoadError, match="model.name_or_path.*neither"):
        make_adapter(models[T2V].parent / "missing")


def test_lora_key_names_are_comfyuis(t2v: HunyuanVideo15Adapter) -> None:
    """ComfyUI's HunyuanVideo model holds FLUX-style double blocks (fused qkv, proj, mlp.0 / .2,
    mod.lin); its loader maps `diffusion_model.<weight path>`. q / k / v are parts of the fused qkv."""
    per_block = {
        "attn.to_q": "img_attn.qkv.q", "attn.to_k": "img_attn.qkv.k", "attn.to_v": "img_attn.qkv.v",
        "attn.add_q_proj": "txt_attn.qkv.q", "attn.add_k_proj": "txt_attn.qkv.k", "attn.add_v_proj": "txt_attn.qkv.v",
        "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
        "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
        "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    }
    names = t2v.network_candidates(False)
    assert sorted(names) == sorted(f"transformer_blocks.{i}.{n}" for i in range(2) for n in per_block)
    for i in range(2):
        for ours, theirs in per_block.items():
            stem = t2v.lora_key_stem(f"transformer_blocks.{i}.{ours}")
            assert stem == f"diffusion_model.double_blocks.{i}.{theirs}"
            assert module_for_stem(stem) == f"transformer_blocks.{i}.{ours}"
    assert t2v.lora_fused_weights.fused_stem("diffusion_model.double_blocks.1.txt_attn.qkv.k") == \
        "diffusion_model.double_blocks.1.txt_attn.qkv"
    assert lora_key_stem("context_embedder.token_refiner.refiner_blocks.0.attn.to_v") == \
        "diffusion_model.txt_in.individual_token_refiner.blocks.0.self_attn.qkv.v"
    with pytest.raises(ValueError, match="ComfyUI"):
        lora_key_stem("image_embedder.linear_1")


def test_encode_prompts_is_the_pipeline_encoding(t2v: HunyuanVideo15Adapter, models: dict[str, Path]) -> None:
    prompts = ["a red circle", 'a sign that reads "OPEN" on a door']
    cond = t2v.encode_prompts(prompts)
    assert cond.hidden_states.shape == (2, TEXT_TOKENS, 32) and cond.extra["glyph"].shape == (2, 256, 16)
    # the prompt's bytes, then <|im_end|>, "\n", <|im_start|> and "assistant\n" (10 bytes): no template before it
    assert cond.extra["mask"][0].sum() == len(b"a red circle") + 13
    assert cond.extra["glyph_mask"][0].sum() == 0 and cond.extra["glyph_mask"][1].sum() > 0  # quoted text only
    with torch.no_grad():  # as the adapter encodes (autograd would pick another attention kernel)
        embeds, mask, glyph, glyph_mask = pipeline(models, T2V).encode_prompt(prompts, device=CPU, batch_size=2)
    for ours, theirs in zip((cond.hidden_states, cond.extra["mask"], cond.extra["glyph"], cond.extra["glyph_mask"]),
                            (embeds, mask, glyph, glyph_mask)):
        assert torch.equal(ours, theirs), (ours - theirs).abs().max()


# --- the objective -----------------------------------------------------------------------------


def test_noisy_batch_is_rectified_flow_and_predict_is_the_pipelines_call(t2v: HunyuanVideo15Adapter) -> None:
    latents = t2v.encode_images(clip(1, frames=9))
    assert latents.shape == (2, 8, 3, 2, 3)  # 9 frames -> 3 latent frames, 16x spatial
    with pytest.raises(HunyuanVideo15InputError, match="4k\\+1"):
        t2v.encode_images(clip(1, frames=6))
    batch = t2v.make_noisy_batch(latents, TrainConfig(timestep_type="shift"), torch.Generator().manual_seed(5))
    s = (batch.timesteps / 1000).view(-1, 1, 1, 1, 1)
    noise = (batch.noisy_latents - (1 - s) * latents) / s
    torch.testing.assert_close(batch.target, noise - latents, rtol=1e-4, atol=1e-4)
    u = torch.rand(2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    shifted = 5.0 * u / (1 + 4.0 * u)  # the scheduler's shift of 5 on a uniform draw
    torch.testing.assert_close(batch.timesteps.double() / 1000, shifted, rtol=1e-5, atol=1e-5)
    assert not batch.extra["condition"].any() and batch.extra["condition"].shape == (2, 9, 3, 2, 3)
    cond = t2v.encode_prompts(["a red circle", "a blue square"])
    with torch.no_grad():
        ours = t2v.predict(batch, cond)
        # what HunyuanVideo15Pipeline feeds its transformer: zero condition and mask, 729 zero image tokens
        theirs = t2v.transformer(
            hidden_states=torch.cat([batch.noisy_latents, torch.zeros(2, 9, 3, 2, 3)], dim=1),
            image_embeds=torch.zeros(2, 729, 16), timestep=batch.timesteps,
            encoder_hidden_states=cond.hidden_states, encoder_attention_mask=cond.extra["mask"],
            encoder_hidden_states_2=cond.extra["glyph"], encoder_attention_mask_2=cond.extra["glyph_mask"],
            return_dict=False)[0]
    assert torch.equal(ours, theirs) and ours.shape == latents.shape


def test_i2v_condition_is_the_pipelines_and_changes_the_prediction(
    i2v: HunyuanVideo15I2VAdapter, models: dict[str, Path]
) -> None:
    pipe = pipeline(models, I2V)
    image = picture(3)  # already at its bucket's size, as the data gives first frames
    latents = torch.randn(1, 8, 3, 2, 3)
    want_cond, want_mask = pipe.prepare_cond_latents_and_mask(latents, image, 1, 32, 48, torch.float32, CPU)
    first = to_pixels(image)
    got = i2v.condition(latents, first)
    assert torch.equal(got, torch.cat([want_cond, want_mask], dim=1)) and got[:, :8, 0].abs().sum() > 0
    torch.testing.assert_close(i2v.image_embeds(first), pipe.encode_image(image, 1, CPU, torch.float32),
                               rtol=0, atol=1e-6)
    batch = i2v.make_noisy_batch(latents.expand(2, -1, -1, -1, -1), TrainConfig(), torch.Generator().manual_seed(1),
                                 BatchContext(first_frames=torch.cat([first, to_pixels(picture(4))])))
    cond = i2v.encode_prompts(["a red circle", "a red circle"])
    with torch.no_grad():
        conditioned = i2v.predict(batch, cond)
        batch.extra["condition"] = torch.zeros_like(batch.extra["condition"])
        del batch.extra["image_embeds"]
        plain = i2v.predict(batch, cond)
    assert (conditioned - plain).abs().max() > 1e-3
    with pytest.raises(HunyuanVideo15InputError, match="first frames"):
        i2v.condition(latents, None)  # a clip needs its first frame; a still is its own
    assert torch.equal(i2v.condition(latents[:, :, :1], None)[:, :8], latents[:, :, :1])


# --- end to end --------------------------------------------------------------------------------


def write_mixed_clips(folder: Path) -> Path:
    """Clips of different length, fps and aspect, and a still (`still.png`, also the previews' start
    image), each with a caption; `folder` is created."""
    from test_data_video import h264_or_mpeg4, write_clip

    folder.mkdir(parents=True, exist_ok=True)
    codec = h264_or_mpeg4()
    for name, frames, fps, size in (("wide", 14, 24, (64, 32)), ("tall", 9, 12, (32, 64)), ("square", 7, 30, (48, 48))):
        write_clip(folder / f"{name}.mp4", codec, n=frames, fps=fps, size=size)
        (folder / f"{name}.txt").write_text(f"a {name} clip of moving colours")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "still.png")
    (folder / "still.txt").write_text("a red still")
    return folder


#: the dataset and model settings of runs on `write_mixed_clips` (test_arch_acceptance uses them too)
CLIPS_DATASET = {"num_frames": 5, "resolution": 64}


@pytest.fixture(scope="session")
def mixed_clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mixed_clips(tmp_path_factory.mktemp("hv15") / "clips")


def _job(tmp_path: Path, name: str, model_dir: Path, data: Path, arch: str, **changes: Any) -> Path:
    return family.write_job(tmp_path, name, model_dir, data, {
        "model": {"arch": arch, "model_kwargs": MODEL_KWARGS},
        "train": {"steps": 30, "batch_size": 1, "lr": 1e-2, "lr_scheduler": "constant"},
        "network": {"type": "lora", "linear": 8, "linear_alpha": 16},
        "save": {"save_every": 15},
        "sample": {"sample_every": 30, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 1.0,
                   "num_frames": 5, "fps": 8, "prompts": ["a wide clip of moving colours"], "seed": 5},
    }, changes, dataset=CLIPS_DATASET)


@pytest.fixture(scope="session")
def i2v_run(models: dict[str, Path], mixed_clips: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("hv15-i2v")
    job = _job(tmp, "hvi2v", models[I2V], mixed_clips, I2V, sample={"ctrl_img": str(mixed_clips / "still.png")})
    return (*family.train(job), tmp, job)


def test_i2v_acceptance_on_mixed_clips_with_previews_and_identical_resume(i2v_run: tuple) -> None:
    trainer, straight, tmp, _ = i2v_run
    assert straight.state == "completed" and straight.step == 30
    run = family.losses(straight, "hvi2v")
    assert np.mean(run[-10:]) < np.mean(run[:10]), run
    samples = sorted(p.name for p in (straight.output_dir / "samples").iterdir())
    assert samples == ["000000000_0.mp4", "000000000_0.webp", "000000030_0.mp4", "000000030_0.webp"]
    assert trainer.network.wrapped_module_names() == trainer.adapter.network_candidates(False)
    resumed = _job(tmp, "hvi2v_resumed", Path(trainer.adapter.model_cfg.name_or_path),
                   Path(trainer.process.datasets[0].folder_path), I2V,
                   sample={"ctrl_img": str(Path(trainer.process.datasets[0].folder_path) / "still.png")})

    def stop_at_15(run_trainer: Any, step: int) -> None:
        if step == 15:
            run_trainer.stop.request("test")

    _, first = family.train(resumed, on_step_end=stop_at_15)
    assert first.state == "stopped" and first.step == 15
    _, second = family.train(resumed)
    assert second.state == "completed" and family.losses(second, "hvi2v_resumed") == run
    a, b = load_file(str(straight.final_lora)), load_file(str(second.final_lora))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_file_holds_comfyui_names_with_fused_qkv(i2v_run: tuple) -> None:
    from safetensors import safe_open

    trainer, result, _, _ = i2v_run
    tensors = load_file(str(result.final_lora))
    stems = {k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in tensors}
    assert "diffusion_model.double_blocks.0.img_attn.qkv" in stems and "diffusion_model.double_blocks.1.txt_mod.lin" in stems
    assert not any(s.endswith((".q", ".k", ".v")) for s in stems)  # one LoRA on each fused qkv
    qkv = "diffusion_model.double_blocks.0.img_attn.qkv"
    assert tensors[f"{qkv}.lora_down.weight"].shape == (24, 32) and tensors[f"{qkv}.alpha"].item() == 48.0
    assert all(tensors[f"{s}.alpha"].item() == 16.0 for s in stems if not s.endswith(".qkv"))
    with safe_open(str(result.final_lora), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "hunyuan-video-1.5-i2v/lora"
    assert meta["ss_base_model_version"] == "hunyuan_video_1.5"


def _render(pipe: Any, image: Image.Image | None = None) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    kwargs: dict[str, Any] = {"image": image} if image is not None else {"height": 32, "width": 48}
    return pipe(prompt="a wide clip of moving colours", num_frames=5, num_inference_steps=2,
                generator=torch.Generator().manual_seed(3), output_type="latent", **kwargs).frames


def _peft_config(lora: Path) -> dict[str, Any]:
    """The LoRA config a diffusers-layout file carries in its header (what load_lora_weights reads)."""
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        return json.loads(f.metadata()["lora_adapter_metadata"])


def _diffusers_diff(adapter: HunyuanVideo15Adapter, models: dict[str, Path], lora: Path) -> tuple[float, float]:
    """(max |our preview - a fresh pipeline whose transformer loaded the diffusers-layout file|,
    max |our preview - the plain pipeline|); no guidance on both sides."""
    import warnings

    arch = adapter.arch_names[0]
    image = picture(7, 32, 32) if adapter.i2v else None
    adapter.denoiser().eval()
    ours = _render(adapter.sample_pipeline(), image)
    fresh = pipeline(models, arch)
    fresh.guider = type(fresh.guider)(guidance_scale=1.0)
    base = _render(fresh, image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.transformer.load_lora_adapter(load_file(str(lora)), prefix="transformer", metadata=_peft_config(lora))
    return float((ours - _render(fresh, image)).abs().max()), float((ours - base).abs().max())


def test_lora_loads_exactly_into_diffusers_transformer_and_tools_read_it(
    i2v_run: tuple, models: dict[str, Path]
) -> None:
    from diffusers import HunyuanVideo15Transformer3DModel

    trainer, result, tmp, _ = i2v_run
    converted = family.diffusers_layout_round_trip(result.final_lora, I2V, tmp)
    diff, effect = _diffusers_diff(trainer.adapter, models, converted)
    record(I2V, "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="diffusers",
           note="transformer.load_lora_adapter: the pipelines have no load_lora_weights")
    assert effect > 1e-3 and diff < 1e-4, (diff, effect)
    assert family.lora_info(result.final_lora)["architecture"] == I2V
    guessed = family.headerless_info(result.final_lora, tmp)
    assert guessed["architecture"].startswith(T2V) and I2V in json.dumps(guessed), guessed  # I2V files share the keys
    adapter = trainer.adapter
    batch = adapter.make_noisy_batch(adapter.encode_images(clip(2)), TrainConfig(), torch.Generator().manual_seed(1),
                                     BatchContext(first_frames=clip(2)[:, :, 0]))
    cond = PromptEmbeds.cat([adapter.encode_prompts(["a red circle"])] * 2)
    family.check_merge(I2V, adapter, models[I2V], result.final_lora, tmp, HunyuanVideo15Transformer3DModel, batch,
                       cond, dtype=torch.float32)
    family.check_round_trip(I2V, adapter, make_adapter(models[I2V], I2V), result.final_lora, "lora", batch=batch,
                            cond=cond, layout="comfyui", linear_rank=8)


def test_t2v_lokr_with_cached_embeddings_and_dora_for_diffusers(
    models: dict[str, Path], mixed_clips: Path, tmp_path: Path
) -> None:
    job = _job(tmp_path, "hvlokr", models[T2V], mixed_clips, T2V, train={"steps": 6, "cache_text_embeddings": True},
               sample={"sample_every": 6}, network={"type": "lokr", "linear": 2, "linear_alpha": 4, "lokr_factor": -1})
    trainer, result = family.train(job)
    assert result.state == "completed" and all(math.isfinite(x) for x in family.losses(result, "hvlokr"))
    assert trainer.adapter.text_encoder is None  # previews rendered from the cached embeddings
    assert sorted(p.suffix for p in (result.output_dir / "samples").iterdir()) == [".mp4", ".mp4", ".webp", ".webp"]
    tensors = load_file(str(result.final_lora))
    assert any(k.endswith(".lokr_w1") for k in tensors) and all(k.startswith("diffusion_model.double_blocks.") for k in tensors)
    fresh = make_adapter(models[T2V])
    batch = fresh.make_noisy_batch(fresh.encode_images(clip(4)), TrainConfig(), torch.Generator().manual_seed(2))
    cond = PromptEmbeds.cat([fresh.encode_prompts(["a red circle"])] * 2)
    diff = family.loader_round_trip_diff(trainer.adapter, fresh, result.final_lora, batch, cond, network_type="lokr",
                                         linear_rank=2)
    record(T2V, "lokr", "aitk loader (round trip)", diff < 1e-5, diff)
    assert diff < 1e-5

    job = _job(tmp_path, "hvdora", models[T2V], mixed_clips, T2V, train={"steps": 4}, sample={"sample_every": 1000},
               network={"dora": True, "linear": 4, "linear_alpha": 8}, save={"save_format": "diffusers"})
    trainer, result = family.train(job)
    tensors = load_file(str(result.final_lora))
    assert any(k.endswith("lora_magnitude_vector") for k in tensors) and all(k.startswith("transformer.") for k in tensors)
    diff, effect = _diffusers_diff(trainer.adapter, models, result.final_lora)
    record(T2V, "dora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="diffusers",
           note="transformer.load_lora_adapter: the pipelines have no load_lora_weights")
    assert effect > 1e-4 and diff < 1e-4, (diff, effect)


def test_quantized_base_trains_a_full_precision_lora(models: dict[str, Path], mixed_clips: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, "hvq", models[T2V], mixed_clips, T2V, train={"steps": 4}, sample={"sample_every": 1000},
               model={"quantize": True, "qtype": "qint8"})
    trainer, result = family.train(job)
    assert result.state == "completed" and all(math.isfinite(x) for x in family.losses(result, "hvq"))
    layers = [m for m in trainer.network.lora_layers().values() if isinstance(m.base_layer, torch.nn.Linear)]
    assert layers and all("torchao" in type(m.base_layer.weight).__module__ for m in layers)
    assert load_file(str(result.final_lora))["diffusion_model.double_blocks.0.img_mod.lin.lora_down.weight"].shape[0] == 8


def test_presets_and_example_validate_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from aitk.config.validate import validate_command
    from aitk.ui.presets import PRESETS

    for key in (T2V, I2V):
        job = PRESETS[key]["job"]
        process = job["config"]["process"][0]
        assert process["model"]["arch"] == key and process["datasets"][0]["num_frames"] % 4 == 1
        process["datasets"][0]["folder_path"] = str(tmp_path)
        if key == I2V:  # the new-job form asks for the previews' first frame
            assert process["sample"]["ctrl_img"] == ""
            picture(1).save(tmp_path / "first.png")
            process["sample"]["ctrl_img"] = str(tmp_path / "first.png")
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump(job))
        assert validate_command([str(path)]) == 0
        printed = capsys.readouterr()
        assert "warning" not in printed.out + printed.err, (key, printed)


def test_shipped_configs_build_the_real_sizes() -> None:
    """The configs shipped for `aitk plan` build the 8.3B transformer, Qwen2.5-VL 7B's text model and
    the glyph encoder on the meta device, and the adapter bound to them gives the trainer's shapes.
    (The plan itself refuses to trace this model: its transformer reorders tokens by mask values.)"""
    from aitk.config.schema import ModelConfig
    from aitk.plan.build import build_on_meta
    from aitk.plan.sources import model_spec

    hub = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_i2v"
    spec = model_spec(hub, I2V)
    parts = {name: build_on_meta(spec.parts[name]) for name in ("transformer", "text_encoder", "image_encoder")}
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    assert 8.3e9 < count["transformer"] < 8.4e9 and 7.0e9 < count["text_encoder"] < 7.1e9, count
    assert parts["transformer"].config.task_type == "i2v"
    adapter = HunyuanVideo15I2VAdapter(ModelConfig(name_or_path=hub, arch=I2V), CPU, torch.bfloat16)
    adapter.bind({"transformer": parts["transformer"]}, spec.configs({}))
    with torch.device("meta"):
        batch, cond = adapter.example_batch(1, (848, 480), 33, expert="main", with_controls=False)
    assert batch.noisy_latents.shape == (1, 32, 9, 30, 53) and batch.extra["condition"].shape[1] == 33
    assert batch.extra["image_embeds"].shape == (1, 729, 1152) and cond.hidden_states.shape == (1, 1000, 3584)
