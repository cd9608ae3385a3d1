"""WAN 2.2 TI2V 5B (`wan22_5b`) on a tiny random model of the real diffusers classes: the 5B's
structure (48-channel VAE with 16x compression, per-token timesteps), prompts as WanPipeline encodes
them, the flow objective with first-frame conditioning kept out of the loss, the first-frame latent
diffusers' WanImageToVideoPipeline conditions on, buckets of 32 px and 4k+1 frames, LoRA / LoKr /
DoRA / quantized runs on clips, diffusers' exact load (T2V and I2V), the tools, plan config, preset.

Offline, CPU, fp32, 64 px, 1-9 frames.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import family_checks as family  # noqa: E402
from interop_results import record  # noqa: E402
from upstream_jobs import extras_on_path  # noqa: E402,F401 - autouse fixture: torchao for model.quantize

from aitk.config.schema import ModelConfig, TrainConfig  # noqa: E402
from aitk.models.base import BatchContext, PromptEmbeds  # noqa: E402
from aitk.models.wan import FIRST_FRAME_MASK, Wan22TI2VAdapter, build_tiny_wan  # noqa: E402

ARCH = "wan22_5b"
STEM = re.compile(r"^diffusion_model\.blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])$")


def mixed_clips(root: Path) -> Path:
    """root/clips: three captioned clips of different length, fps and aspect; root/first.png: a
    preview's first frame. Built once per folder."""
    from test_data_video_training import write_clip

    clips = root / "clips"
    if not clips.exists():
        clips.mkdir(parents=True)
        write_clip(clips / "wide.mp4", 24, 64, 48, fps=24)
        write_clip(clips / "tall.mp4", 12, 48, 64, fps=12)
        write_clip(clips / "short.mp4", 7, 64, 64, fps=8)  # 7 frames: trains as 5 (4k+1)
        for stem in ("wide", "tall", "short"):
            (clips / f"{stem}.txt").write_text(f"a {stem} clip of colours, shp style")
        Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "first.png")
    return clips


@pytest.fixture(scope="session")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_wan(tmp_path_factory.mktemp("wan22_5b") / "wan_22_5b", "22_5b")


@pytest.fixture(scope="module")
def adapter(model: Path) -> Wan22TI2VAdapter:
    return family.load_adapter(Wan22TI2VAdapter, model, ARCH)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mixed_clips(tmp_path_factory.mktemp("wan22_5b_data"))


