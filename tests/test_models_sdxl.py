"""The SDXL adapter on a tiny SDXL-shaped model: loading (diffusers folder, SGM single file),
prompt encoding, time ids, the objective, and end-to-end training through the Trainer (loss,
samples, resume, LoRA files that diffusers' StableDiffusionXLPipeline loads exactly).

Everything runs offline on CPU in fp32 with 64 px images.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import base_process, deep_update, write_job  # noqa: E402
from ldm_convert import convert_clip_to_ldm, convert_unet_to_ldm, convert_vae_to_ldm  # noqa: E402

from aitk.config.loader import load_job_file  # noqa: E402
from aitk.config.schema import ModelConfig, TrainConfig  # noqa: E402
from aitk.models.base import BatchContext, PromptEmbeds  # noqa: E402
from aitk.models.sd import ModelLoadError  # noqa: E402
from aitk.models.sd import POOLED, TIME_IDS, SDXLAdapter, sdxl_time_ids  # noqa: E402
from aitk.models.sd import TE1_WIDTH, TE2_WIDTH  # noqa: E402
from aitk.trainer.loop import Trainer  # noqa: E402
from interop_results import record  # noqa: E402

CPU = torch.device("cpu")


def make_adapter(name_or_path: str | Path, **model_fields) -> SDXLAdapter:
    cfg = ModelConfig(name_or_path=str(name_or_path), arch="sdxl", **model_fields)
    adapter = SDXLAdapter(cfg, CPU, torch.float32)
    adapter.load()
    return adapter


def parts(adapter: SDXLAdapter) -> dict[str, torch.nn.Module]:
    return {
        "unet": adapter.unet,
        "vae": adapter.vae,
        "text_encoder": adapter.text_encoder,
        "text_encoder_2": adapter.text_encoder_2,
    }


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from aitk.models.sd import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def adapter(tiny_sdxl: Path) -> SDXLAdapter:
    """The tiny model loaded from its diffusers folder (shared: tests must not modify it)."""
    return make_adapter(tiny_sdxl)


@pytest.fixture(scope="session")
def latents(adapter: SDXLAdapter) -> torch.Tensor:
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return adapter.encode_images(pixels)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# --- loading -----------------------------------------------------------------------------------


def test_the_registry_maps_sdxl_and_the_legacy_flag() -> None:
    from aitk.models.registry import adapter_class

    assert adapter_class(ModelConfig(name_or_path="x", arch="sdxl").resolved_arch) is SDXLAdapter
    assert adapter_class(ModelConfig(name_or_path="x", is_xl=True).resolved_arch) is SDXLAdapter


def test_build_is_idempotent(tiny_sdxl: Path) -> None:
    from aitk.models.sd import build_tiny_sdxl

    before = (tiny_sdxl / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert build_tiny_sdxl(tiny_sdxl, seed=1) == tiny_sdxl
    assert (tiny_sdxl / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before
    assert json.loads((tiny_sdxl / "aitk_tiny.json").read_text())["arch"] == "sdxl"


def test_folder_load_parts_are_frozen_on_cpu_in_fp32(adapter: SDXLAdapter) -> None:
    for name, module in parts(adapter).items():
        params = list(module.parameters())
        assert params, name
        assert not any(p.requires_grad for p in params), f"{name} is not frozen"
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params), name
        assert not module.training, f"{name} is in train mode"
    assert adapter.denoiser() is adapter.unet
    assert adapter.unet.config.addition_embed_type == "text_time"
    assert adapter.prediction_type == "epsilon"
    assert (adapter.lora_prefix, adapter.diffusers_lora_prefix) == ("lora_unet", "unet")
    assert adapter.base_model_version == "sdxl_base_v1-0"
    assert adapter.modelspec_architecture == "stable-diffusion-xl-v1-base/lora"
    assert adapter.bucket_divisibility == 64
    assert adapter.lora_key_stem("down_blocks.1.attentions.0.proj_in") == "lora_unet_down_blocks_1_attentions_0_proj_in"


def test_vae_stays_fp32_when_training_in_bf16(tiny_sdxl: Path) -> None:
    half = SDXLAdapter(ModelConfig(name_or_path=str(tiny_sdxl), arch="sdxl"), CPU, torch.bfloat16)
    half.load()
    assert half.unet.dtype == torch.bfloat16 and half.text_encoder_2.dtype == torch.bfloat16
    assert half.vae.dtype == torch.float32  # SDXL's VAE overflows in fp16
    latents = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    image = half.decode_latents(latents)[0]
    assert image.size == (64, 64)


def _sgm_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection -> OpenCLIP names, as SDXL files store text
    encoder 2 (fused in_proj q/k/v, text_projection as a (width, dim) matrix)."""
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    layers = "text_model.encoder.layers."
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        if key in fixed:
            out[fixed[key]] = t
        elif key == "text_projection.weight":
            out["text_projection"] = t.T
        elif key.startswith(layers):
            index, rest = key[len(layers):].split(".", 1)
            module, param = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((index, param), {})[module[-6]] = t
            else:
                out[f"transformer.resblocks.{index}.{names[module]}.{param}"] = t
        else:
            raise KeyError(f"no OpenCLIP name for {key!r}")
    for (index, param), qkv_parts in qkv.items():
        fused = torch.cat([qkv_parts["q"], qkv_parts["k"], qkv_parts["v"]])
        out[f"transformer.resblocks.{index}.attn.in_proj_{param}"] = fused
    return out


