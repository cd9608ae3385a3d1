"""The SD 1.5 adapter on the tiny model: loading (diffusers folder, LDM single file, hub id),
load errors, encoding and the training objective.

Everything runs offline on CPU in fp32 with 64 px images.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ldm_convert import (  # noqa: E402
    LDM_CLIP_PREFIX,
    LDM_UNET_PREFIX,
    LDM_VAE_PREFIX,
    pipeline_to_ldm,
    write_ldm_checkpoint,
    write_ldm_vae,
)

from aitk.config.schema import ModelConfig, TrainConfig  # noqa: E402
from aitk.models.base import NoisyBatch, PromptEmbeds  # noqa: E402
from aitk.models.sd import SD15Adapter, ModelLoadError  # noqa: E402

CPU = torch.device("cpu")


def make_adapter(name_or_path: str | Path, **model_fields) -> SD15Adapter:
    adapter = SD15Adapter(ModelConfig(name_or_path=str(name_or_path), **model_fields), CPU, torch.float32)
    adapter.load()
    return adapter


def parts(adapter: SD15Adapter) -> dict[str, torch.nn.Module]:
    return {"unet": adapter.unet, "vae": adapter.vae, "text_encoder": adapter.text_encoder}


def assert_same_weights(got: torch.nn.Module, want: torch.nn.Module, what: str) -> None:
    got_sd, want_sd = got.state_dict(), want.state_dict()
    assert got_sd.keys() == want_sd.keys(), f"{what}: different parameter names"
    assert len(want_sd) > 0
    differing = [k for k in want_sd if not torch.equal(got_sd[k], want_sd[k])]
    assert not differing, f"{what}: {len(differing)} tensors differ, e.g. {differing[:3]}"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub offline mode, also when huggingface_hub was imported before HF_HUB_OFFLINE was set."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def adapter(tiny_sd15: Path) -> SD15Adapter:
    """The tiny model loaded from its diffusers folder (shared: tests must not modify it)."""
    return make_adapter(tiny_sd15)


@pytest.fixture(scope="session")
def ldm_file(tiny_sd15: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ldm_checkpoint(tiny_sd15, tmp_path_factory.mktemp("ldm") / "tiny-sd15.safetensors")


@pytest.fixture(scope="session")
def latents(adapter: SD15Adapter) -> torch.Tensor:
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return adapter.encode_images(pixels)


# --- loading from a diffusers folder -----------------------------------------------------------


def test_folder_load_parts_are_frozen_on_cpu_in_fp32(adapter: SD15Adapter) -> None:
    for name, module in parts(adapter).items():
        params = list(module.parameters())
        assert params, name
        assert not any(p.requires_grad for p in params), f"{name} is not frozen"
        assert all(p.device.type == "cpu" for p in params), name
        assert all(p.dtype == torch.float32 for p in params), name
        assert not module.training, f"{name} is in train mode"
    assert adapter.denoiser() is adapter.unet
    assert adapter.prediction_type == "epsilon"


def test_encode_prompts_shape(adapter: SD15Adapter) -> None:
    embeds = adapter.encode_prompts(["a red circle", "a blue square on grass", ""])
    assert isinstance(embeds, PromptEmbeds)
    assert embeds.hidden_states.shape == (3, 77, 32)
    assert embeds.hidden_states.dtype == torch.float32
    assert not torch.equal(embeds.hidden_states[0], embeds.hidden_states[1])


def test_encode_images_is_scaled_and_deterministic(adapter: SD15Adapter) -> None:
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    first = adapter.encode_images(pixels)
    assert first.shape == (2, 4, 8, 8)
    assert torch.equal(first, adapter.encode_images(pixels))
    with torch.no_grad():
        unscaled = adapter.vae.encode(pixels).latent_dist.mean
    scaling = adapter.vae.config.scaling_factor
    assert scaling == pytest.approx(0.18215)
    torch.testing.assert_close(first, unscaled * scaling)


# --- training objective ------------------------------------------------------------------------


def _alpha_bar(adapter: SD15Adapter, timesteps: torch.Tensor) -> torch.Tensor:
    return adapter.noise_scheduler.alphas_cumprod[timesteps].float().view(-1, 1, 1, 1)


def test_noisy_batch_is_reproducible_and_targets_the_noise(
    adapter: SD15Adapter, latents: torch.Tensor
) -> None:
    cfg = TrainConfig(min_denoising_steps=100, max_denoising_steps=300)
    a = adapter.make_noisy_batch(latents, cfg, torch.Generator().manual_seed(42))
    b = adapter.make_noisy_batch(latents, cfg, torch.Generator().manual_seed(42))
    c = adapter.make_noisy_batch(latents, cfg, torch.Generator().manual_seed(43))
    assert isinstance(a, NoisyBatch)
    for field in ("noisy_latents", "timesteps", "target"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.target, c.target)
    assert a.loss_weights is None

    assert a.noisy_latents.shape == latents.shape and a.target.shape == latents.shape
    assert a.timesteps.shape == (2,) and not a.timesteps.is_floating_point()
    assert ((a.timesteps >= 100) & (a.timesteps <= 300)).all(), a.timesteps

    # epsilon: the target is exactly the noise mixed in: x_t = sqrt(ab) * x0 + sqrt(1 - ab) * target
    ab = _alpha_bar(adapter, a.timesteps)
    torch.testing.assert_close(a.noisy_latents, ab.sqrt() * latents + (1 - ab).sqrt() * a.target)


def test_timesteps_stay_within_the_configured_range(adapter: SD15Adapter, latents: torch.Tensor) -> None:
    big = latents.repeat(32, 1, 1, 1)  # 64 samples
    for low, high in ((0, 999), (250, 260), (500, 500)):
        for style in ("balanced", "content", "style"):
            cfg = TrainConfig(min_denoising_steps=low, max_denoising_steps=high, content_or_style=style)
            t = adapter.make_noisy_batch(big, cfg, torch.Generator().manual_seed(3)).timesteps
            assert int(t.min()) >= low and int(t.max()) <= high, (low, high, style, t)


def test_v_prediction_target_is_the_velocity(tiny_sd15: Path, latents: torch.Tensor) -> None:
    from diffusers import DDPMScheduler

    v_adapter = make_adapter(tiny_sd15, is_v_pred=True)
    assert v_adapter.prediction_type == "v_prediction"
    batch = v_adapter.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(7))

    # Recover the noise from x_t = sqrt(ab) * x0 + sqrt(1 - ab) * noise, then recompute the velocity
    # with a scheduler of our own.
    ab = _alpha_bar(v_adapter, batch.timesteps)
    noise = (batch.noisy_latents - ab.sqrt() * latents) / (1 - ab).sqrt()
    scheduler = DDPMScheduler.from_config(v_adapter.noise_scheduler.config)
    expected = scheduler.get_velocity(latents, noise, batch.timesteps)
    torch.testing.assert_close(batch.target, expected, rtol=1e-4, atol=1e-4)
    velocity = ab.sqrt() * noise - (1 - ab).sqrt() * latents
    torch.testing.assert_close(batch.target, velocity, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batch.target, noise, atol=1e-3)


def test_min_snr_gamma_gives_per_sample_weights(adapter: SD15Adapter, latents: torch.Tensor) -> None:
    gamma = 5.0
    cfg = TrainConfig(min_snr_gamma=gamma)
    batch = adapter.make_noisy_batch(latents, cfg, torch.Generator().manual_seed(5))
    w = batch.loss_weights
    assert w is not None and w.shape == (latents.shape[0],)
    assert torch.isfinite(w).all() and (w > 0).all() and (w <= 1).all(), w
    ab = adapter.noise_scheduler.alphas_cumprod[batch.timesteps].double()
    snr = ab / (1 - ab)
    torch.testing.assert_close(w.double(), torch.clamp(snr, max=gamma) / snr, rtol=1e-5, atol=1e-6)


def test_predict_matches_the_latent_shape(adapter: SD15Adapter, latents: torch.Tensor) -> None:
    batch = adapter.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(1))
    cond = adapter.encode_prompts(["a", "b"])
    with torch.no_grad():
        pred = adapter.predict(batch, cond)
    assert pred.shape == latents.shape
    assert torch.isfinite(pred).all()


# --- the LDM converter (test helper) -----------------------------------------------------------


def test_ldm_converter_is_the_inverse_of_diffusers_conversion(adapter: SD15Adapter) -> None:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    checkpoint = pipeline_to_ldm(adapter.unet, adapter.vae, adapter.text_encoder)
    assert {k.split(".")[0] for k in checkpoint} == {"model", "first_stage_model", "cond_stage_model"}
    assert all(k.startswith((LDM_UNET_PREFIX, LDM_VAE_PREFIX, LDM_CLIP_PREFIX)) for k in checkpoint)
    # LDM layout markers: conv_in is input_blocks.0.0, the VAE mid attention is 1x1 convs
    assert LDM_UNET_PREFIX + "input_blocks.0.0.weight" in checkpoint
    assert checkpoint[LDM_VAE_PREFIX + "encoder.mid.attn_1.q.weight"].ndim == 4

    def same(converted: dict, module: torch.nn.Module, what: str) -> None:
        want = module.state_dict()
        assert converted.keys() == want.keys(), f"{what}: {set(converted) ^ set(want)}"
        assert all(torch.equal(converted[k], want[k]) for k in want), what

    same(convert_ldm_unet_checkpoint(checkpoint, adapter.unet.config), adapter.unet, "unet")
    same(convert_ldm_vae_checkpoint(checkpoint, adapter.vae.config), adapter.vae, "vae")
    clip = convert_ldm_clip_checkpoint(checkpoint)
    clip.pop("text_model.embeddings.position_ids")
    clip = {k.removeprefix("text_model."): v for k, v in clip.items()}
    want = {k.removeprefix("text_model."): v for k, v in adapter.text_encoder.state_dict().items()}
    assert clip.keys() == want.keys() and all(torch.equal(clip[k], want[k]) for k in want)


# --- loading an LDM single file ----------------------------------------------------------------


def test_single_file_loads_the_same_weights(
    offline: None, tiny_sd15: Path, ldm_file: Path, adapter: SD15Adapter
) -> None:
    from safetensors.torch import load_file

    keys = load_file(str(ldm_file)).keys()
    assert not any(k.startswith(("unet.", "vae.", "text_encoder.")) for k in keys)  # really LDM

    single = make_adapter(ldm_file, model_kwargs={"config": str(tiny_sd15)})
    for name, module in parts(single).items():
        assert_same_weights(module, parts(adapter)[name], name)
        assert not any(p.requires_grad for p in module.parameters()), name
    assert dict(single.noise_scheduler.config) == dict(adapter.noise_scheduler.config)
    assert single.prediction_type == "epsilon"
    torch.testing.assert_close(
        single.encode_prompts(["a cat"]).hidden_states, adapter.encode_prompts(["a cat"]).hidden_states
    )


def test_vae_path_overrides_the_vae(
    offline: None, tiny_sd15: Path, ldm_file: Path, adapter: SD15Adapter, tmp_path: Path
) -> None:
    # a released-style VAE file (LDM keys, no prefix) next to a diffusers-folder model: its
    # component config comes from the model, so this works offline
    vae_file = write_ldm_vae(tiny_sd15, tmp_path / "vae.safetensors")
    with_file = make_adapter(tiny_sd15, vae_path=str(vae_file))
    assert_same_weights(with_file.vae, adapter.vae, "vae from file")
    assert not any(p.requires_grad for p in with_file.vae.parameters())

    # a pipeline folder as vae_path, with a single-file model
    with_folder = make_adapter(ldm_file, model_kwargs={"config": str(tiny_sd15)}, vae_path=str(tiny_sd15))
    assert_same_weights(with_folder.vae, adapter.vae, "vae from pipeline folder")


# --- load errors -------------------------------------------------------------------------------


def _load_error(name_or_path: str | Path, **model_fields) -> str:
    with pytest.raises(ModelLoadError) as info:
        make_adapter(name_or_path, **model_fields)
    return str(info.value)


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    message = _load_error(missing)
    assert "model.name_or_path" in message and str(missing) in message
    assert "give a diffusers folder" in message

    for relative in ("no-such-model", "./models/no-such-model", "models/sd/no-such-model"):
        message = _load_error(relative)
        assert "model.name_or_path" in message and relative in message and "give" in message


def test_missing_safetensors_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "model.safetensors"
    message = _load_error(missing)
    assert "model.name_or_path" in message and str(missing) in message
    assert "does not exist" in message and "give" in message and ".safetensors" in message


def test_corrupt_safetensors_file_is_a_clear_error(offline: None, tiny_sd15: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(os.urandom(4096))
    message = _load_error(corrupt, model_kwargs={"config": str(tiny_sd15)})
    assert "model.name_or_path" in message and str(corrupt) in message
    assert "could not be read" in message


def test_folder_that_is_not_a_model_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    message = _load_error(tmp_path)
    assert "model.name_or_path" in message and str(tmp_path) in message and "diffusers folder" in message
    message = _load_error(tmp_path / "notes.txt")
    assert "model.name_or_path" in message and "give" in message


def test_missing_vae_path_is_a_clear_error(tiny_sd15: Path, tmp_path: Path) -> None:
    missing = tmp_path / "vae.safetensors"
    message = _load_error(tiny_sd15, vae_path=str(missing))
    assert "model.vae_path" in message and str(missing) in message and "give" in message


def test_uncached_hub_id_is_attempted_and_a_clear_error(offline: None) -> None:
    message = _load_error("someone/not-cached-model")
    assert "model.name_or_path" in message and "someone/not-cached-model" in message
    assert "hub id" in message and "HF_HUB_OFFLINE" in message


def test_single_file_without_config_offline_says_how_to_fix(offline: None, ldm_file: Path) -> None:
    # no model.model_kwargs.config: the component configs would come from the hub
    message = _load_error(ldm_file)
    assert "model.name_or_path" in message and "model.model_kwargs.config" in message