def video(b: int, frames: int, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, frames, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------- model and facts
def test_tiny_model_has_the_5b_structure(model: Path, adapter: Wan22TI2VAdapter) -> None:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(model)
    assert pipe.config.expand_timesteps is True and pipe.transformer_2 is None
    vae = pipe.vae.config
    assert (vae.z_dim, vae.scale_factor_spatial, vae.scale_factor_temporal, vae.patch_size) == (48, 16, 4, 2)
    assert vae.is_residual and len(vae.latents_mean) == 48
    t = pipe.transformer.config
    assert (t.in_channels, t.out_channels, tuple(t.patch_size)) == (48, 48, (1, 2, 2))
    assert sum(f.stat().st_size for f in model.rglob("*") if f.is_file()) < 10 * 2**20
    # the adapter's facts
    from aitk.models.archs import CONTROL_ARCHS, OPTIONAL_FIRST_FRAME_ARCHS, data_facts

    assert data_facts(ARCH) == (adapter.bucket_divisibility, adapter.frame_rule) == (32, "4k+1")
    assert ARCH in OPTIONAL_FIRST_FRAME_ARCHS and ARCH not in CONTROL_ARCHS and adapter.optional_first_frame and not adapter.i2v
    assert adapter.flow_shift == 5.0 and list(adapter.experts()) == ["main"]
    assert adapter.base_model_version == "wan_2.2_5b" and adapter.modelspec_architecture == "wan-2.2-ti2v-5b/lora"
    latents = adapter.encode_images(video(2, 9, 64, 96))
    assert latents.shape == (2, 48, 3, 4, 6)
    assert adapter.encode_images(video(1, 1)[:, :, 0]).shape == (1, 48, 1, 4, 4)
    with pytest.raises(ValueError, match="4k\\+1"):
        adapter.encode_images(video(1, 6))
    decoded = adapter.decode_latents(latents[:1])
    assert len(decoded[0]) == 9 and decoded[0][0].size == (96, 64)


def test_lora_targets_carry_comfyuis_wan_names(adapter: Wan22TI2VAdapter) -> None:
    targets = adapter.network_candidates(include_conv=False)
    assert adapter.network_candidates(include_conv=True) == targets
    assert len(targets) == 10 * len(adapter.transformer.blocks)
    stems = [adapter.lora_key_stem(n) for n in targets]
    assert all(STEM.match(s) for s in stems) and len(set(stems)) == len(stems)
    assert adapter.lora_key_stem("blocks.1.attn2.to_out.0") == "diffusion_model.blocks.1.cross_attn.o"
    assert adapter.lora_key_stem("blocks.0.ffn.net.0.proj") == "diffusion_model.blocks.0.ffn.0"


def test_load_errors_name_the_right_arch(model: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from aitk.models.base import ModelLoadError
    from aitk.models.wan import Wan21Adapter

    with pytest.raises(ModelLoadError, match="has 48 .*'wan22_5b'"):
        family.load_adapter(Wan21Adapter, model, "wan21")
    t2v = build_tiny_wan(tmp_path_factory.mktemp("wan21") / "t2v", "t2v")
    with pytest.raises(ModelLoadError, match="48-channel transformer and VAE.*wan21"):
        family.load_adapter(Wan22TI2VAdapter, t2v, ARCH)


def test_prompts_are_encoded_as_the_pipeline_does(adapter: Wan22TI2VAdapter, model: Path) -> None:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(model)
    prompts = ["a red circle, shp style", "a cat"]
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512)
    torch.testing.assert_close(adapter.encode_prompts(prompts).hidden_states, theirs, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- objective and I2V
def test_text_to_video_batch_is_rectified_flow(adapter: Wan22TI2VAdapter) -> None:
    latents = adapter.encode_images(video(2, 9))
    batch = adapter.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(5))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    sigma = (batch.timesteps / 1000).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(batch.noisy_latents, (1 - sigma) * latents + sigma * noise)
    torch.testing.assert_close(batch.target, noise - latents)
    assert FIRST_FRAME_MASK not in batch.extra and batch.loss_weights is None
    # clips without first frames and stills train without conditioning
    stills = adapter.encode_images(video(2, 1)[:, :, 0])
    context = BatchContext(first_frames=video(2, 1)[:, :, 0])
    assert FIRST_FRAME_MASK not in adapter.make_noisy_batch(stills, TrainConfig(), None, context).extra


def test_first_frame_conditioning_is_the_pipelines_and_kept_out_of_the_loss(
    adapter: Wan22TI2VAdapter, model: Path
) -> None:
    from diffusers import WanImageToVideoPipeline

    from aitk.trainer.loss import diffusion_loss

    clip = video(2, 9, seed=1)
    first = clip[:, :, 0]
    latents = adapter.encode_images(clip)
    batch = adapter.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(2),
                                     BatchContext(first_frames=first))
    # the first latent frame is diffusers' own I2V condition (expand_timesteps) of the same frame
    pipe = WanImageToVideoPipeline.from_pretrained(model)
    assert pipe.config.expand_timesteps
    _, condition, mask = pipe.prepare_latents(first[:1], 1, 48, 64, 64, 9, torch.float32, torch.device("cpu"), None,
                                              torch.zeros_like(latents[:1]))
    torch.testing.assert_close(batch.noisy_latents[:1, :, :1], condition, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.extra[FIRST_FRAME_MASK][:1], mask)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    sigma = (batch.timesteps / 1000).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(batch.noisy_latents[:, :, 1:], ((1 - sigma) * latents + sigma * noise)[:, :, 1:])
    # per-token timesteps as the pipeline builds them: 0 on the first frame's tokens
    tokens = adapter.token_timesteps(batch.timesteps, batch.extra[FIRST_FRAME_MASK])
    assert tokens.shape == (2, 3 * 2 * 2)
    assert (tokens[:, :4] == 0).all() and torch.equal(tokens[:, 4:], batch.timesteps.view(-1, 1).expand(2, 8))
    cond = adapter.encode_prompts(["a red circle", "a blue square"])
    with torch.no_grad():
        prediction = adapter.predict(batch, cond)
        direct = adapter.transformer(hidden_states=batch.noisy_latents, timestep=tokens,
                                     encoder_hidden_states=cond.hidden_states, return_dict=False)[0]
    assert torch.equal(prediction[:, :, 0], batch.target[:, :, 0])  # nothing to learn there
    torch.testing.assert_close(prediction[:, :, 1:], direct[:, :, 1:])
    # the loss is the mean over the trained frames (ai-toolkit's masked mean)
    loss = diffusion_loss(prediction, batch.target, sample_weights=batch.loss_weights)
    expected = ((direct - batch.target)[:, :, 1:] ** 2).mean()
    torch.testing.assert_close(loss, expected)
    # another first frame changes the prediction of the frames after it
    other = adapter.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(2),
                                     BatchContext(first_frames=video(2, 1, seed=9)[:, :, 0]))
    with torch.no_grad():
        changed = adapter.predict(other, cond)
    assert (changed[:, :, 1:] - prediction[:, :, 1:]).abs().max() > 1e-4


