"""LTX-2 on the tiny random-init model of the real classes: the pipeline's text encoding (real
tokens kept, its padding restored for the connectors), the transformer call the pipeline makes,
the flow-matching objective with the resolution-dependent shift, image-to-video conditioning on
the first frame (the image-to-video pipeline's own latent), and runs on clips of mixed length, fps
and aspect whose LoRA files load in diffusers exactly, LoKr, a quantized base and the tools.

Everything runs offline on CPU in fp32 with 64 px frames.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from aitk.config.prompts import PreviewRequest
from aitk.config.schema import TrainConfig
from aitk.models.base import BatchContext, NoisyBatch, PromptEmbeds
from aitk.models.ltx2 import LTX2Adapter, LTX2InputError, build_tiny_ltx2
from aitk.models.ltx2.tiny import REGISTERS, TOKENIZER_MAX_LENGTH
import family_checks as family
from interop_results import record
from upstream_jobs import extras_on_path  # noqa: F401 - autouse fixture: torchao for model.quantize

PROMPT = "a red circle, shp style"


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ltx2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_ltx2(tmp_path_factory.mktemp("ltx2-model") / "tiny-ltx2")


def make_adapter(folder: Path | str, **model_fields: Any) -> LTX2Adapter:
    return family.load_adapter(LTX2Adapter, folder, "ltx2", **model_fields)


@pytest.fixture(scope="session")
def ltx(ltx2_model: Path) -> LTX2Adapter:
    return make_adapter(ltx2_model)


def write_mixed_clips(folder: Path) -> Path:
    """Captioned clips of mixed length, frame rate and aspect (and a still), for video runs."""
    from test_data_video_training import write_clip

    if (folder / "c.txt").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    write_clip(folder / "a.mp4", 40, 96, 64, fps=30)  # wide, long
    write_clip(folder / "b.mp4", 20, 64, 96, fps=24)  # tall
    write_clip(folder / "c.mp4", 12, 64, 64, fps=12)  # short, slow: fewer frames (8k+1)
    for stem, text in (("a", "a red circle"), ("b", "a blue square"), ("c", "a green triangle")):
        (folder / f"{stem}.txt").write_text(f"{text}, [trigger] style")
    return folder


def clips_dataset() -> dict[str, Any]:
    return {"num_frames": 17, "fps": 24, "resolution": [64], "max_pixels_per_frame": 64 * 64,
            "shrink_video_to_frames": True}


def video(seed: int, b: int = 2, frames: int = 9, h: int = 64, w: int = 96) -> torch.Tensor:
    return torch.rand(b, 3, frames, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- the model ---------------------------------------------------------------------------------


def test_tiny_model_loads_as_the_real_pipeline(ltx2_model: Path) -> None:
    from diffusers import LTX2Pipeline

    size = sum(p.stat().st_size for p in ltx2_model.rglob("*") if p.is_file())
    assert size < 10 * 2**20, size
    pipe = LTX2Pipeline.from_pretrained(ltx2_model)
    assert type(pipe.text_encoder).__name__ == "Gemma3ForConditionalGeneration"
    assert (pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio) == (32, 8)
    assert build_tiny_ltx2(ltx2_model) == ltx2_model  # kept, not rebuilt


def test_adapter_facts(ltx: LTX2Adapter) -> None:
    from aitk.models import archs

    assert archs.data_facts("ltx2") == (LTX2Adapter.bucket_divisibility, LTX2Adapter.frame_rule) == (32, "8k+1")
    assert "ltx2" not in archs.FIRST_FRAME_ARCHS and "ltx2" not in archs.CONV_ARCHS  # I2V optional (do_i2v)
    for module in (ltx.transformer, ltx.vae, ltx.text_encoder, ltx.connectors, ltx.audio_vae, ltx.vocoder):
        assert not any(p.requires_grad for p in module.parameters())
    assert ltx.vae.dtype == torch.float32 and ltx.text_encoder.model.vision_tower is None
    assert ltx.max_sequence_length == TOKENIZER_MAX_LENGTH  # the tiny tokenizer caps the pipeline's 1024
    assert ltx.scheduler_config["use_dynamic_shifting"] and ltx.scheduler_config["max_shift"] == 2.05
    # the video branch only: attn1 / attn2 / ff of every block; no audio module, no cross-modal attention
    names = ltx.network_candidates(False)
    per_block = [f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
    per_block += ["ff.net.0.proj", "ff.net.2"]
    assert names == [f"transformer_blocks.{i}.{n}" for i in range(2) for n in per_block]
    assert ltx.offload_blocks(ltx.transformer) == list(ltx.transformer.transformer_blocks)
    assert {ltx.lora_key_stem(n) for n in names} == {f"diffusion_model.{n}" for n in names}
    assert LTX2Adapter.matches_lora_keys({"diffusion_model.transformer_blocks.3.attn2.to_k.lora_A.weight": torch.zeros(1)})
    assert not LTX2Adapter.matches_lora_keys({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(1)})
    with pytest.raises(LTX2InputError, match=f"multiple of {REGISTERS}"):
        make_adapter(ltx.model_cfg.name_or_path, model_kwargs={"max_sequence_length": REGISTERS + 1})


def test_encode_prompts_keeps_the_real_tokens_of_the_pipelines_encoding(ltx: LTX2Adapter, ltx2_model: Path) -> None:
    from diffusers import LTX2Pipeline

    from aitk.models.ltx2.prompts import left_padded

    cond = PromptEmbeds.cat([ltx.encode_prompts(["a red circle"]), ltx.encode_prompts(["a blue square on grey"])])
    lengths = cond.extra["mask"].sum(1).tolist()
    assert lengths[0] < lengths[1] == cond.hidden_states.shape[1] < TOKENIZER_MAX_LENGTH
    assert cond.hidden_states.shape[-1] == 16 * 3 and not cond.hidden_states[0, lengths[0]:].any()
    pipe = LTX2Pipeline.from_pretrained(ltx2_model)
    embeds, mask, _, _ = pipe.encode_prompt(["a red circle", "a blue square on grey"], do_classifier_free_guidance=False,
                                            max_sequence_length=TOKENIZER_MAX_LENGTH)
    hidden, restored = left_padded(cond, TOKENIZER_MAX_LENGTH, "cpu", torch.float32)
    assert torch.equal(restored, mask)
    assert torch.equal(hidden[mask.bool()], embeds[mask.bool()])
    # the connectors mask the padding: zeros there give exactly the pipeline's text streams
    with torch.no_grad():
        ours, theirs = ltx.connectors(hidden, restored), pipe.connectors(embeds, mask)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- the objective -----------------------------------------------------------------------------


def test_latents_and_the_frame_rule(ltx: LTX2Adapter) -> None:
    latents = ltx.encode_images(video(1))
    assert latents.shape == (2, 8, 2, 2, 3) and torch.equal(latents, ltx.encode_images(video(1)))
    raw = ltx.vae.encode(video(1)).latent_dist.mode()
    torch.testing.assert_close(latents * ltx.vae.latents_std.view(1, -1, 1, 1, 1) + ltx.vae.latents_mean.view(1, -1, 1, 1, 1), raw)
    assert ltx.encode_images(video(1)[:, :, 0]).shape == (2, 8, 1, 2, 3)  # a still is one frame
    with pytest.raises(LTX2InputError, match="8k\\+1"):
        ltx.encode_images(video(1, frames=5))


def test_noisy_batch_is_rectified_flow_with_the_resolution_shift(ltx: LTX2Adapter) -> None:
    from diffusers.pipelines.ltx2.pipeline_ltx2 import calculate_shift

    from aitk.models.flow_matching import time_shift

    latents = ltx.encode_images(video(2))
    batch = ltx.make_noisy_batch(latents, TrainConfig(timestep_type="shift"), torch.Generator().manual_seed(5))
    s = (batch.timesteps / 1000).view(-1, 1, 1, 1, 1)
    noise = (batch.noisy_latents - (1 - s) * latents) / s
    torch.testing.assert_close(batch.target, noise - latents, rtol=1e-4, atol=1e-4)
    u = torch.rand(2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mu = calculate_shift(2 * 2 * 3, 1024, 4096, 0.95, 2.05)  # latent frames x height x width tokens
    torch.testing.assert_close(batch.timesteps / 1000, time_shift(u, mu).float())
    # the audio stream: noise for the clip's duration (9 frames at 24 fps), one draw per sample
    assert batch.extra["audio"].shape == (2, round(9 / 24 * 16000 / 160 / 4), 8) and batch.loss_weights is None
    with pytest.raises(LTX2InputError, match="bypass_guidance_embedding"):
        ltx.make_noisy_batch(latents, TrainConfig(bypass_guidance_embedding=True), None)


def _pipeline_step(adapter: LTX2Adapter, pipe: Any, **call: Any) -> dict[str, Any]:
    """What the transformer got and gave in the first step of `pipe` (no guidance)."""
    seen: dict[str, Any] = {}

    def hook(_module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if "out" not in seen:
            seen.update(kwargs, out=output[0])

    handle = adapter.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe.set_progress_bar_config(disable=True)
        pipe(prompt=PROMPT, height=64, width=96, num_frames=9, num_inference_steps=2, guidance_scale=1.0,
             stg_scale=0.0, modality_scale=1.0, audio_guidance_scale=1.0, audio_modality_scale=1.0,
             max_sequence_length=TOKENIZER_MAX_LENGTH, frame_rate=24.0,
             output_type="latent", generator=torch.Generator().manual_seed(0), use_cross_timestep=False, **call)
    finally:
        handle.remove()
    return seen


def test_predict_is_the_transformer_call_the_pipeline_makes(ltx: LTX2Adapter) -> None:
    seen = _pipeline_step(ltx, ltx.sample_pipeline())
    x = seen["hidden_states"].transpose(1, 2).reshape(1, 8, 2, 2, 3)
    batch = NoisyBatch(x, seen["timestep"], torch.zeros_like(x), None, {"audio": seen["audio_hidden_states"]})
    with torch.no_grad():
        pred = ltx.predict(batch, ltx.encode_prompts([PROMPT]))
    torch.testing.assert_close(pred, seen["out"].transpose(1, 2).reshape(1, 8, 2, 2, 3), rtol=1e-5, atol=1e-5)


def test_first_frame_conditioning_is_the_image_to_video_pipelines(ltx: LTX2Adapter, tmp_path: Path) -> None:
    """do_i2v: the first latent frame is the image-to-video pipeline's own latent of the same
    frame, at timestep 0; it changes the prediction and is kept out of the loss."""
    import numpy as np
    from PIL import Image

    clip = video(3, b=1)
    clip[:, :, 0] = (clip[:, :, 0] * 127.5).round() / 127.5  # a frame a PNG holds exactly
    pixels = ((clip[0, :, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(tmp_path / "first.png")
    first = torch.from_numpy(np.array(Image.open(tmp_path / "first.png"))).permute(2, 0, 1)[None] / 127.5 - 1
    latents = ltx.encode_images(clip)
    plain = ltx.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(4))
    cond = ltx.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(4), BatchContext(first_frames=first))
    torch.testing.assert_close(cond.noisy_latents[:, :, 1:], plain.noisy_latents[:, :, 1:])
    # image_crf=0: the pipeline's H.264 round trip of the image left out, so both read the same pixels
    seen = _pipeline_step(ltx, ltx.sample_pipeline(), image=Image.open(tmp_path / "first.png"), image_crf=0)
    pipeline_first = seen["hidden_states"].transpose(1, 2).reshape(1, 8, 2, 2, 3)[:, :, 0]
    torch.testing.assert_close(cond.noisy_latents[:, :, 0], pipeline_first, rtol=1e-5, atol=1e-5)
    assert (seen["timestep"][0, :6] == 0).all() and (seen["timestep"][0, 6:] > 0).all()  # frame 0: clean
    prompt = ltx.encode_prompts([PROMPT])
    with torch.no_grad():
        a, b = ltx.predict(plain, prompt), ltx.predict(cond, prompt)
    assert float((a[:, :, 1:] - b[:, :, 1:]).abs().max()) > 1e-3  # the condition reaches the other frames
    assert torch.equal(b[:, :, 0], cond.target[:, :, 0]) and cond.loss_weights.tolist() == [2.0]


def test_preview_arguments(ltx: LTX2Adapter, tmp_path: Path) -> None:
    from PIL import Image

    kwargs = ltx.preview_kwargs(PreviewRequest("p", 64, 64, 1, 1.0, 2, "", 1.0, num_frames=12, fps=12))
    assert kwargs["num_frames"] == 9 and kwargs["frame_rate"] == 12.0 and "image" not in kwargs
    assert kwargs["stg_scale"] == 0.0  # the tiny model has no block 28 to perturb
    Image.new("RGB", (40, 40), (10, 200, 10)).save(tmp_path / "first.png")
    request = PreviewRequest("p", 64, 64, 1, 1.0, 2, "", 1.0, num_frames=9, ctrl_img=str(tmp_path / "first.png"))
    assert ltx.preview_kwargs(request)["image"].size == (40, 40)


# --- end to end --------------------------------------------------------------------------------


def _job(tmp_path: Path, name: str, model_dir: Path, data: Path, dataset: dict | None = None, **changes: Any) -> Path:
    return family.write_job(tmp_path, name, model_dir, data, {
        "model": {"arch": "ltx2"},
        "train": {"steps": 30, "batch_size": 1, "lr": 1e-2, "timestep_type": "weighted", "lr_scheduler": "constant"},
        "network": {"type": "lora", "linear": 8, "linear_alpha": 16},
        "sample": {"sample_every": 15, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 1.0,
                   "num_frames": 9, "fps": 24, "prompts": [PROMPT], "seed": 5},
    }, changes, dataset={**clips_dataset(), **(dataset or {})})


def _render(pipe: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPT, height=64, width=64, num_frames=9, num_inference_steps=2, guidance_scale=1.0,
                stg_scale=0.0, modality_scale=1.0, max_sequence_length=TOKENIZER_MAX_LENGTH, use_cross_timestep=False,
                generator=torch.Generator().manual_seed(3), output_type="latent").frames


def _diffusers_diff(adapter: LTX2Adapter, model: Path, lora: Path) -> tuple[float, float]:
    from diffusers import LTX2Pipeline

    return family.diffusers_lora_diff(adapter, LTX2Pipeline, model, lora, _render)


@pytest.fixture(scope="module")
def lora_run(ltx2_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("ltx2-lora")
    clips = write_mixed_clips(tmp / "clips")
    return (*family.train(_job(tmp, "llora", ltx2_model, clips, dataset={"do_i2v": True})), tmp)


def test_lora_trains_on_mixed_clips_with_comfyui_names(lora_run: tuple) -> None:
    import numpy as np

    trainer, result, _ = lora_run
    assert result.state == "completed" and result.step == 30
    run = family.losses(result, "llora")
    assert np.mean(run[-10:]) < np.mean(run[:10]), run
    samples = sorted(p.name for p in (result.output_dir / "samples").iterdir())
    assert samples == [f"{s:09d}_0{x}" for s in (0, 15, 30) for x in (".mp4", ".webp")]
    assert trainer.network.wrapped_module_names() == trainer.adapter.network_candidates(False)
    family.check_folded_lora_file(trainer, result.final_lora, "ltx-2/lora", "ltx2", prefix="diffusion_model.",
                                  weight_names=("lora_A", "lora_B"))


def test_lora_loads_exactly_in_diffusers(lora_run: tuple, ltx2_model: Path) -> None:
    """The default file (ComfyUI's names, alpha folded into the up weights: diffusers' LTX-2 loader
    refuses `.alpha` keys) and the diffusers layout (`aitk convert --to diffusers`) load exactly."""
    trainer, result, tmp = lora_run
    converted = family.diffusers_layout_round_trip(result.final_lora, "ltx2", tmp)
    for layout, lora in (("diffusers", converted), ("comfyui", result.final_lora)):
        diff, effect = _diffusers_diff(trainer.adapter, ltx2_model, lora)
        record("ltx2", "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout=layout)
        assert effect > 1e-3 and diff < 1e-4, (layout, diff, effect)


def test_merge_and_lora_info_know_ltx2(lora_run: tuple, ltx2_model: Path) -> None:
    from diffusers import LTX2VideoTransformer3DModel

    trainer, result, tmp = lora_run
    assert family.lora_info(result.final_lora)["architecture"] == "ltx2"
    assert "ltx2" in family.headerless_info(result.final_lora, tmp)["architecture"]
    adapter = trainer.adapter
    batch = adapter.make_noisy_batch(adapter.encode_images(video(2)), TrainConfig(), torch.Generator().manual_seed(1))
    cond = PromptEmbeds.cat([adapter.encode_prompts([PROMPT])] * 2)
    adapter.denoiser().eval()
    family.check_merge("ltx2", adapter, ltx2_model, result.final_lora, tmp, LTX2VideoTransformer3DModel, batch, cond)
    family.check_round_trip("ltx2", adapter, make_adapter(ltx2_model), result.final_lora, "lora", batch=batch,
                            cond=cond, layout="comfyui", linear_rank=8)


def test_lokr_with_cached_text_trains_and_loads(ltx2_model: Path, tmp_path: Path) -> None:
    clips = write_mixed_clips(tmp_path / "clips")
    job = _job(tmp_path, "llokr", ltx2_model, clips, train={"steps": 6, "cache_text_embeddings": True},
               sample={"sample_every": 6}, network={"type": "lokr", "linear": 2, "linear_alpha": 4, "lokr_factor": -1})
    trainer, result = family.train(job)
    assert result.state == "completed" and all(math.isfinite(x) for x in family.losses(result, "llokr"))
    assert trainer.adapter.text_encoder is None  # previews render from the cached embeddings
    assert (result.output_dir / "samples" / "000000006_0.mp4").is_file()
    tensors = load_file(str(result.final_lora))
    assert tensors and all(k.startswith("diffusion_model.transformer_blocks.") for k in tensors)
    assert any(k.endswith(".lokr_w1") for k in tensors)
    fresh = make_adapter(ltx2_model)
    batch = fresh.make_noisy_batch(fresh.encode_images(video(3)), TrainConfig(), torch.Generator().manual_seed(2))
    cond = PromptEmbeds.cat([fresh.encode_prompts([PROMPT])] * 2)
    diff = family.loader_round_trip_diff(trainer.adapter, fresh, result.final_lora, batch, cond,
                                         network_type="lokr", linear_rank=2)
    record("ltx2", "lokr", "aitk loader (round trip)", diff < 1e-5, diff)
    assert diff < 1e-5


def test_quantized_base_trains_and_its_lora_changes_diffusers_output(ltx2_model: Path, tmp_path: Path) -> None:
    from diffusers import LTX2Pipeline

    clips = write_mixed_clips(tmp_path / "clips")
    job = _job(tmp_path, "lq", ltx2_model, clips, train={"steps": 6}, sample={"sample_every": 1000},
               model={"quantize": True, "qtype": "qint8"})
    trainer, result = family.train(job)
    assert result.state == "completed" and all(math.isfinite(x) for x in family.losses(result, "lq"))
    layers = [m for m in trainer.network.lora_layers().values() if isinstance(m.base_layer, torch.nn.Linear)]
    assert layers and all("torchao" in type(m.base_layer.weight).__module__ for m in layers)
    from test_tools import aitk

    converted = tmp_path / "lq_diffusers.safetensors"
    assert aitk("convert", result.final_lora, "--to", "diffusers", "--arch", "ltx2", "-o", converted)[0] == 0
    plain = LTX2Pipeline.from_pretrained(ltx2_model)
    before = _render(plain)
    plain.load_lora_weights(str(converted))
    assert (_render(plain) - before).abs().max() > 1e-4


def test_preset_validates_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from aitk.config.validate import validate_command
    from aitk.ui.presets import PRESETS

    job = PRESETS["ltx2"]["job"]
    job["config"]["process"][0]["datasets"][0]["folder_path"] = str(tmp_path)
    path = tmp_path / "ltx2.yaml"
    path.write_text(yaml.safe_dump(job))
    assert validate_command([str(path)]) == 0
    printed = capsys.readouterr()
    assert "warning" not in printed.out + printed.err, printed
