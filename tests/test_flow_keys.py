"""Keys of ai-toolkit's own example files for flow-matching models: timestep_type flux_shift,
lumina2_shift, lognorm_blend and weighted (FLUX and WAN), sample.sample_start_step and
train.bypass_guidance_embedding, on tiny random-init models (CPU, fp32)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aitk.config.schema import ModelConfig, TrainConfig
from aitk.models.base import NoisyBatch, PromptEmbeds
from aitk.models.flow_matching import sample_sigmas
from aitk.models.flow_timestep_types import lognorm_blend_cdf, weighted_loss
from aitk.models.flux import FluxAdapter, FluxInputError, FluxKontextAdapter, image_seq_shift
from conftest import base_process, build_tiny_model, deep_update, write_job

CPU = torch.device("cpu")
N = 20000  # draws per distribution check: the empirical CDF is within ~0.01 of the true one


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow-key-models")
    return {v: build_tiny_model(v, root) for v in ("dev", "schnell", "kontext", "t2v")}


def _adapter(cls: Any, folder: Path, arch: str) -> Any:
    adapter = cls(ModelConfig(name_or_path=str(folder), arch=arch), CPU, torch.float32)
    adapter.load()
    return adapter


@pytest.fixture(scope="module")
def dev(models: dict[str, Path]) -> FluxAdapter:
    return _adapter(FluxAdapter, models["dev"], "flux")


@pytest.fixture(scope="module")
def wan(models: dict[str, Path]) -> Any:
    from aitk.models.wan import Wan21Adapter

    return _adapter(Wan21Adapter, models["t2v"], "wan21")


def _draw(kind: str, seed: int = 0, **kw: Any) -> torch.Tensor:
    return sample_sigmas(N, TrainConfig(timestep_type=kind), torch.Generator().manual_seed(seed), **kw).double()


def _ks(draws: torch.Tensor, cdf: Any) -> float:
    """Largest gap between the empirical CDF of `draws` and `cdf` (Kolmogorov-Smirnov statistic)."""
    s, _ = torch.sort(draws.double())
    n = s.numel()
    ref = cdf(s)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - ref
    below = ref - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(above, below).max())


# --- flux_shift / lumina2_shift -----------------------------------------------------------------


def test_flux_shift_and_lumina2_shift_follow_the_time_shift_formula(dev: FluxAdapter) -> None:
    config = dev.scheduler_config
    for tokens in (16, 1024, 4096):  # 128, 512 and 1024 px images
        mu = image_seq_shift(tokens, config)
        s = math.exp(mu)
        # sigma = e^mu / (e^mu + 1/u - 1) for u ~ U(0, 1): CDF sigma / (s - (s - 1) sigma),
        # mean s / (s - 1) - s ln(s) / (s - 1)^2
        mean = s / (s - 1) - s * math.log(s) / (s - 1) ** 2
        flux_shift = _draw("flux_shift", mu=mu)
        assert _ks(flux_shift, lambda x: x / (s - (s - 1) * x)) < 0.012, tokens
        assert abs(flux_shift.mean().item() - mean) < 0.006, (tokens, flux_shift.mean(), mean)
        # ai-toolkit draws the three the same way
        assert torch.equal(_draw("lumina2_shift", mu=mu), flux_shift)
        assert torch.equal(_draw("shift", mu=mu), flux_shift)
    assert image_seq_shift(16, config) < image_seq_shift(1024, config) < image_seq_shift(4096, config)


def test_flux_shift_depends_on_the_image_size_on_flux_and_not_on_wan(dev: FluxAdapter, wan: Any) -> None:
    timesteps = []
    for side in (4, 64, 128):  # latents of 32, 512 and 1024 px images: 4, 1024 and 4096 tokens
        cfg = TrainConfig(timestep_type="flux_shift")
        batch = dev.make_noisy_batch(torch.zeros(32, 16, side, side), cfg, torch.Generator().manual_seed(3))
        mu = image_seq_shift((side // 2) ** 2, dev.scheduler_config)
        want = sample_sigmas(32, cfg, torch.Generator().manual_seed(3), mu=mu) * 1000
        torch.testing.assert_close(batch.timesteps, want)
        timesteps.append(batch.timesteps)
    # the same draws, shifted further to high noise as the token count grows
    assert (timesteps[0] < timesteps[1]).all() and (timesteps[1] < timesteps[2]).all()
    assert timesteps[2].mean() > timesteps[0].mean() + 50
    # WAN's scheduler has no resolution-dependent shift: both are its fixed flow shift at any size
    s = wan.flow_shift
    for count, side in ((N, 2), (64, 16)):
        def draw(kind: str) -> torch.Tensor:
            return wan.make_noisy_batch(torch.zeros(count, 16, 1, side, side), TrainConfig(timestep_type=kind),
                                        torch.Generator().manual_seed(3)).timesteps

        shifted = draw("shift")
        assert torch.equal(draw("flux_shift"), shifted) and torch.equal(draw("lumina2_shift"), shifted)
        if count == N:  # the fixed shift's CDF
            assert _ks(shifted.double() / 1000, lambda x: x / (s - (s - 1) * x)) < 0.012


# --- lognorm_blend ------------------------------------------------------------------------------


def test_lognorm_blend_is_three_quarters_lognorm_one_quarter_uniform(wan: Any) -> None:
    blend = _draw("lognorm_blend")
    assert _ks(blend, lognorm_blend_cdf) < 0.012
    # mean: 3/4 of lognorm's (1 - E[exp(z/3)] / e = 1 - exp(1/18 - 1)) plus 1/4 of uniform's 0.5
    mean = 0.75 * (1 - math.exp(1 / 18 - 1)) + 0.25 * 0.5
    assert abs(blend.mean().item() - mean) < 0.006
    lognorm = _draw("lognorm")
    assert (blend < 0.2).float().mean() > (lognorm < 0.2).float().mean() + 0.03  # the uniform share
    # WAN draws the same distribution through its exact-range sampler
    t = wan.make_noisy_batch(torch.zeros(N, 16, 1, 2, 2), TrainConfig(timestep_type="lognorm_blend"),
                             torch.Generator().manual_seed(0)).timesteps
    assert _ks(t.double() / 1000, lognorm_blend_cdf) < 0.012
    bounded = wan.make_noisy_batch(
        torch.zeros(4000, 16, 1, 2, 2),
        TrainConfig(timestep_type="lognorm_blend", min_denoising_steps=100, max_denoising_steps=299),
        torch.Generator().manual_seed(0)).timesteps
    assert bounded.min() >= 100 and bounded.max() <= 300 and bounded.std() > 30


# --- weighted -----------------------------------------------------------------------------------


def test_weighted_draws_uniform_sigmas_and_weights_each_loss(dev: FluxAdapter, wan: Any) -> None:
    grid = torch.linspace(0, 1, 100001, dtype=torch.float64)
    w = weighted_loss(grid).double()
    assert abs(w.mean().item() - 1.0) < 1e-3  # mean 1 over uniform sigmas: the loss keeps its scale
    assert 0.85 < grid[w.argmax()].item() < 0.9 and 1.45 < w.max().item() < 1.55
    assert w[0].item() == pytest.approx(w[-1].item()) and 0.6 < w[0].item() < 0.7
    cfg = TrainConfig(timestep_type="weighted")
    flux = dev.make_noisy_batch(torch.zeros(N, 16, 2, 2), cfg, torch.Generator().manual_seed(1))
    video = wan.make_noisy_batch(torch.zeros(N, 16, 1, 2, 2), cfg, torch.Generator().manual_seed(1))
    for batch in (flux, video):
        sigma = batch.timesteps.double() / 1000
        assert _ks(sigma, lambda x: x) < 0.012  # uniform, like linear
        assert batch.loss_weights is not None
        torch.testing.assert_close(batch.loss_weights, weighted_loss(sigma), atol=1e-4, rtol=1e-4)
        assert abs(batch.loss_weights.mean().item() - 1.0) < 0.01
    assert dev.make_noisy_batch(torch.zeros(2, 16, 2, 2), TrainConfig(timestep_type="linear"), None).loss_weights is None


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Kontext data: a grey outline (control) and the same shape filled with colour (target)."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("kontext-pairs")
    folder, controls = root / "pairs", root / "controls"
    folder.mkdir()
    controls.mkdir()
    for i, (name, rgb) in enumerate([("red", (220, 40, 40)), ("blue", (50, 80, 220))]):
        box = (12 + 4 * i, 12, 52 - 4 * i, 52)
        target = Image.new("RGB", (64, 64), (128, 128, 128))
        ImageDraw.Draw(target).ellipse(box, fill=rgb)
        control = Image.new("RGB", (64, 64), (128, 128, 128))
        ImageDraw.Draw(control).ellipse(box, outline=(20, 20, 20), width=3)
        target.save(folder / f"{name}.png")
        control.save(controls / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"fill the circle with {name}")
    return folder, controls


def _run(job: Path) -> Any:
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    loaded = load_job_file(job)
    return Trainer(loaded.job, loaded.job.config.process[0]).run()


def test_kontext_trains_three_weighted_steps(
    models: dict[str, Path], pairs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    batches: list[NoisyBatch] = []
    make = FluxKontextAdapter.make_noisy_batch

    def recording(self: Any, *args: Any, **kwargs: Any) -> NoisyBatch:
        batches.append(make(self, *args, **kwargs))
        return batches[-1]

    monkeypatch.setattr(FluxKontextAdapter, "make_noisy_batch", recording)
    data, controls = pairs
    process = deep_update(base_process(models["kontext"], data, tmp_path / "out"), {
        "model": {"name_or_path": str(models["kontext"]), "arch": "flux_kontext"},
        "train": {"steps": 3, "timestep_type": "weighted", "noise_scheduler": "flowmatch"},
    })
    process["datasets"][0]["control_path"] = str(controls)
    result = _run(write_job(tmp_path / "kontext.yaml", "kontext", process))
    assert result.state == "completed" and result.step == 3
    losses = [json.loads(line)["loss"] for line in
              (result.output_dir / "metrics_kontext.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert len(batches) == 3
    for batch in batches:
        torch.testing.assert_close(batch.loss_weights, weighted_loss(batch.timesteps / 1000), atol=1e-4, rtol=1e-4)
    lora = load_file(str(result.final_lora))
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # it trained


# --- sample_start_step --------------------------------------------------------------------------


def test_sample_start_step_holds_periodic_previews_back(make_job: Any) -> None:
    job = make_job("late", train={"steps": 6}, sample={
        "sample_every": 2, "sample_start_step": 4, "width": 64, "height": 64, "sample_steps": 1,
        "prompts": ["a [trigger] shape"], "seed": 1,
    })
    result = _run(job)
    assert result.state == "completed"
    names = sorted(p.name for p in (result.output_dir / "samples").iterdir())
    # as in ai-toolkit: the baseline before training (skip_first_sample) and the final preview stay
    assert names == ["000000000_0.jpg", "000000004_0.jpg", "000000006_0.jpg"]


# --- bypass_guidance_embedding ------------------------------------------------------------------


def _conditioning(adapter: FluxAdapter, batch: NoisyBatch, cond: PromptEmbeds) -> tuple[dict[str, Any], torch.Tensor]:
    """What the transformer's time-text embedding receives and returns, and the prediction."""
    seen: dict[str, Any] = {}
    embed = adapter.transformer.time_text_embed

    def hook(_module: Any, args: tuple[Any, ...], output: torch.Tensor) -> None:
        seen.update(timestep=args[0], guidance=args[1], pooled=args[2], output=output)

    handle = embed.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = adapter.predict(batch, cond)
    finally:
        handle.remove()
    return seen, out