def test_buckets_are_multiples_of_32_with_4k1_frames_never_upscaled(tmp_path: Path) -> None:
    from test_data_video_training import write_clip

    from aitk.config.schema import DatasetConfig
    from aitk.data import TrainingData

    sizes = {"wide.mp4": (40, 112, 72), "tall.mp4": (14, 56, 80), "small.mp4": (6, 40, 40)}  # frames, w, h
    for name, (frames, w, h) in sizes.items():
        write_clip(tmp_path / name, frames, w, h, fps=12)
        (tmp_path / name).with_suffix(".txt").write_text(name)
    cfg = DatasetConfig(folder_path=str(tmp_path), resolution=[96], num_frames=9)
    data = TrainingData([cfg], trigger_word=None, divisibility=Wan22TI2VAdapter.bucket_divisibility, batch_size=1,
                        seed=0, log=lambda _line: None, frame_rule=Wan22TI2VAdapter.frame_rule)
    seen = {}
    for _ in range(data.batches_per_epoch()):
        batch = data.next_batch()
        frames, h, w = batch.pixels.shape[2:]
        seen[batch.keys[0].split(":", 1)[1]] = (frames, h, w)
    assert set(seen) == set(sizes)
    for name, (frames, h, w) in seen.items():
        clip_frames, clip_w, clip_h = sizes[name]
        assert h % 32 == 0 and w % 32 == 0 and h <= clip_h and w <= clip_w, (name, h, w)
        assert (frames - 1) % 4 == 0 and frames <= clip_frames, (name, frames)
    assert seen["small.mp4"] == (5, 32, 32)


# --------------------------------------------------------------------------- training and interop
def job(tmp_path: Path, name: str, model_dir: Path, clips: Path, **changes) -> Path:
    sections = {
        "model": {"arch": ARCH},
        "train": {"steps": 12, "lr": 1e-2, "lr_scheduler": "constant"},
        "network": {"linear": 8, "linear_alpha": 4},
        "save": {"save_every": 100},
        "sample": {"sample_every": 12, "width": 64, "height": 64, "sample_steps": 2, "num_frames": 5, "fps": 8,
                   "guidance_scale": 1.0, "prompts": ["a red circle [trigger]",
                                                      f"a red clip --ctrl_img {clips.parent / 'first.png'}"]},
    }
    return family.write_job(tmp_path, name, model_dir, clips, sections, changes,
                            dataset={"num_frames": 9, "do_i2v": True})