def write_sgm_checkpoint(adapter: SDXLAdapter, out_file: Path) -> Path:
    """The model as a released SDXL single file: SGM layout (model.diffusion_model.* with
    label_emb, first_stage_model.*, conditioner.embedders.0 = CLIP-L, .1 = OpenCLIP)."""
    unet = adapter.unet.state_dict()
    label = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    checkpoint: dict[str, torch.Tensor] = {}
    plain = {k: v for k, v in unet.items() if not k.startswith("add_embedding.")}
    for k, v in convert_unet_to_ldm(plain, adapter.unet.config).items():
        checkpoint["model.diffusion_model." + k] = v
    for k, v in unet.items():
        if k.startswith("add_embedding."):
            module, param = k.rsplit(".", 1)
            checkpoint[f"model.diffusion_model.{label[module]}.{param}"] = v
    for k, v in convert_vae_to_ldm(adapter.vae.state_dict(), adapter.vae.config).items():
        checkpoint["first_stage_model." + k] = v
    for k, v in convert_clip_to_ldm(adapter.text_encoder.state_dict()).items():
        checkpoint["conditioner.embedders.0.transformer." + k] = v
    for k, v in _sgm_open_clip(adapter.text_encoder_2.state_dict()).items():
        checkpoint["conditioner.embedders.1.model." + k] = v
    save_file({k: v.detach().clone().contiguous() for k, v in checkpoint.items()}, str(out_file))
    return out_file


def test_single_file_loads_the_same_weights(
    offline: None, tiny_sdxl: Path, adapter: SDXLAdapter, tmp_path: Path
) -> None:
    sgm = write_sgm_checkpoint(adapter, tmp_path / "tiny-sdxl.safetensors")
    single = make_adapter(sgm, model_kwargs={"config": str(tiny_sdxl)})
    for name, module in parts(single).items():
        want = parts(adapter)[name].state_dict()
        got = module.state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
        assert not any(p.requires_grad for p in module.parameters()), name
    assert dict(single.noise_scheduler.config) == dict(adapter.noise_scheduler.config)
    a, b = single.encode_prompts(["a cat"]), adapter.encode_prompts(["a cat"])
    torch.testing.assert_close(a.hidden_states, b.hidden_states)
    torch.testing.assert_close(a.extra[POOLED], b.extra[POOLED])

    # model.vae_path (a VAE folder) replaces the checkpoint's VAE
    from diffusers import AutoencoderKL

    other = AutoencoderKL.from_config(adapter.vae.config)  # freshly initialised: other weights
    other.save_pretrained(tmp_path / "other-vae")
    with_vae = make_adapter(sgm, model_kwargs={"config": str(tiny_sdxl)}, vae_path=str(tmp_path / "other-vae"))
    assert torch.equal(with_vae.vae.decoder.conv_out.weight, other.decoder.conv_out.weight)
    assert not torch.equal(with_vae.vae.decoder.conv_out.weight, adapter.vae.decoder.conv_out.weight)
    assert with_vae.vae.dtype == torch.float32

    # without a local config folder the configs would come from the hub: a clear error offline
    with pytest.raises(ModelLoadError, match=r"Stable Diffusion XL checkpoint.*model\.model_kwargs\.config"):
        make_adapter(sgm)


def test_load_errors_name_the_key_and_the_fix(offline: None, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        make_adapter("someone/not-cached-sdxl")
    message = str(info.value)
    assert "model.name_or_path" in message and "hub id" in message and "HF_HUB_OFFLINE" in message
    assert "Stable Diffusion XL" in message
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="text_encoder_2/"):
        make_adapter(tmp_path)


# --- encoding ----------------------------------------------------------------------------------


