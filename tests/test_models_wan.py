"""The WAN adapters (2.1 T2V / I2V, 2.2 14B T2V / I2V with two experts) on tiny random models:
latents, the flow-matching objective, I2V conditioning, expert routing, LoRA key names, end-to-end
training through the Trainer, and LoRA files that diffusers' WAN loader reproduces exactly.

Offline, CPU, fp32, 32-64 px, 1-9 frames.
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
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import base_process, deep_update, write_job  # noqa: E402

from aitk.config.schema import ModelConfig, TrainConfig  # noqa: E402
from aitk.models.base import BatchContext  # noqa: E402
from interop_results import record  # noqa: E402

CPU = torch.device("cpu")
ARCH_VARIANT = {"wan21": "t2v", "wan21_i2v": "i2v", "wan22_14b": "22_t2v", "wan22_14b_i2v": "22_i2v"}
STEM = re.compile(
    r"^diffusion_model\.blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.(q|k|v|o|k_img|v_img)|ffn\.[02])$"
)


@pytest.fixture(scope="session")
def wan_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from aitk.models.wan import build_tiny_wan

    root = tmp_path_factory.mktemp("wan_models")
    return {arch: build_tiny_wan(root / variant, variant) for arch, variant in ARCH_VARIANT.items()}


def make_adapter(folder: Path, arch: str, **model_kwargs):
    from aitk.models.registry import create_adapter

    adapter = create_adapter(
        ModelConfig(name_or_path=str(folder), arch=arch, model_kwargs=model_kwargs), CPU, torch.float32
    )
    adapter.load()
    return adapter


@pytest.fixture(scope="module")
def adapters(wan_folders):
    """One loaded adapter per arch (tests that change weights restore them)."""
    return {arch: make_adapter(folder, arch) for arch, folder in wan_folders.items()}


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------- latents and objective
def test_latent_shapes_and_decoded_frames(adapters):
    adapter = adapters["wan21"]
    assert adapter.frame_rule == "4k+1" and adapter.bucket_divisibility == 16
    still = adapter.encode_images(pixels(2, 3, 32, 48))
    assert still.shape == (2, 16, 1, 4, 6)
    for frames, latent_frames in ((1, 1), (5, 2), (9, 3)):
        video = pixels(2, 3, frames, 32, 32, seed=frames)
        latents = adapter.encode_images(video)
        assert latents.shape == (2, 16, latent_frames, 4, 4)
        # frames-first layout (B, F, 3, H, W) gives the same latents
        if frames > 1:
            assert torch.equal(adapter.encode_images(video.transpose(1, 2)), latents)
    # a still is the one-frame clip of itself
    image = pixels(1, 3, 32, 32, seed=3)
    assert torch.equal(adapter.encode_images(image), adapter.encode_images(image.unsqueeze(2)))
    with pytest.raises(ValueError, match="4k\\+1"):
        adapter.encode_images(pixels(1, 3, 3, 32, 32))
    decoded = adapter.decode_latents(adapter.encode_images(pixels(1, 3, 9, 32, 32)))
    assert len(decoded) == 1 and len(decoded[0]) == 9 and decoded[0][0].size == (32, 32)


def test_noisy_batch_follows_the_flow_matching_formula(adapters):
    adapter = adapters["wan21"]
    latents = adapter.encode_images(pixels(3, 3, 5, 32, 32))
    noisy = adapter.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(5))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))  # drawn first
    sigma = (noisy.timesteps / 1000).view(-1, 1, 1, 1, 1)
    assert noisy.timesteps.dtype == torch.float32 and noisy.timesteps.shape == (3,)
    assert ((noisy.timesteps >= 0) & (noisy.timesteps <= 1000)).all()
    torch.testing.assert_close(noisy.noisy_latents, (1 - sigma) * latents + sigma * noise)
    torch.testing.assert_close(noisy.target, noise - latents)
    assert noisy.extra["expert"] == "main" and noisy.loss_weights is None
    again = adapter.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(5))
    assert torch.equal(again.noisy_latents, noisy.noisy_latents)  # deterministic: resumable


@pytest.mark.parametrize("timestep_type", ["shift", "sigmoid", "linear", "lognorm", "weighted"])
def test_timestep_distributions_and_denoising_range(adapters, timestep_type):
    adapter = adapters["wan21"]
    latents = torch.zeros(4000, 16, 1, 2, 2)
    cfg = TrainConfig(timestep_type=timestep_type)
    t = adapter.make_noisy_batch(latents, cfg, torch.Generator().manual_seed(0)).timesteps
    assert ((t >= 1) & (t <= 1000)).all() and t.std() > 90  # sigma >= SIGMA_MIN, as for FLUX
    expected_mean = {"shift": 676, "linear": 500, "sigmoid": 500, "weighted": 500, "lognorm": 611}
    assert abs(t.mean().item() - expected_mean[timestep_type]) < 20, t.mean()
    # the same shapes as FLUX's sampler (aitk.models.flow_matching), so a job means the same there
    from aitk.models.flow_matching import sample_sigmas

    if timestep_type != "weighted":
        flux = sample_sigmas(4000, cfg, torch.Generator().manual_seed(0), shift=adapter.flow_shift) * 1000
        qs = torch.tensor([0.1, 0.5, 0.9])
        assert (torch.quantile(t, qs) - torch.quantile(flux, qs)).abs().max() < 25
    with pytest.raises(ValueError, match="min_snr_gamma"):
        adapter.make_noisy_batch(latents[:1], TrainConfig(min_snr_gamma=5.0), None)
    content = adapter.make_noisy_batch(latents, TrainConfig(timestep_type=timestep_type, content_or_style="content"),
                                       torch.Generator().manual_seed(0)).timesteps
    style = adapter.make_noisy_batch(latents, TrainConfig(timestep_type=timestep_type, content_or_style="style"),
                                     torch.Generator().manual_seed(0)).timesteps
    assert content.mean() > t.mean() + 50 > style.mean() + 100
    bounded = adapter.make_noisy_batch(
        latents, TrainConfig(timestep_type=timestep_type, min_denoising_steps=200, max_denoising_steps=399),
        torch.Generator().manual_seed(0),
    ).timesteps
    assert bounded.min() >= 200 and bounded.max() <= 400 and bounded.std() > 20


# --------------------------------------------------------------------------- image-to-video
def test_i2v_condition_matches_the_pipeline_and_changes_the_prediction(adapters, wan_folders):
    from diffusers import WanImageToVideoPipeline

    adapter = adapters["wan21_i2v"]
    clip = pixels(1, 3, 5, 32, 32, seed=1)
    latents = adapter.encode_images(clip)
    first = clip[:, :, 0]
    condition = adapter.i2v_condition(latents, first)
    assert condition.shape == (1, 20, 2, 4, 4)
    assert latents.shape[1] + condition.shape[1] == adapter.transformer.config.in_channels == 36
    # diffusers' own I2V conditioning (mask channels first, then the first frame's latents)
    pipe = WanImageToVideoPipeline.from_pretrained(wan_folders["wan21_i2v"])
    _, theirs = pipe.prepare_latents(first, 1, 16, 32, 32, 5, torch.float32, CPU, None, torch.zeros_like(latents))
    torch.testing.assert_close(condition, theirs, atol=1e-5, rtol=1e-5)
    # a still is its own first frame; longer clips need their first frames
    still = adapter.encode_images(first)
    torch.testing.assert_close(adapter.i2v_condition(still, None), adapter.i2v_condition(still, first))
    with pytest.raises(ValueError, match="do_i2v"):
        adapter.i2v_condition(latents, None)
    # the CLIP image embedding is the pipeline's encode_image of the same picture
    from aitk.models.wan import to_pil as _to_pil

    picture = _to_pil(first)[0]
    torch.testing.assert_close(adapter.image_embeds([picture]), pipe.encode_image(picture, CPU))

    for arch in ("wan21_i2v", "wan22_14b_i2v"):
        adapter = adapters[arch]
        cond = adapter.encode_prompts(["a red circle"])
        other = pixels(1, 3, 32, 32, seed=9)
        predictions = []
        for frame in (first, other):
            batch = adapter.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(2),
                                             BatchContext(first_frames=frame, expert=None))
            assert batch.extra["condition"].shape == (1, 20, 2, 4, 4)
            assert ("image_embeds" in batch.extra) == (arch == "wan21_i2v")
            with torch.no_grad():
                predictions.append(adapter.predict(batch, cond))
        assert predictions[0].shape == latents.shape
        assert (predictions[0] - predictions[1]).abs().max() > 1e-4, arch


# --------------------------------------------------------------------------- WAN 2.2 experts
@pytest.mark.parametrize("arch, boundary", [("wan22_14b", 875.0), ("wan22_14b_i2v", 900.0)])
def test_expert_ranges_and_draws(adapters, wan_folders, arch, boundary):
    adapter = adapters[arch]
    assert set(adapter.experts()) == {"high_noise", "low_noise"}
    assert adapter.experts()["high_noise"] is adapter.transformer
    assert adapter.experts()["low_noise"] is adapter.transformer_2
    assert adapter.boundary_timestep == boundary
    assert adapter.expert_timestep_range("high_noise") == (boundary, 1000.0)
    assert adapter.expert_timestep_range("low_noise") == (0.0, boundary)
    assert adapter.trained_experts() == ["high_noise", "low_noise"]
    latents = torch.zeros(1000, 16, 1, 2, 2)  # one-frame clips: I2V conditions on the latents
    for timestep_type in ("shift", "sigmoid", "linear"):
        cfg = TrainConfig(timestep_type=timestep_type)
        for expert in ("high_noise", "low_noise"):
            generator = torch.Generator().manual_seed(1)
            for _ in range(2):
                batch = adapter.make_noisy_batch(latents, cfg, generator, BatchContext(expert=expert))
                t = batch.timesteps
                assert batch.extra["expert"] == expert
                assert adapter.expert_for_timesteps(t) == expert
                if expert == "high_noise":
                    assert (t >= boundary).all() and t.std() > 5
                else:
                    assert (t < boundary).all() and t.std() > 50
    # no expert given: any timestep, one expert per batch, both experts over many batches
    generator = torch.Generator().manual_seed(3)
    seen = set()
    for _ in range(40):
        batch = adapter.make_noisy_batch(latents[:4], TrainConfig(), generator, BatchContext())
        assert adapter.expert_for_timesteps(batch.timesteps) == batch.extra["expert"]
        seen.add(batch.extra["expert"])
    assert seen == {"high_noise", "low_noise"}
    with pytest.raises(ValueError, match="straddle"):
        adapter.expert_for_timesteps(torch.tensor([boundary - 1, boundary]))


def test_expert_settings_from_model_kwargs(wan_folders):
    adapter = make_adapter(wan_folders["wan22_14b"], "wan22_14b", boundary_ratio=0.5, train_low_noise=False)
    assert adapter.boundary_timestep == 500.0 and adapter.trained_experts() == ["high_noise"]
    assert adapter.denoiser() is adapter.transformer
    latents = torch.zeros(500, 16, 1, 2, 2)
    batch = adapter.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(0))
    assert batch.extra["expert"] == "high_noise" and (batch.timesteps >= 500).all()
    with pytest.raises(ValueError, match="outside train.min_denoising_steps"):
        adapter.make_noisy_batch(latents, TrainConfig(max_denoising_steps=400), None, BatchContext(expert="high_noise"))
    only_low = make_adapter(wan_folders["wan22_14b"], "wan22_14b", train_high_noise=False)
    assert only_low.trained_experts() == ["low_noise"] and only_low.denoiser() is only_low.transformer_2
    from aitk.models.wan import Wan22Adapter

    with pytest.raises(ValueError, match="train at least one"):
        Wan22Adapter(ModelConfig(name_or_path="x", model_kwargs={"train_high_noise": False,
                                                                  "train_low_noise": False}), CPU, torch.float32)
    with pytest.raises(ValueError, match="boundary_ratio"):
        Wan22Adapter(ModelConfig(name_or_path="x", model_kwargs={"boundary_ratio": 1.5}), CPU, torch.float32)
    single = make_adapter(wan_folders["wan21"], "wan21")
    assert list(single.experts()) == ["main"] and single.trained_experts() == ["main"]
    assert single.expert_timestep_range("main") == (0.0, 1000.0)


def test_predict_uses_the_expert_of_the_batch(adapters):
    adapter = adapters["wan22_14b"]
    cond = adapter.encode_prompts(["a blue square"])
    latents = adapter.encode_images(pixels(1, 3, 5, 32, 32))
    batches = {
        name: adapter.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(4), BatchContext(expert=name))
        for name in ("high_noise", "low_noise")
    }

    def outputs() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {name: adapter.predict(batch, cond) for name, batch in batches.items()}

    before = outputs()
    for perturbed, module in (("low_noise", adapter.transformer_2), ("high_noise", adapter.transformer)):
        saved = module.proj_out.bias.detach().clone()
        with torch.no_grad():
            module.proj_out.bias += 1.0
        after = outputs()
        with torch.no_grad():
            module.proj_out.bias.copy_(saved)
        for name in before:
            changed = not torch.allclose(before[name], after[name])
            assert changed == (name == perturbed), (perturbed, name)


# --------------------------------------------------------------------------- LoRA key names
@pytest.mark.parametrize("arch", list(ARCH_VARIANT))
def test_lora_key_stems_of_every_default_target(adapters, arch):
    adapter = adapters[arch]
    targets = adapter.network_candidates(include_conv=False)
    assert adapter.network_candidates(include_conv=True) == targets  # no 2-D convs in WAN
    per_block = 12 if arch == "wan21_i2v" else 10
    assert len(targets) == per_block * len(adapter.transformer.blocks)
    expected = {
        "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
        "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
        "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img",
        "attn2.add_v_proj": "cross_attn.v_img", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    }
    stems = []
    for name in targets:
        block, inner = re.match(r"blocks\.(\d+)\.(.+)", name).groups()
        stem = adapter.lora_key_stem(name)
        assert stem == f"diffusion_model.blocks.{block}.{expected[inner]}"
        assert STEM.match(stem)
        stems.append(stem)
    assert len(set(stems)) == len(stems)
    assert adapter.lora_key_stem("proj_out") == "diffusion_model.head.head"
    for bad in ("blocks.0.attn1.norm_q", "patch_embedding", "blocks.0.attn3.to_q", "rope"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            adapter.lora_key_stem(bad)
    assert adapter.diffusers_lora_prefix == "transformer"
    assert adapter.base_model_version == ("wan_2.2" if "22" in arch else "wan_2.1")
    assert adapter.modelspec_architecture.startswith("wan-2.") and adapter.modelspec_architecture.endswith("/lora")
    from aitk.models import archs

    if hasattr(archs, "data_facts"):  # the data pipeline's copy of these facts stays in step
        assert archs.data_facts(arch) == (adapter.bucket_divisibility, adapter.frame_rule)


def test_preview_kwargs(adapters, tmp_path):
    from PIL import Image

    from aitk.config.prompts import PreviewRequest

    request = PreviewRequest("p", 64, 64, 1, 1.0, 2, "", 1.0, num_frames=7)
    kwargs = adapters["wan21"].preview_kwargs(request)
    assert kwargs["num_frames"] == 5 and "image" not in kwargs
    assert adapters["wan21"].preview_kwargs(PreviewRequest("p", 64, 64, 1, 1.0, 2, "", 1.0))["num_frames"] == 1
    for arch in ("wan21_i2v", "wan22_14b_i2v"):
        with pytest.raises(ValueError, match="sample.ctrl_img"):
            adapters[arch].preview_kwargs(request)
        with pytest.raises(ValueError, match="sample.ctrl_img"):
            adapters[arch].preview_kwargs(PreviewRequest("p", 64, 64, 1, 1.0, 2, "", 1.0, ctrl_img=str(tmp_path / "no.png")))
        Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "first.png")
        kwargs = adapters[arch].preview_kwargs(
            PreviewRequest("p", 64, 64, 1, 1.0, 2, "", 1.0, num_frames=9, ctrl_img=str(tmp_path / "first.png"))
        )
        assert kwargs["num_frames"] == 9 and kwargs["image"].size == (40, 40)


def test_load_errors_name_the_problem(wan_folders, tmp_path):
    from aitk.models.sd import ModelLoadError

    with pytest.raises(ModelLoadError, match="text-to-video"):
        make_adapter(wan_folders["wan21_i2v"], "wan21")
    with pytest.raises(ModelLoadError, match="needs image_encoder, image_processor .*'wan21'"):
        make_adapter(wan_folders["wan21"], "wan21_i2v")
    with pytest.raises(ModelLoadError, match="needs transformer_2 .*'wan21_i2v'"):
        make_adapter(wan_folders["wan21_i2v"], "wan22_14b_i2v")
    with pytest.raises(ModelLoadError, match="image-to-video"):  # same parts, other transformer
        make_adapter(wan_folders["wan22_14b"], "wan22_14b_i2v")
    with pytest.raises(ModelLoadError, match="single file"):
        make_adapter(tmp_path / "wan.safetensors", "wan21")
    with pytest.raises(ModelLoadError, match="neither an existing folder"):
        make_adapter(tmp_path / "missing" / "model", "wan21")


def test_preview_schedulers(adapters):
    adapter = adapters["wan22_14b"]
    pipe = adapter.sample_pipeline()
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler" and pipe.scheduler is not adapter.scheduler
    assert pipe.transformer is adapter.transformer and pipe.transformer_2 is adapter.transformer_2
    assert pipe.config.boundary_ratio == 0.875
    euler = adapter.sample_pipeline("flowmatch").scheduler
    assert type(euler).__name__ == "FlowMatchEulerDiscreteScheduler" and euler.config.shift == adapter.flow_shift == 3.0


def test_tiny_builder_is_idempotent(wan_folders):
    from aitk.models.wan import build_tiny_wan

    folder = wan_folders["wan21"]
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_tiny_wan(folder, "t2v") == folder and weights.stat().st_mtime_ns == stamp
    index = json.loads((wan_folders["wan22_14b_i2v"] / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.9 and "transformer_2" in index


# --------------------------------------------------------------------------- training end to end
def wan_job(tmp_path: Path, name: str, arch: str, folder: Path, data: Path, **changes) -> Path:
    process = base_process(folder, data, tmp_path / "out")
    sample = {"sample_every": 15, "width": 64, "height": 64, "sample_steps": 2, "num_frames": 5, "fps": 8,
              "guidance_scale": 1.0, "prompts": ["a red circle [trigger]"]}
    if "i2v" in arch:
        sample["ctrl_img"] = str(data / "red_circle.png")
    process = deep_update(process, {
        "model": {"arch": arch},
        "train": {"steps": 30, "lr": 1e-2},
        "network": {"linear": 8, "linear_alpha": 4},
        "save": {"save_every": 10},
        "sample": sample,
    })
    process = deep_update(process, changes)
    return write_job(tmp_path / f"{name}.yaml", name, process)


def train(job_path: Path, **kwargs):
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    loaded = load_job_file(job_path)
    trainer = Trainer(loaded.job, loaded.job.config.process[0], **kwargs)
    return trainer, trainer.run()


def fixed_batch_loss(adapter, latents: torch.Tensor, cond) -> float:
    """Loss on fixed noise / timesteps: a steadier measure of learning than per-step losses."""
    losses = []
    for seed in range(6):
        batch = adapter.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(100 + seed))
        with torch.no_grad():
            losses.append(torch.mean((adapter.predict(batch, cond) - batch.target) ** 2).item())
    return float(np.mean(losses))


def render_latents(pipe, adapter, image=None) -> torch.Tensor:
    # prompt embeddings are passed in: diffusers' I2V pipeline cleans prompts with ftfy, which
    # need not be installed; the text encoder carries no LoRA, so this tests the transformer(s)
    embeds = adapter.encode_prompts(["a red circle shp style", ""])
    extra = {"image": image} if image is not None else {}
    return pipe(prompt_embeds=embeds.hidden_states[:1], negative_prompt_embeds=embeds.hidden_states[1:],
                height=64, width=64, num_frames=5, num_inference_steps=4, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(3), output_type="latent", **extra).frames


def check_run_outputs(result, name: str) -> None:
    run_dir = result.output_dir
    assert result.state == "completed" and result.step == 30
    names = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert names == [f"{step:09d}_0.{ext}" for step in (0, 15, 30) for ext in ("mp4", "webp")]
    from PIL import Image

    with Image.open(run_dir / "samples" / "000000030_0.webp") as webp:
        assert webp.n_frames == 5 and webp.size == (64, 64)
    tensors = load_file(str(result.final_lora))
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert stems and all(STEM.match(s) for s in stems)
    for stem in stems:
        assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= tensors.keys()
        assert tensors[f"{stem}.alpha"].item() == 4.0
    losses = [json.loads(line)["loss"] for line in (run_dir / f"metrics_{name}.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and np.mean(losses[-10:]) < 0.95 * np.mean(losses[:10]), losses


def test_wan21_t2v_trains_and_diffusers_loads_the_lora(wan_folders, shapes_dataset, tmp_path):
    from diffusers import WanPipeline

    folder = wan_folders["wan21"]
    trainer, result = train(wan_job(tmp_path, "t2v", "wan21", folder, shapes_dataset))
    check_run_outputs(result, "t2v")
    adapter, network = trainer.adapter, trainer.network
    adapter.denoiser().eval()
    latents = adapter.encode_images(pixels(2, 3, 64, 64, seed=11))
    cond = adapter.encode_prompts(["a red circle, shp style", "a blue square, shp style"])
    trained = fixed_batch_loss(adapter, latents, cond)
    network.set_multiplier(0.0)
    untrained = fixed_batch_loss(adapter, latents, cond)
    base = render_latents(adapter.sample_pipeline(), adapter)
    network.set_multiplier(1.0)
    assert trained < 0.95 * untrained, (trained, untrained)

    ours = render_latents(adapter.sample_pipeline(), adapter)
    fresh = WanPipeline.from_pretrained(folder)
    fresh.load_lora_weights(str(result.final_lora))
    theirs = render_latents(fresh, adapter)
    assert (ours - base).abs().max() > 1e-3  # the LoRA matters, so the comparison can fail
    record("wan21", "lora", "diffusers load_lora_weights",
           (max_diff := float((ours - theirs).abs().max())) < 1e-4, max_diff)
    assert (ours - theirs).abs().max() < 1e-4
    # diffusers converted every original name back to the module the trainer wrapped
    converted = WanPipeline.lora_state_dict(str(result.final_lora))
    wrapped = network.wrapped_module_names()
    assert set(converted) == {f"transformer.{n}.lora_{ab}.weight" for n in wrapped for ab in "AB"}


def test_wan21_i2v_trains_resumes_exactly_and_diffusers_loads_the_lora(wan_folders, shapes_dataset, tmp_path):
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    folder = wan_folders["wan21_i2v"]
    trainer, straight = train(wan_job(tmp_path, "straight", "wan21_i2v", folder, shapes_dataset))
    check_run_outputs(straight, "straight")

    resumed_job = wan_job(tmp_path, "resumed", "wan21_i2v", folder, shapes_dataset)

    def stop_at_15(t, step: int) -> None:
        if step == 15:
            t.stop.request("test")

    _, first = train(resumed_job, on_step_end=stop_at_15)
    assert first.state == "stopped" and first.step == 15
    _, second = train(resumed_job)
    assert second.state == "completed" and second.step == 30
    a, b = load_file(str(straight.final_lora)), load_file(str(second.final_lora))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".cross_attn.k_img." in k for k in a) and any(".cross_attn.v_img." in k for k in a)

    adapter = trainer.adapter
    adapter.denoiser().eval()
    image = Image.open(shapes_dataset / "red_circle.png").convert("RGB")
    ours = render_latents(adapter.sample_pipeline(), adapter, image)
    fresh = WanImageToVideoPipeline.from_pretrained(folder)
    base = render_latents(fresh, adapter, image)
    fresh.load_lora_weights(str(straight.final_lora))
    theirs = render_latents(fresh, adapter, image)
    assert (ours - base).abs().max() > 1e-3
    record("wan21_i2v", "lora", "diffusers load_lora_weights",
           (max_diff := float((ours - theirs).abs().max())) < 1e-4, max_diff)
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["wan22_14b", "wan22_14b_i2v"])
def test_wan22_expert_loras_load_into_their_own_transformers(wan_folders, tmp_path, arch):
    """One LoRA per expert (built with inject_network directly), saved in the original naming;
    diffusers loads the high-noise file into `transformer` and the low-noise one into
    `transformer_2` (load_into_transformer_2=True) and reproduces the adapter's output."""
    from diffusers import WanImageToVideoPipeline, WanPipeline
    from PIL import Image

    from aitk.networks import inject_network
    from aitk.networks.export import save_lora

    folder = wan_folders[arch]
    adapter = make_adapter(folder, arch)
    files = {}
    for index, (name, expert) in enumerate(adapter.experts().items()):
        handle = inject_network(expert, linear_rank=4, linear_alpha=8.0,
                                candidates=adapter.network_candidates(False), seed=index)
        gen = torch.Generator().manual_seed(10 + index)
        with torch.no_grad():  # non-zero up weights, different per expert, so each file matters
            for p in handle.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        expert.eval()
        files[name] = save_lora(tmp_path / f"{name}.safetensors", handle, prefix=adapter.lora_prefix,
                                key_for=adapter.lora_key_stem, dtype=torch.float32)
        assert all(STEM.match(k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0])
                   for k in load_file(str(files[name])))

    pipe_cls = WanImageToVideoPipeline if adapter.i2v else WanPipeline
    image = Image.new("RGB", (64, 64), (30, 160, 40)) if adapter.i2v else None
    fresh = pipe_cls.from_pretrained(folder)
    assert fresh.config.boundary_ratio == adapter.boundary_ratio
    fresh.scheduler.set_timesteps(4)
    steps = fresh.scheduler.timesteps
    assert (steps >= adapter.boundary_timestep).any() and (steps < adapter.boundary_timestep).any()
    fresh.load_lora_weights(str(files["high_noise"]))
    assert not any("lora" in n for n, _ in fresh.transformer_2.named_modules())
    fresh.load_lora_weights(str(files["low_noise"]), load_into_transformer_2=True)

    # each expert on its own: same input, same output as the adapter's LoRA-wrapped expert
    x = torch.randn(1, adapter.transformer.config.in_channels, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    text = adapter.encode_prompts(["a green triangle"]).hidden_states
    t = torch.tensor([500.0])
    for name, theirs_module in (("high_noise", fresh.transformer), ("low_noise", fresh.transformer_2)):
        with torch.no_grad():
            ours_out = adapter.experts()[name](x, t, text, return_dict=False)[0]
            theirs_out = theirs_module(x, t, text, return_dict=False)[0]
        record(arch, "lora", "diffusers load_lora_weights",
               (max_diff := float((ours_out - theirs_out).abs().max())) < 1e-4, max_diff, note=f"{name} expert alone")
        assert (ours_out - theirs_out).abs().max() < 1e-4, name
    ours = render_latents(adapter.sample_pipeline(), adapter, image)
    theirs = render_latents(fresh, adapter, image)
    base = render_latents(pipe_cls.from_pretrained(folder), adapter, image)
    assert (ours - base).abs().max() > 1e-3
    record(arch, "lora", "diffusers load_lora_weights",
           (max_diff := float((ours - theirs).abs().max())) < 1e-4, max_diff, note="both experts in the pipeline")
    assert (ours - theirs).abs().max() < 1e-4


def test_patch_embedding_is_exact_in_bf16_on_the_cpu_when_the_latent_is_one_patch_wide():
    """oneDNN's bf16 Conv3d on the CPU is wrong for a one-patch-wide latent (WAN 2.2 5B's 48
    channels, a narrow bucket): the adapter runs the patch embedding without it there."""
    from aitk.models.wan.adapter import exact_cpu_patch_embedding

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(48, 24, (1, 2, 2), stride=(1, 2, 2)).to(torch.bfloat16)
    x = torch.randn(1, 48, 11, 4, 2).to(torch.bfloat16)
    exact = torch.nn.functional.conv3d(x.float(), conv.weight.float(), conv.bias.float(), stride=(1, 2, 2))
    exact_cpu_patch_embedding(conv)
    enabled_before = torch.backends.mkldnn.enabled
    assert (conv(x).float() - exact).abs().max() < 0.05
    assert torch.backends.mkldnn.enabled == enabled_before  # restored after the call