def test_bypass_guidance_embedding_leaves_guidance_out_of_the_conditioning(dev: FluxAdapter) -> None:
    latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = dev.encode_prompts(["a", "b"])
    plain = dev.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(4))
    bypassed = dev.make_noisy_batch(latents, TrainConfig(bypass_guidance_embedding=True), torch.Generator().manual_seed(4))
    assert torch.equal(plain.noisy_latents, bypassed.noisy_latents) and bypassed.extra["bypass_guidance"]
    seen_plain, out_plain = _conditioning(dev, plain, cond)
    seen_bypass, out_bypass = _conditioning(dev, bypassed, cond)
    embed = dev.transformer.time_text_embed
    with torch.no_grad():
        time_and_text = (embed.timestep_embedder(embed.time_proj(seen_bypass["timestep"]))
                         + embed.text_embedder(seen_bypass["pooled"]))
        guidance = embed.guidance_embedder(embed.time_proj(seen_plain["guidance"]))
    torch.testing.assert_close(seen_bypass["output"], time_and_text)  # timestep + pooled text only
    torch.testing.assert_close(seen_plain["output"], time_and_text + guidance)
    assert guidance.abs().max() > 1e-3 and not torch.allclose(out_plain, out_bypass)
    # the bypass lasts one prediction: the next plain one is as before
    assert torch.equal(_conditioning(dev, plain, cond)[1], out_plain)
    # and the guidance embedder gets no gradient from a bypassed step (the timestep embedder does)
    embed.requires_grad_(True)
    try:
        dev.predict(bypassed, cond).square().mean().backward()
        assert all(p.grad is None for p in embed.guidance_embedder.parameters())
        assert all(p.grad is not None and p.grad.any() for p in embed.timestep_embedder.parameters())
    finally:
        embed.requires_grad_(False)
        dev.transformer.zero_grad(set_to_none=True)