def test_prompts_use_both_encoders_penultimate_states_and_the_pooled_output(adapter: SDXLAdapter) -> None:
    prompts = ["a red circle", "a blue square on grass", ""]
    embeds = adapter.encode_prompts(prompts)
    assert isinstance(embeds, PromptEmbeds)
    assert embeds.hidden_states.shape == (3, 77, TE1_WIDTH + TE2_WIDTH)
    assert embeds.extra[POOLED].shape == (3, TE2_WIDTH)
    assert not torch.equal(embeds.hidden_states[0], embeds.hidden_states[1])

    # recomputed by hand from the two encoders
    def run(tokenizer, encoder):
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return encoder(ids, output_hidden_states=True)

    one, two = run(adapter.tokenizer, adapter.text_encoder), run(adapter.tokenizer_2, adapter.text_encoder_2)
    torch.testing.assert_close(embeds.hidden_states, torch.cat([one.hidden_states[-2], two.hidden_states[-2]], -1))
    torch.testing.assert_close(embeds.extra[POOLED], two.text_embeds)
    # the pooled output sits at the end token: tokenizer_2 pads with "!", not the end token
    assert adapter.tokenizer_2.pad_token == "!"
    # a prompt's embedding does not depend on the batch it was encoded in (exact resume needs it)
    for i, prompt in enumerate(prompts):
        alone = adapter.encode_prompts([prompt])
        assert torch.equal(alone.hidden_states[0], embeds.hidden_states[i])
        assert torch.equal(alone.extra[POOLED][0], embeds.extra[POOLED][i])


def test_encode_images_is_scaled_and_deterministic(adapter: SDXLAdapter) -> None:
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    first = adapter.encode_images(pixels)
    assert first.shape == (2, 4, 8, 8)
    assert torch.equal(first, adapter.encode_images(pixels))
    with torch.no_grad():
        unscaled = adapter.vae.encode(pixels).latent_dist.mean
    assert adapter.vae.config.scaling_factor == pytest.approx(0.13025)
    torch.testing.assert_close(first, unscaled * 0.13025)
    assert adapter.latent_space_id().startswith("sdxl-")


# --- time ids and the objective ----------------------------------------------------------------


def test_time_ids_come_from_the_context_with_the_pipelines_defaults(adapter: SDXLAdapter) -> None:
    context = BatchContext(
        original_sizes=[(64, 96), (128, 64)], crops_top_left=[(0, 16), (32, 0)], target_sizes=[(64, 64)] * 2
    )
    ids = sdxl_time_ids(2, (8, 8), 8, context)
    assert ids.tolist() == [[64, 96, 0, 16, 64, 64], [128, 64, 32, 0, 64, 64]]
    # nothing known: what StableDiffusionXLPipeline uses for a 64x80 (h, w) image
    pipe = adapter.sample_pipeline()
    want = pipe._get_add_time_ids((64, 80), (0, 0), (64, 80), torch.float32, text_encoder_projection_dim=TE2_WIDTH)
    for empty in (None, BatchContext()):
        torch.testing.assert_close(sdxl_time_ids(2, (8, 10), 8, empty), want.repeat(2, 1))
    # only the bucket known: original = target, no crop
    assert sdxl_time_ids(1, (8, 8), 8, BatchContext(target_sizes=[(64, 128)])).tolist() == [[64, 128, 0, 0, 64, 128]]
    with pytest.raises(ValueError, match="crops_top_left"):
        sdxl_time_ids(2, (8, 8), 8, BatchContext(crops_top_left=[(0, 0)]))


def test_two_crops_give_two_predictions(adapter: SDXLAdapter, latents: torch.Tensor) -> None:
    def predict(crops: list[tuple[int, int]] | None) -> torch.Tensor:
        context = None if crops is None else BatchContext(
            original_sizes=[(64, 96)] * 2, crops_top_left=crops, target_sizes=[(64, 64)] * 2
        )
        batch = adapter.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(1), context)
        assert batch.extra[TIME_IDS].shape == (2, 6)
        with torch.no_grad():
            return adapter.predict(batch, adapter.encode_prompts(["a", "b"]))

    left, right, default = predict([(0, 0)] * 2), predict([(0, 32)] * 2), predict(None)
    assert left.shape == latents.shape and torch.isfinite(left).all()
    assert (left - right).abs().max() > 1e-4
    assert (left - default).abs().max() > 1e-4  # the default is another original size


def _alpha_bar(adapter: SDXLAdapter, timesteps: torch.Tensor) -> torch.Tensor:
    return adapter.noise_scheduler.alphas_cumprod[timesteps].float().view(-1, 1, 1, 1)


