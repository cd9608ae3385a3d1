"""train.attention_backend (and ai-toolkit's train.xformers) on tiny FLUX, WAN and SD 1.5 models:
the backend is set on the attention processors where it can run, "native" changes nothing, and
backends this CPU cannot run fall back to PyTorch SDPA with one line saying why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from aitk.config.schema import ModelConfig, TrainConfig
from aitk.models.attention import BACKEND_NAMES, FALLBACK, accepted_names, apply_attention_backend
from conftest import base_process, build_tiny_model, deep_update, write_job

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("attention-models")
    return {v: build_tiny_model(v, root) for v in ("dev", "t2v", "sd15")}


def _load(kind: str, folder: Path) -> Any:
    if kind == "flux":
        from aitk.models.flux import FluxAdapter as cls
    elif kind == "wan21":
        from aitk.models.wan import Wan21Adapter as cls
    else:
        from aitk.models.sd import SD15Adapter as cls
    adapter = cls(ModelConfig(name_or_path=str(folder), arch=kind), CPU, torch.float32)
    adapter.load()
    return adapter


@pytest.fixture(scope="module")
def flux(models: dict[str, Path]) -> Any:
    return _load("flux", models["dev"])


@pytest.fixture(scope="module")
def wan(models: dict[str, Path]) -> Any:
    return _load("wan21", models["t2v"])


@pytest.fixture(scope="module")
def sd15(models: dict[str, Path]) -> Any:
    return _load("sd1", models["sd15"])


def _backends(module: torch.nn.Module) -> set[Any]:
    """The dispatcher backend of every attention processor of `module`."""
    return {m.processor._attention_backend for m in module.modules()
            if hasattr(getattr(m, "processor", None), "_attention_backend")}


def _apply(adapter: Any, **train: Any) -> tuple[str, list[str]]:
    lines: list[str] = []
    return apply_attention_backend(adapter, TrainConfig(**train), lines.append), lines


def _predict(adapter: Any, seed: int = 0) -> torch.Tensor:
    """One denoiser prediction on a fixed random batch of the trainer's shapes."""
    torch.manual_seed(seed)
    batch, cond = adapter.example_batch(2, (64, 64), 1, expert="main", with_controls=False)
    with torch.no_grad():
        return adapter.predict(batch, cond)


def test_backend_names_are_diffusers_own() -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName

    assert set(BACKEND_NAMES) == {name.value for name in AttentionBackendName}
    assert accepted_names()[:2] == ("native", "sdpa")


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_transformers_get_the_backend_on_their_processors(kind: str, request: pytest.FixtureRequest) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    adapter = request.getfixturevalue(kind)
    denoiser = adapter.denoiser()
    default = _predict(adapter)
    assert _backends(denoiser) == {None}
    active = _AttentionBackendRegistry._active_backend
    try:
        runs, lines = _apply(adapter, attention_backend="_native_math")  # PyTorch's math kernel: runs on CPU
        assert runs == "_native_math" and _backends(denoiser) == {AttentionBackendName._NATIVE_MATH}
        assert len(lines) == 1 and "_native_math" in lines[0] and type(denoiser).__name__ in lines[0]
        torch.testing.assert_close(_predict(adapter), default, atol=1e-5, rtol=1e-4)
        assert _AttentionBackendRegistry._active_backend == active  # other models keep theirs

        runs, lines = _apply(adapter, attention_backend="NATIVE")
        assert runs == "native" and _backends(denoiser) == {AttentionBackendName.NATIVE}
        assert torch.equal(_predict(adapter), default)

        denoiser.reset_attention_backend()
        for name, library in (("flash", "flash-attn"), ("sage", "sageattention"), ("xformers", "xformers")):
            runs, lines = _apply(adapter, attention_backend=name)
            assert runs == "native" and _backends(denoiser) == {None}, name
            assert lines == [f"train.attention_backend {name}: {library} is not installed "
                             f"(pip install {library}); {FALLBACK}"]
            assert torch.equal(_predict(adapter), default)
    finally:
        denoiser.reset_attention_backend()


def test_a_cuda_only_kernel_on_cpu_says_so(flux: Any) -> None:
    runs, lines = _apply(flux, attention_backend="_native_cudnn")
    assert runs == "native" and _backends(flux.transformer) == {None}
    assert lines == [f"train.attention_backend _native_cudnn: it runs on a CUDA GPU only and this run is on cpu; "
                     f"{FALLBACK}"]
    # flex_attention's forward runs on CPU, but training needs its backward, which does not
    runs, lines = _apply(flux, attention_backend="flex")
    assert runs == "native" and _backends(flux.transformer) == {None}
    assert lines == [f"train.attention_backend flex: PyTorch's flex_attention has no backward pass on cpu "
                     f"(it trains on a CUDA GPU); {FALLBACK}"]


def test_sd15_unet_keeps_sdpa_and_says_why(sd15: Any) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    default = _predict(sd15)
    runs, lines = _apply(sd15, attention_backend="flash")
    assert runs == "native" and len(lines) == 1
    assert lines[0].startswith("train.attention_backend flash: UNet2DConditionModel's attention processors call "
                               "PyTorch SDPA directly") and lines[0].endswith(FALLBACK)
    # ai-toolkit's train.xformers reaches the UNet's own xformers switch, which needs the library
    runs, lines = _apply(sd15, xformers=True)
    assert runs == "native" and lines == [
        f"train.xformers: true: xformers is not installed (pip install xformers); {FALLBACK}"]
    processors = {type(p) for p in sd15.unet.attn_processors.values()}
    assert processors == {AttnProcessor2_0}
    runs, lines = _apply(sd15, attention_backend="sdpa")
    assert runs == "native" and lines == ["attention: PyTorch SDPA (native) in UNet2DConditionModel"]
    assert torch.equal(_predict(sd15), default)


def test_unknown_name_is_a_validate_error_listing_the_valid_ones(
    models: dict[str, Path], shapes_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from aitk.config.validate import validate_command

    process = deep_update(base_process(models["sd15"], shapes_dataset, tmp_path / "out"),
                          {"train": {"attention_backend": "flash2"}})
    assert validate_command([str(write_job(tmp_path / "bad.yaml", "bad", process))]) == 1
    err = capsys.readouterr().err
    assert "train.attention_backend" in err and "'flash2' is not an attention backend" in err
    assert "use one of native, sdpa, flash, sage, xformers, flex" in err

    good = deep_update(process, {"train": {"attention_backend": "flash", "xformers": True}})
    assert validate_command([str(write_job(tmp_path / "good.yaml", "good", good))]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "attention" not in out and "xformers" not in out  # no warning: both are used


def test_the_run_logs_what_attention_runs(make_job: Any) -> None:
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    job = make_job("attn", train={"steps": 1, "attention_backend": "sage"})
    loaded = load_job_file(job)
    result = Trainer(loaded.job, loaded.job.config.process[0]).run()
    assert result.state == "completed"
    log = (result.output_dir / "log.txt").read_text()
    assert "train.attention_backend sage: UNet2DConditionModel's attention processors" in log
    assert FALLBACK in log and "not supported" not in log