def test_bypass_guidance_embedding_needs_a_guidance_embedding(
    models: dict[str, Path], shapes_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from aitk.config.validate import validate_command

    schnell = _adapter(FluxAdapter, models["schnell"], "flux")
    with pytest.raises(FluxInputError, match="no guidance embedding .*guidance_embeds is false"):
        schnell.make_noisy_batch(torch.zeros(1, 16, 2, 2), TrainConfig(bypass_guidance_embedding=True), None)
    # a run stops right after loading, before the first preview is drawn
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer, TrainingAborted

    process = deep_update(base_process(models["schnell"], shapes_dataset, tmp_path / "run"),
                          {"model": {"arch": "flux"}, "train": {"bypass_guidance_embedding": True}})
    loaded = load_job_file(write_job(tmp_path / "schnell.yaml", "schnell_bypass", process))
    with pytest.raises(TrainingAborted, match="no guidance embedding"):
        Trainer(loaded.job, loaded.job.config.process[0]).run()
    assert not list((tmp_path / "run").rglob("*.jpg"))  # no preview was drawn
    for arch, model in (("wan21", models["t2v"]), ("sd1", models["t2v"])):
        process = deep_update(base_process(model, shapes_dataset, tmp_path / "out"),
                              {"model": {"arch": arch}, "train": {"bypass_guidance_embedding": True}})
        assert validate_command([str(write_job(tmp_path / f"{arch}.yaml", arch, process))]) == 1
        err = capsys.readouterr().err
        assert "train.bypass_guidance_embedding: bypass_guidance_embedding on a model without a guidance " in err
        assert "model.arch flux / flux_kontext" in err


# --- validate -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,train", [
    ("flux", {"timestep_type": "flux_shift", "bypass_guidance_embedding": True, "attention_backend": "flash"}),
    ("flux_kontext", {"timestep_type": "weighted", "xformers": True}),
    ("flux", {"timestep_type": "lognorm_blend"}),
    ("wan21", {"timestep_type": "lumina2_shift"}),
    ("wan22_14b", {"timestep_type": "weighted", "attention_backend": "sage"}),
])
def test_validate_is_clean_for_these_keys(
    arch: str, train: dict[str, Any], tmp_path: Path, shapes_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from aitk.config.validate import validate_command

    process = deep_update(base_process(tmp_path / "model", shapes_dataset, tmp_path / "out"), {
        "model": {"arch": arch}, "train": {"noise_scheduler": "flowmatch", **train},
        "sample": {"sample_every": 250, "sample_start_step": 500, "prompts": ["a shape"]},
    })
    if arch == "flux_kontext":  # an edit model's previews start from a control image
        image = next(p for p in sorted(shapes_dataset.iterdir()) if p.suffix in (".png", ".jpg"))
        process["sample"]["prompts"] = [f"a shape --ctrl_img {image}"]
    assert validate_command([str(write_job(tmp_path / "job.yaml", "job", process))]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0] == f"OK {tmp_path / 'job.yaml'}" and "warning" not in out.out + out.err