def test_epsilon_target_min_snr_and_timestep_bias(adapter: SDXLAdapter, latents: torch.Tensor) -> None:
    cfg = TrainConfig(min_denoising_steps=100, max_denoising_steps=300, min_snr_gamma=5.0)
    batch = adapter.make_noisy_batch(latents, cfg, torch.Generator().manual_seed(42))
    assert ((batch.timesteps >= 100) & (batch.timesteps <= 300)).all()
    ab = _alpha_bar(adapter, batch.timesteps)
    torch.testing.assert_close(batch.noisy_latents, ab.sqrt() * latents + (1 - ab).sqrt() * batch.target)
    snr = (ab / (1 - ab)).view(-1).double()
    torch.testing.assert_close(batch.loss_weights.double(), snr.clamp(max=5.0) / snr, rtol=1e-5, atol=1e-6)

    big = latents.repeat(64, 1, 1, 1)
    mean_t = {
        style: adapter.make_noisy_batch(
            big, TrainConfig(content_or_style=style), torch.Generator().manual_seed(3)
        ).timesteps.float().mean().item()
        for style in ("style", "balanced", "content")
    }
    assert mean_t["style"] < mean_t["balanced"] < mean_t["content"], mean_t


def test_v_prediction_target_is_the_velocity(tiny_sdxl: Path, latents: torch.Tensor) -> None:
    v_adapter = make_adapter(tiny_sdxl, is_v_pred=True)
    assert v_adapter.prediction_type == "v_prediction"
    assert v_adapter.sample_pipeline("euler").scheduler.config.prediction_type == "v_prediction"
    batch = v_adapter.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(7))
    ab = _alpha_bar(v_adapter, batch.timesteps)
    noise = (batch.noisy_latents - ab.sqrt() * latents) / (1 - ab).sqrt()
    velocity = ab.sqrt() * noise - (1 - ab).sqrt() * latents
    torch.testing.assert_close(batch.target, velocity, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batch.target, noise, atol=1e-3)


# --- end to end through the Trainer ------------------------------------------------------------


@pytest.fixture(scope="session")
def wide_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 96x64 (w x h) images: at resolution 64 each is centre-cropped to 64x64 at left 16."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("data") / "wide"
    folder.mkdir()
    for i, (name, rgb) in enumerate([("red", (220, 40, 40)), ("green", (40, 180, 60)),
                                     ("blue", (50, 80, 220)), ("yellow", (230, 210, 40))]):
        image = Image.new("RGB", (96, 64), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        box = (24 + 4 * i, 12, 72 - 4 * i, 52)
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=rgb)
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} {'circle' if i % 2 else 'square'}, [trigger] style")
    return folder


@pytest.fixture
def sdxl_job(tiny_sdxl: Path, wide_dataset: Path, tmp_path: Path):
    """sdxl_job(name, dataset={...}, **section_overrides) -> a job file training the tiny SDXL."""

    def build(name: str = "run", dataset: dict | None = None, **changes) -> Path:
        process = base_process(tiny_sdxl, wide_dataset, tmp_path / "out")
        process["model"]["arch"] = "sdxl"
        process = deep_update(process, changes)
        process["datasets"][0].update(dataset or {})
        return write_job(tmp_path / f"{name}.yaml", name, process)

    return build


def train(job_path: Path, **kwargs) -> tuple[Trainer, object]:
    loaded = load_job_file(job_path)
    trainer = Trainer(loaded.job, loaded.job.config.process[0], **kwargs)
    return trainer, trainer.run()