@pytest.fixture(scope="module")
def lora_run(model: Path, clips: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("wan22_5b_lora")
    trainer, result = family.train(job(tmp, "w5lora", model, clips))
    return trainer, result, tmp


def render(pipe, adapter: Wan22TI2VAdapter, image: Image.Image | None = None) -> torch.Tensor:
    embeds = adapter.encode_prompts(["a red circle shp style", ""])
    extra = {"image": image} if image is not None else {}
    return pipe(prompt_embeds=embeds.hidden_states[:1], negative_prompt_embeds=embeds.hidden_states[1:],
                height=64, width=64, num_frames=5, num_inference_steps=3, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(3), output_type="latent", **extra).frames


def test_lora_trains_on_clips_with_previews_and_comfyui_names(lora_run: tuple) -> None:
    trainer, result, _ = lora_run
    assert result.state == "completed" and result.step == 12
    losses = family.losses(result, "w5lora")
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    samples = sorted(p.name for p in (result.output_dir / "samples").iterdir())
    assert samples == [f"{s:09d}_{i}.{e}" for s in (0, 12) for i in (0, 1) for e in ("mp4", "webp")]
    with Image.open(result.output_dir / "samples" / "000000012_1.webp") as webp:
        assert webp.n_frames == 5 and webp.size == (64, 64)
    from safetensors import safe_open

    tensors = load_file(str(result.final_lora))
    stems = [trainer.adapter.lora_key_stem(m) for m in trainer.network.wrapped_module_names()]
    assert stems and all(STEM.match(s) for s in stems)
    assert set(tensors) == {f"{s}.{n}" for s in stems for n in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(tensors[f"{s}.alpha"].item() == 4.0 for s in stems)
    with safe_open(str(result.final_lora), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "wan-2.2-ti2v-5b/lora" and meta["ss_base_model_version"] == "wan_2.2_5b"


@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_diffusers_loads_the_lora_exactly(lora_run: tuple, model: Path, clips: Path, mode: str) -> None:
    from diffusers import WanImageToVideoPipeline, WanPipeline

    trainer, result, _ = lora_run
    adapter = trainer.adapter
    image = Image.open(clips.parent / "first.png").convert("RGB") if mode == "i2v" else None
    pipeline_cls = WanImageToVideoPipeline if mode == "i2v" else WanPipeline
    diff, effect = family.diffusers_lora_diff(adapter, pipeline_cls, model, result.final_lora,
                                              lambda pipe: render(pipe, adapter, image))
    record(ARCH, "lora", "diffusers load_lora_weights", diff < 1e-4, diff, note=f"{mode} preview")
    assert effect > 1e-3 and diff < 1e-4, (mode, diff, effect)


def test_tools_know_the_files(lora_run: tuple, model: Path) -> None:
    from diffusers import WanTransformer3DModel

    trainer, result, tmp = lora_run
    assert family.lora_info(result.final_lora)["architecture"] == ARCH
    # keys alone: WAN's shared naming, this arch among them
    assert ARCH in family.headerless_info(result.final_lora, tmp)["architecture"]
    family.diffusers_layout_round_trip(result.final_lora, ARCH, tmp)
    adapter = trainer.adapter
    adapter.transformer.eval()
    clip = video(1, 9, seed=4)
    batch = adapter.make_noisy_batch(adapter.encode_images(clip), TrainConfig(), torch.Generator().manual_seed(1),
                                     BatchContext(first_frames=clip[:, :, 0]))
    family.check_merge(ARCH, adapter, model, result.final_lora, tmp, WanTransformer3DModel, batch,
                       adapter.encode_prompts(["a red circle"]))


@pytest.mark.parametrize("kind", ["lokr", "dora", "quantized"])
def test_lokr_dora_and_a_quantized_base_train(model: Path, clips: Path, tmp_path: Path, kind: str) -> None:
    network = {"lokr": {"type": "lokr", "linear": 2, "linear_alpha": 4, "lokr_factor": -1},
               "dora": {"dora": True, "linear": 4, "linear_alpha": 8}, "quantized": {}}[kind]
    model_section = {"quantize": True, "qtype": "qint8"} if kind == "quantized" else {}
    path = job(tmp_path, f"w5{kind}", model, clips, train={"steps": 4}, sample={"sample_every": 1000},
               network=network, model=model_section)
    trainer, result = family.train(path)
    assert result.state == "completed" and all(math.isfinite(x) for x in family.losses(result, f"w5{kind}"))
    tensors = load_file(str(result.final_lora))
    assert tensors and all(k.startswith("diffusion_model.blocks.") for k in tensors)
    if kind == "quantized":
        layers = [m for m in trainer.network.lora_layers().values() if isinstance(m.base_layer, torch.nn.Linear)]
        assert layers and all("torchao" in type(m.base_layer.weight).__module__ for m in layers)
        return
    assert any(k.endswith(".lokr_w1" if kind == "lokr" else "dora_scale") for k in tensors), list(tensors)[:4]
    # aitk's own loader reads the file into a fresh model: the same prediction
    adapter = trainer.adapter
    adapter.transformer.eval()
    fresh = family.load_adapter(Wan22TI2VAdapter, model, ARCH)
    clip = video(1, 9, seed=6)
    batch = adapter.make_noisy_batch(adapter.encode_images(clip), TrainConfig(), torch.Generator().manual_seed(3),
                                     BatchContext(first_frames=clip[:, :, 0]))
    cond = PromptEmbeds(adapter.encode_prompts(["a red circle"]).hidden_states)
    rank = network["linear"]
    diff = family.loader_round_trip_diff(adapter, fresh, result.final_lora, batch, cond, network_type=kind
                                         if kind == "lokr" else "lora", linear_rank=rank,
                                         **({"dora": True} if kind == "dora" else {}))
    record(ARCH, kind, "aitk loader (round trip)", diff < 1e-5, diff)
    assert diff < 1e-5, (kind, diff)


# --------------------------------------------------------------------------- plan, preset, example
def test_shipped_plan_config_builds_the_real_sizes() -> None:
    from aitk.plan.build import build_on_meta
    from aitk.plan.sources import model_spec

    spec = model_spec("Wan-AI/Wan2.2-TI2V-5B-Diffusers", ARCH)
    parts = {name: build_on_meta(spec.parts[name]) for name in ("transformer", "vae")}
    count = sum(p.numel() for p in parts["transformer"].parameters())
    assert 4.9e9 < count < 5.1e9, count
    adapter = Wan22TI2VAdapter(ModelConfig(name_or_path="Wan-AI/Wan2.2-TI2V-5B-Diffusers", arch=ARCH),
                               torch.device("cpu"), torch.bfloat16)
    adapter.bind(parts, spec.configs({}))
    with torch.device("meta"):
        batch, cond = adapter.example_batch(1, (1280, 704), 121, expert="main", with_controls=True)
    assert batch.noisy_latents.shape == (1, 48, 31, 44, 80) and cond.hidden_states.shape == (1, 512, 4096)
    assert batch.extra[FIRST_FRAME_MASK].shape == (1, 1, 31, 44, 80)


def test_preset_and_example_validate_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from aitk.config.validate import validate_command
    from aitk.ui.presets import PRESETS

    preset = PRESETS[ARCH]["job"]
    process = preset["config"]["process"][0]
    assert process["model"]["arch"] == ARCH and process["datasets"][0]["do_i2v"] is True
    process["datasets"][0]["folder_path"] = str(tmp_path)
    example = yaml.safe_load((Path(__file__).parent.parent / "config" / "examples" / "train_lora_wan22_5b.yaml")
                             .read_text())
    example["config"]["process"][0]["datasets"][0]["folder_path"] = str(tmp_path)
    for name, body in (("preset", preset), ("example", example)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(body))
        assert validate_command([str(path)]) == 0, name
        printed = capsys.readouterr()
        assert "warning" not in (printed.out + printed.err).lower(), (name, printed)
