"""train.timestep_type and train.noise_scheduler on the DDPM models (SD 1.x / 2.x, SDXL).

Distributions are checked on timesteps drawn by the real SD 1.5 adapter's make_noisy_batch (tiny
model, seeded) against each type's CDF written out here, by a Kolmogorov-Smirnov distance.
"""

from __future__ import annotations

import json
import math
import sys
import typing
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import base_process, build_tiny_model, deep_update, write_job  # noqa: E402

from aitk.config.schema import ModelConfig, TrainConfig  # noqa: E402
from aitk.models.archs import DDPM_NOISE_SCHEDULERS, DDPM_TIMESTEP_TYPES, NOISE_SCHEDULERS, TIMESTEP_TYPES  # noqa: E402
from aitk.models.sd.timesteps import DDPMTimestepError  # noqa: E402
from aitk.models.sd import SD15Adapter  # noqa: E402

DRAWS = 4000
# KS distance allowed: the 0.1 % critical value for DRAWS samples plus the integer rounding of t
KS_LIMIT = 1.95 / math.sqrt(DRAWS) + 1e-3


def _ndtr(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _lognorm_cdf(x: float) -> float:
    # P(1 - exp(-z / 3) / e <= x), z ~ N(0, 1), clamped at 0
    return 1.0 if x >= 1.0 else _ndtr(-3.0 * (1.0 + math.log1p(-x)))


# Each type's CDF of the noise fraction f = t / 1000, written from its definition (docs/job-file.md)
CDF: dict[str, typing.Callable[[float], float]] = {
    "uniform": lambda x: x,
    "linear": lambda x: x,
    "sigmoid": lambda x: 0.0 if x <= 0 else 1.0 if x >= 1 else _ndtr(math.log(x / (1.0 - x))),
    "shift": lambda x: x / (3.0 - 2.0 * x),  # inverse of 3u / (1 + 2u)
    "lognorm": _lognorm_cdf,
    "lognorm_blend": lambda x: 0.75 * _lognorm_cdf(x) + 0.25 * x,
}


@pytest.fixture(scope="module")
def adapter(tiny_sd15: Path) -> SD15Adapter:
    sd = SD15Adapter(ModelConfig(name_or_path=str(tiny_sd15)), torch.device("cpu"), torch.float32)
    sd.load()
    return sd


@pytest.fixture(scope="module")
def many_latents() -> torch.Tensor:
    return torch.randn(DRAWS, 4, 1, 1)


def draw(adapter: SD15Adapter, latents: torch.Tensor, seed: int = 0, **train: typing.Any) -> torch.Tensor:
    batch = adapter.make_noisy_batch(latents, TrainConfig(**train), torch.Generator().manual_seed(seed))
    return batch.timesteps


def ks_distance(timesteps: torch.Tensor, cdf: typing.Callable[[float], float]) -> float:
    """Largest gap between the empirical CDF of t and `cdf` over the 1000 integer timesteps."""
    counts = torch.bincount(timesteps, minlength=1000).cumsum(0).double() / len(timesteps)
    return max(abs(float(counts[t]) - cdf((t + 1) / 1000.0)) for t in range(1000))


@pytest.mark.parametrize("kind", list(CDF))
def test_each_timestep_type_draws_its_distribution(adapter, many_latents, kind: str) -> None:
    t = draw(adapter, many_latents, timestep_type=kind)
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= 999
    distance = ks_distance(t, CDF[kind])
    assert distance < KS_LIMIT, (kind, distance)
    # and not the uniform draw (a wrong shape fails the line above; this shows the test can tell)
    if kind not in ("uniform", "linear"):
        assert ks_distance(t, CDF["uniform"]) > 3 * KS_LIMIT, kind


def test_the_shapes_differ_where_they_should(adapter, many_latents) -> None:
    stats = {}
    for kind in CDF:
        t = draw(adapter, many_latents, timestep_type=kind).double()
        middle = float(((t >= 250) & (t < 750)).double().mean())
        ends = float(((t < 100) | (t >= 900)).double().mean())
        stats[kind] = (float(t.mean()), middle, ends)
    assert abs(stats["uniform"][0] - 499.5) < 15 and abs(stats["uniform"][1] - 0.5) < 0.03
    # sigmoid: logit-normal, 73 % in the middle half, few at either end
    assert abs(stats["sigmoid"][0] - 499.5) < 15 and stats["sigmoid"][1] > 0.7 and stats["sigmoid"][2] < 0.06
    # shift 3: three quarters of the draws above t = 500, mean near 676
    assert abs(stats["shift"][0] - 675.6) < 15
    # lognorm leans to mid-high noise (mean about 610) with almost nothing below t = 100
    assert abs(stats["lognorm"][0] - 610) < 15 and stats["lognorm"][2] < stats["sigmoid"][2]
    # the blend keeps a quarter uniform, so it reaches the ends more often than lognorm
    assert stats["lognorm"][2] < stats["lognorm_blend"][2] < stats["uniform"][2]


def test_unset_is_the_uniform_draw_and_draws_are_reproducible(adapter, many_latents) -> None:
    unset = draw(adapter, many_latents, seed=5)
    assert torch.equal(unset, draw(adapter, many_latents, seed=5, timestep_type="uniform"))
    assert torch.equal(unset, draw(adapter, many_latents, seed=5, timestep_type="linear"))
    assert not torch.equal(unset, draw(adapter, many_latents, seed=6))
    sigmoid = draw(adapter, many_latents, seed=5, timestep_type="sigmoid")
    assert torch.equal(sigmoid, draw(adapter, many_latents, seed=5, timestep_type="sigmoid"))


@pytest.mark.parametrize("kind", list(CDF))
def test_content_or_style_bends_every_type(adapter, many_latents, kind: str) -> None:
    means = {
        bias: float(draw(adapter, many_latents, timestep_type=kind, content_or_style=bias).double().mean())
        for bias in ("balanced", "content", "style")
    }
    assert means["style"] + 100 < means["balanced"] < means["content"] - 100, means
    if kind == "uniform":  # 1 - u^3 has mean 3/4, u^3 a quarter
        assert abs(means["content"] - 749.5) < 15 and abs(means["style"] - 249.5) < 15, means


@pytest.mark.parametrize("kind", list(CDF))
def test_denoising_range_bounds_every_type(adapter, many_latents, kind: str) -> None:
    t = draw(adapter, many_latents, timestep_type=kind, min_denoising_steps=200, max_denoising_steps=399)
    assert int(t.min()) >= 200 and int(t.max()) <= 399
    assert len(t.unique()) > 150  # the whole range is used, not a corner of it
    single = draw(adapter, many_latents[:8], timestep_type=kind, min_denoising_steps=500, max_denoising_steps=500)
    assert single.tolist() == [500] * 8


def test_noisy_latents_follow_the_drawn_timesteps(adapter) -> None:
    latents = torch.randn(6, 4, 8, 8)
    batch = adapter.make_noisy_batch(latents, TrainConfig(timestep_type="sigmoid"), torch.Generator().manual_seed(1))
    ab = adapter.noise_scheduler.alphas_cumprod[batch.timesteps].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(batch.noisy_latents, ab.sqrt() * latents + (1 - ab).sqrt() * batch.target)


def test_the_adapter_refuses_types_ddpm_cannot_draw(adapter, many_latents) -> None:
    with pytest.raises(DDPMTimestepError, match=r"train.timestep_type: 'weighted' .*Stable Diffusion.*sigmoid"):
        draw(adapter, many_latents[:2], timestep_type="weighted")


def test_the_arch_table_matches_the_schema_and_the_adapters() -> None:
    from aitk.models.registry import adapter_class

    timestep_literal = typing.get_args(typing.get_args(TrainConfig.model_fields["timestep_type"].annotation)[0])
    assert set(DDPM_TIMESTEP_TYPES) <= set(timestep_literal)
    for arch, names in NOISE_SCHEDULERS.items():
        is_ddpm = adapter_class(arch).trains_ddpm
        assert (names == DDPM_NOISE_SCHEDULERS) == is_ddpm, arch
        assert (TIMESTEP_TYPES.get(arch) == DDPM_TIMESTEP_TYPES) == is_ddpm, arch


# --- aitk validate and the run ---------------------------------------------------------------------


def _validate(tmp_path: Path, capsys, arch: str | None, **train: typing.Any) -> tuple[int, str]:
    from aitk.config.validate import validate_command

    process = base_process(Path("some/model"), tmp_path, tmp_path / "out")
    process["train"].update(train)
    if arch:
        process["model"]["arch"] = arch
    path = write_job(tmp_path / "job.yaml", "job", process)
    code = validate_command([str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize(
    "arch, train, refused_key, names",
    [
        (None, {"noise_scheduler": "flowmatch"}, "train.noise_scheduler", "ddpm, ddim, pndm, lms, euler, euler_a"),
        ("sdxl", {"noise_scheduler": "flowmatch"}, "train.noise_scheduler", "ddpm, ddim, pndm"),
        ("flux", {"noise_scheduler": "ddpm"}, "train.noise_scheduler", "use flowmatch"),
        ("wan21", {"noise_scheduler": "euler_a"}, "train.noise_scheduler", "use flowmatch"),
        (None, {"timestep_type": "weighted"}, "train.timestep_type",
         "uniform, linear, sigmoid, shift, lognorm, lognorm_blend"),
        ("sdxl", {"timestep_type": "Weighted"}, "train.timestep_type", "lognorm_blend"),
    ],
)
def test_validate_refuses_what_the_model_cannot_use(tmp_path, capsys, arch, train, refused_key, names) -> None:
    code, text = _validate(tmp_path, capsys, arch, **train)
    assert code == 1
    assert f"config.process[0].{refused_key}:" in text and "the run fails at start" in text
    assert names in text, text


def test_validate_accepts_the_ddpm_names_and_types(tmp_path, capsys) -> None:
    for scheduler in DDPM_NOISE_SCHEDULERS:
        for kind in ("sigmoid", "lognorm_blend"):
            code, text = _validate(tmp_path, capsys, "sdxl", noise_scheduler=scheduler.upper(), timestep_type=kind)
            assert code == 0 and "OK " in text, text
    code, text = _validate(tmp_path, capsys, "flux", noise_scheduler="flowmatch")
    assert code == 0, text
    code, text = _validate(tmp_path, capsys, "flux")  # unset: the model's own schedule
    assert code == 0, text


def test_an_unknown_timestep_type_names_the_valid_ones(tmp_path, capsys) -> None:
    code, text = _validate(tmp_path, capsys, None, timestep_type="cosine")
    assert code == 1
    assert "config.process[0].train.timestep_type:" in text
    assert all(name in text for name in ("sigmoid", "linear", "lognorm_blend")), text


def test_the_run_refuses_flowmatch_on_sd_before_loading(make_job) -> None:
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer, TrainingAborted

    loaded = load_job_file(make_job("flow", train={"noise_scheduler": "flowmatch"}))
    with pytest.raises(TrainingAborted, match=r"train\.noise_scheduler: .*use one of ddpm"):
        Trainer(loaded.job, loaded.job.config.process[0]).run()


def test_sdxl_trains_three_steps_with_sigmoid_timesteps(tmp_path_factory, shapes_dataset, monkeypatch) -> None:
    from aitk.config.loader import load_job_file
    from aitk.models.sd import timesteps as ddpm_timesteps
    from aitk.trainer.loop import Trainer

    drawn: list[tuple[str, torch.Tensor]] = []
    original = ddpm_timesteps.fraction

    def spy(kind: str, u: torch.Tensor) -> torch.Tensor:
        drawn.append((kind, u.clone()))
        return original(kind, u)

    monkeypatch.setattr(ddpm_timesteps, "fraction", spy)
    root = tmp_path_factory.mktemp("sdxl_sigmoid")
    model = build_tiny_model("sdxl", tmp_path_factory.mktemp("models"))
    process = deep_update(
        base_process(model, shapes_dataset, root / "out"),
        {"model": {"arch": "sdxl"}, "train": {"steps": 3, "timestep_type": "sigmoid", "noise_scheduler": "euler_a"}},
    )
    loaded = load_job_file(write_job(root / "job.yaml", "xl", process))
    result = Trainer(loaded.job, loaded.job.config.process[0]).run()
    assert result.state == "completed" and result.step == 3
    losses = [json.loads(line)["loss"] for line in (result.output_dir / "metrics_xl.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert [kind for kind, _ in drawn] == ["sigmoid"] * 3 and all(len(u) == 2 for _, u in drawn)
    assert result.final_lora is not None and result.final_lora.is_file()
