"""Previews under bf16 / fp16 training with the fp32 VAE every adapter keeps, on tiny models of
each family (FLUX Kontext with a control image, FLUX dev / schnell, WAN T2V / I2V, SD 1.5,
SDXL): the preview file is written and is a real picture (finite latents, not blank). Kontext's
control image reaches the transformer as the same latents training gives it. And WAN I2V takes
each clip's first frame without do_i2v, as ai-toolkit's I2V models do."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import base_process, build_tiny_model, deep_update, write_job  # noqa: E402

from aitk.config.prompts import PreviewRequest  # noqa: E402
from aitk.config.schema import DatasetConfig, ModelConfig, ProcessConfig  # noqa: E402
from aitk.models.archs import FIRST_FRAME_ARCHS  # noqa: E402
from aitk.models.base import ModelAdapter  # noqa: E402
from aitk.models.registry import create_adapter  # noqa: E402
from aitk.trainer.sampling import render_previews  # noqa: E402

CPU = torch.device("cpu")
#: arch -> tiny builder variant
VARIANTS = {
    "flux_kontext": "kontext", "flux": "dev", "sd1": "sd15", "sdxl": "sdxl",
    "wan21": "t2v", "wan21_i2v": "i2v", "wan22_14b": "22_t2v", "wan22_14b_i2v": "22_i2v",
}
CONTROL_ARCHS = ("flux_kontext", "wan21_i2v", "wan22_14b_i2v")  # previews start from ctrl_img


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("preview-models")


@pytest.fixture(scope="module")
def control_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ctrl") / "ctrl.png"
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    pixels[16:48, 16:48] = (220, 30, 30)  # a red square on noise
    Image.fromarray(pixels).save(path)
    return path


def load(models: Path, arch: str, dtype: torch.dtype, variant: str | None = None) -> ModelAdapter:
    folder = build_tiny_model(variant or VARIANTS[arch], models)
    adapter = create_adapter(ModelConfig(name_or_path=str(folder), arch=arch), CPU, dtype)
    adapter.load()
    return adapter


def preview(adapter: ModelAdapter, out: Path, ctrl: Path | None, *, num_frames: int = 1) -> tuple[Path, torch.Tensor]:
    """Render one 64x64, 2-step preview as the trainer does; (first file, the latents decoded)."""
    seen: list[torch.Tensor] = []

    def decode(latents: torch.Tensor) -> list[Any]:
        seen.append(latents.detach().clone())
        return adapter.decode_latents(latents)

    request = PreviewRequest("a red square", 64, 64, 3, 1.0, 2, "", 1.0, num_frames=num_frames,
                             ctrl_img=str(ctrl) if ctrl else None)
    with adapter.preview_context():
        paths = render_previews(adapter.sample_pipeline(None), [request], out, 0, decode=decode,
                                set_multiplier=lambda _m: None, extra_kwargs=adapter.preview_kwargs)
    return paths[-1], seen[0]


def assert_a_picture(path: Path, latents: torch.Tensor) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert torch.isfinite(latents.float()).all(), "the preview's latents have NaN / inf"
    with Image.open(path) as image:
        frames = [np.asarray(image.convert("RGB"), dtype=np.float32)]
        if getattr(image, "n_frames", 1) > 1:
            image.seek(image.n_frames - 1)
            frames.append(np.asarray(image.convert("RGB"), dtype=np.float32))
    for frame in frames:
        assert frame.shape[:2] == (64, 64)
        assert frame.std() > 2.0, f"{path.name}: a blank picture (std {frame.std():.2f})"


@pytest.mark.parametrize("arch", list(VARIANTS))
def test_bf16_previews_with_the_fp32_vae(models: Path, control_image: Path, tmp_path: Path, arch: str) -> None:
    adapter = load(models, arch, torch.bfloat16)
    assert next(adapter.vae.parameters()).dtype == torch.float32
    assert torch.bfloat16 in {p.dtype for p in adapter.denoiser().parameters()}  # WAN keeps norms fp32
    video = arch.startswith("wan")
    path, latents = preview(adapter, tmp_path, control_image if arch in CONTROL_ARCHS else None,
                            num_frames=5 if video else 1)
    assert path.suffix == (".webp" if video else ".jpg")
    assert_a_picture(path, latents)


def test_fp16_schnell_and_kontext_previews(models: Path, control_image: Path, tmp_path: Path) -> None:
    for arch, variant, ctrl in (("flux", "schnell", None), ("flux_kontext", "kontext", control_image)):
        path, latents = preview(load(models, arch, torch.float16, variant), tmp_path / variant, ctrl)
        assert_a_picture(path, latents)


def _reference_tokens_seen(adapter: Any, ctrl: Path, out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(the transformer's input tokens past the image's own, the latents the preview decoded)."""
    captured: list[torch.Tensor] = []

    def grab(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        captured.append(kwargs["hidden_states"].detach().clone())

    handle = adapter.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _, latents = preview(adapter, out, ctrl)
    finally:
        handle.remove()
    n = (64 // 16) ** 2  # a 64x64 image: 4x4 packed tokens of its own
    return captured[0][:, n:], latents


def test_kontext_control_latents_are_what_training_encodes(models: Path, control_image: Path, tmp_path: Path) -> None:
    from aitk.models.flux import pack_latents

    from aitk.data.images import to_tensor

    with Image.open(control_image) as image:
        image = image.convert("RGB")
    for dtype in (torch.bfloat16, torch.float32):
        adapter = load(models, "flux_kontext", dtype)
        seen, _ = _reference_tokens_seen(adapter, control_image, tmp_path / str(dtype))
        # the pipeline's pixels are training's (to float rounding: x / 255 * 2 - 1 vs x / 127.5 - 1)
        pixels = adapter.sample_pipeline().image_processor.preprocess(image, 64, 64)
        torch.testing.assert_close(pixels[0], to_tensor(image), atol=1e-6, rtol=0)
        # training: FluxKontextAdapter._batch_extra encodes the controls in fp32, then casts
        expected = pack_latents(adapter.encode_images(pixels).to(dtype))
        assert seen.dtype == dtype
        torch.testing.assert_close(seen, expected, atol=1e-6, rtol=0)

    # in fp32 the preview is diffusers' own FluxKontextPipeline's, to the bit
    from diffusers import FluxKontextPipeline

    ours = adapter.sample_pipeline()
    theirs = FluxKontextPipeline(**ours.components)
    kwargs = adapter.preview_kwargs(PreviewRequest("p", 64, 64, 3, 1.0, 2, "", 1.0, ctrl_img=str(control_image)))
    outputs = [
        pipe(prompt="a red square", width=64, height=64, num_inference_steps=2, guidance_scale=1.0,
             generator=torch.Generator().manual_seed(3), output_type="latent", **kwargs).images
        for pipe in (ours, theirs)
    ]
    assert type(ours) is not FluxKontextPipeline and isinstance(ours, FluxKontextPipeline)
    assert torch.equal(outputs[0], outputs[1])


# --------------------------------------------------------------------------- WAN I2V without do_i2v
def test_i2v_archs_are_the_first_frame_archs() -> None:
    from aitk.models.archs import ADAPTERS
    from aitk.models.registry import adapter_class

    assert FIRST_FRAME_ARCHS == {arch for arch in ADAPTERS if getattr(adapter_class(arch), "i2v", False)}


@pytest.mark.parametrize("arch", ["wan21_i2v", "wan22_14b_i2v", "wan21"])
def test_video_datasets_of_i2v_archs_give_first_frames(arch: str) -> None:
    def process(**dataset: Any) -> ProcessConfig:
        return ProcessConfig(
            training_folder="out", model={"name_or_path": "m", "arch": arch},
            datasets=[{"folder_path": "clips", **dataset}, {"folder_path": "stills"}],
        )

    i2v = arch in FIRST_FRAME_ARCHS
    for explicit in ({}, {"do_i2v": False}):  # as ai-toolkit: do_i2v: false changes nothing for I2V models
        videos, stills = process(num_frames=5, **explicit).datasets
        assert videos.do_i2v is i2v
        assert stills.do_i2v is False  # a still is its own first frame
    assert process(num_frames=5, do_i2v=True).datasets[0].do_i2v is True
    assert DatasetConfig(folder_path="x", num_frames=5).do_i2v is False  # the schema default stays


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_data_video import h264_or_mpeg4, write_clip

    folder = tmp_path_factory.mktemp("i2v-clips")
    for name, frames in (("a", 12), ("b", 9)):
        write_clip(folder / f"{name}.mp4", h264_or_mpeg4(), n=frames, fps=12, size=(64, 64))
        (folder / f"{name}.txt").write_text(f"a clip of colours {name}")
    return folder


@pytest.mark.parametrize("arch", ["wan21_i2v", "wan22_14b_i2v"])
def test_i2v_trains_on_clips_with_their_first_frames_without_do_i2v(
    models: Path, clips: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str
) -> None:
    from test_data_video_training import index_of

    from aitk.config.loader import load_job_file
    from aitk.models.wan import Wan21Adapter
    from aitk.trainer.loop import Trainer

    steps: list[dict[str, Any]] = []
    make_noisy_batch, predict = Wan21Adapter.make_noisy_batch, Wan21Adapter.predict

    def recording_batch(self: Any, latents: torch.Tensor, train_cfg: Any, generator: Any, context: Any = None) -> Any:
        steps.append({"latents": latents.detach().clone(), "first_frames": context.first_frames})
        return make_noisy_batch(self, latents, train_cfg, generator, context)

    def recording_predict(self: Any, batch: Any, cond: Any) -> torch.Tensor:
        def grab(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
            steps[-1]["hidden"] = kwargs["hidden_states"].detach().clone()

        handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in self.experts().values()]
        try:
            return predict(self, batch, cond)
        finally:
            for handle in handles:
                handle.remove()

    monkeypatch.setattr(Wan21Adapter, "make_noisy_batch", recording_batch)
    monkeypatch.setattr(Wan21Adapter, "predict", recording_predict)
    folder = build_tiny_model(VARIANTS[arch], models)
    process = deep_update(base_process(folder, clips, tmp_path / "out"), {
        "model": {"arch": arch},
        "train": {"steps": 2, "batch_size": 1},
        "datasets": [{"folder_path": str(clips), "resolution": [64], "num_frames": 5, "cache_latents": False}],
    })
    loaded = load_job_file(write_job(tmp_path / "i2v.yaml", "i2v", process))
    assert "do_i2v" not in (tmp_path / "i2v.yaml").read_text()
    result = Trainer(loaded.job, loaded.job.config.process[0]).run()
    assert result.state == "completed" and result.step == 2 and len(steps) == 2

    adapter = create_adapter(loaded.job.config.process[0].model, CPU, torch.float32)
    adapter.load()
    for step in steps:
        first, latents, hidden = step["first_frames"], step["latents"], step["hidden"]
        assert first is not None and first.shape == (1, 3, 64, 64)
        assert latents.shape[2] == 2  # 5 frames -> 2 latent frames: a clip, not a still
        assert index_of(first[0]) == 0  # the clip's own first frame (frame i has colour i)
        condition = hidden[:, latents.shape[1]:]  # what the transformer takes past the noisy latents
        assert condition[:, :4, 0].eq(1).all() and condition[:, :4, 1:].eq(0).all()  # the first frame is known
        torch.testing.assert_close(condition, adapter.i2v_condition(latents, first), atol=1e-5, rtol=1e-5)
        # WAN's causal VAE: the condition's first latent frame is the clip's own first latent frame
        torch.testing.assert_close(condition[:, 4:, 0], latents[:, :, 0], atol=1e-4, rtol=1e-4)