def losses_of(run_dir: Path, name: str) -> list[float]:
    lines = (run_dir / f"metrics_{name}.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


KOHYA_UNET_KEY = re.compile(
    r"^lora_unet_((down|up)_blocks_\d+_(attentions|resnets|downsamplers|upsamplers)_\d+"
    r"|mid_block_(attentions|resnets)_\d+)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$"
)


def test_loss_falls_samples_are_written_and_time_ids_follow_the_crop(
    sdxl_job, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[torch.Tensor] = []
    original_predict = SDXLAdapter.predict

    def spy(self: SDXLAdapter, batch, cond):
        if torch.is_grad_enabled():
            seen.append(batch.extra[TIME_IDS].clone())
        return original_predict(self, batch, cond)

    monkeypatch.setattr(SDXLAdapter, "predict", spy)
    job = sdxl_job(
        "falls",
        train={"steps": 60, "lr": 2e-3, "lr_scheduler": "constant"},
        network={"linear": 8, "linear_alpha": 8},
        save={"save_every": 20},
        sample={"sample_every": 1000, "width": 64, "height": 64, "sample_steps": 2,
                "prompts": ["a red square, [trigger] style --seed 3", "a blue circle --w 128"]},
    )
    trainer, result = train(job)
    assert result.state == "completed" and result.step == 60
    losses = losses_of(result.output_dir, "falls")
    assert len(losses) == 60 and all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.8 * first, (first, last)

    # every training step got the data's geometry: 96x64 image, centre crop at left 16, 64x64 bucket
    assert len(seen) == 60
    assert all(ids.tolist() == [[64, 96, 0, 16, 64, 64]] * 2 for ids in seen)

    samples = sorted(p.name for p in (result.output_dir / "samples").iterdir())
    assert samples == ["000000000_0.jpg", "000000000_1.jpg", "000000060_0.jpg", "000000060_1.jpg"]
    from PIL import Image

    assert Image.open(result.output_dir / "samples" / "000000060_1.jpg").size == (128, 64)
    assert "failed" not in (result.output_dir / "log.txt").read_text()

    tensors = load_file(str(result.final_lora))
    assert tensors and all(KOHYA_UNET_KEY.match(k) for k in tensors), [k for k in tensors if not KOHYA_UNET_KEY.match(k)]
    assert len(tensors) == 3 * len(trainer.adapter.network_candidates(False))  # down, up, alpha each
    assert (result.output_dir / "falls_000000020.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(result.final_lora), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_resume_is_identical_to_a_straight_run(sdxl_job) -> None:
    from aitk.trainer.checkpoint import list_checkpoints

    changes = dict(
        train={"steps": 16, "lr_scheduler": "cosine_with_warmup", "lr_warmup_steps": 3, "min_snr_gamma": 5.0,
               "noise_offset": 0.05},
        dataset={"caption_dropout_rate": 0.2, "flip_x": True},
        network={"linear": 4, "linear_alpha": 8, "dropout": 0.1},
        save={"save_every": 6},
    )
    _, straight = train(sdxl_job("straight", **changes))
    resumed_job = sdxl_job("resumed", **changes)

    def stop_at_8(trainer: Trainer, step: int) -> None:
        if step == 8:
            trainer.stop.request("test")

    _, first = train(resumed_job, on_step_end=stop_at_8)
    assert first.state == "stopped" and first.step == 8
    _, second = train(resumed_job)
    assert second.state == "completed" and second.step == 16

    def final_network(run_dir: Path) -> dict[str, torch.Tensor]:
        return load_file(str(list_checkpoints(run_dir / "checkpoints")[0].path / "network.safetensors"))

    a, b = final_network(straight.output_dir), final_network(second.output_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lora_a = load_file(str(straight.final_lora))
    lora_b = load_file(str(second.final_lora))
    assert lora_a.keys() == lora_b.keys() and all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)
    assert losses_of(straight.output_dir, "straight") == losses_of(second.output_dir, "resumed")


@pytest.mark.parametrize(
    "save_format, with_conv",
    [("comfyui", False), ("comfyui", True), ("diffusers", True)],
    ids=["comfyui", "comfyui+locon", "diffusers+locon"],
)
def test_saved_lora_loads_in_diffusers_and_matches_the_trainer(
    sdxl_job, tiny_sdxl: Path, save_format: str, with_conv: bool
) -> None:
    from diffusers import StableDiffusionXLPipeline

    network = {"linear": 4, "linear_alpha": 8}
    if with_conv:
        network |= {"conv": 4, "conv_alpha": 2}
    job = sdxl_job("interop", train={"steps": 8, "lr": 5e-3}, network=network, save={"save_format": save_format})
    trainer, result = train(job)

    def render(pipe) -> np.ndarray:
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red square, shp style", num_inference_steps=3, height=64, width=64, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(3), output_type="np").images[0]

    trainer.adapter.denoiser().eval()
    ours = render(trainer.adapter.sample_pipeline("ddim"))
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    fresh.scheduler = trainer.adapter.sample_pipeline("ddim").scheduler
    base = render(fresh)
    fresh.load_lora_weights(str(result.final_lora))
    theirs = render(fresh)
    assert np.abs(ours - base).max() > 1e-3  # the LoRA changes the image, so the check can fail
    record("sdxl", "locon" if with_conv else "lora", "diffusers load_lora_weights",
           (max_diff := float(np.abs(ours - theirs).max())) < 1e-4, max_diff, layout=save_format)
    assert np.abs(ours - theirs).max() < 1e-4

    keys = load_file(str(result.final_lora)).keys()
    if save_format == "comfyui":
        assert all(KOHYA_UNET_KEY.match(k) for k in keys)
        assert any("transformer_blocks_1_attn2_to_k" in k for k in keys)  # SDXL's deeper transformers
    else:
        assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert any("resnets" in k for k in keys) == with_conv
