"""Every speed switch leaves training as it was: the losses of 20 steps on the tiny SD 1.5 model
match the run without it within float tolerance (train.compile included, on the CPU), and a
resumed run with the switch on ends where the straight one does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

STEPS = 20


def losses_of(job: Path) -> list[float]:
    import yaml

    raw = yaml.safe_load(job.read_text())
    name = raw["config"]["name"]
    run = Path(raw["config"]["process"][0]["training_folder"]) / name
    return [json.loads(line)["loss"] for line in (run / f"metrics_{name}.jsonl").read_text().splitlines()]


def train(job: Path, **kwargs: Any) -> Any:
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    loaded = load_job_file(job)
    trainer = Trainer(loaded.job, loaded.job.config.process[0], **kwargs)
    return trainer, trainer.run()


@pytest.fixture(scope="module")
def baseline(tiny_sd15: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    from conftest import base_process, write_job

    folder = tmp_path_factory.mktemp("speed_base")
    process = base_process(tiny_sd15, shapes_dataset, folder / "out")
    process["train"] |= {"steps": STEPS}
    job = write_job(folder / "base.yaml", "base", process)
    train(job)
    return losses_of(job)


@pytest.mark.parametrize("switch", [
    {"train": {"channels_last": True}},
    {"train": {"optimizer_params": {"fused": False}}},  # AdamW's per-tensor loop (fused is the default)
    {"train": {"allow_tf32": False}},  # no TF32 on a CPU: the same run, the switch is accepted
])
def test_a_speed_switch_keeps_the_losses(make_job, baseline, switch):
    job = make_job("switched", train={"steps": STEPS, **switch["train"]})
    train(job)
    switched = losses_of(job)
    assert len(switched) == STEPS
    assert switched == pytest.approx(baseline, rel=1e-4, abs=1e-5)


def test_compiled_blocks_train_like_eager_and_resume_identically(make_job):
    """SGD: compiled and eager gradients agree to float precision (~1e-8), and SGD passes that on
    as is. (Adam divides each gradient by its own running size, so on a LoRA's first steps, where
    the zero-initialised up weights make the down weights' gradients tiny, the same float noise
    moves the losses by ~1e-4: no test of equality can tell that from a bug.)"""
    sgd = {"steps": STEPS, "optimizer": "sgd", "lr": 0.05}
    eager = make_job("eager_sgd", train=sgd)
    train(eager)
    job = make_job("compiled", train={**sgd, "compile": True}, save={"save_every": 10})

    def stop_at_10(trainer, step):
        if step == 10:
            trainer.stop.request("test")

    trainer, result = train(job, on_step_end=stop_at_10)
    assert result.state == "stopped"
    blocks = trainer.adapter.offload_blocks(trainer.adapter.denoiser())
    assert blocks and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    _, result = train(job)  # resumed from step 10, compiled again
    assert result.state == "completed"
    assert losses_of(job) == pytest.approx(losses_of(eager), rel=1e-4, abs=1e-5)  # 20 steps of fp32 drift
    log = (result.output_dir / "log.txt").read_text()
    assert f"{len(blocks)} blocks of UNet2DConditionModel compile during the first step" in log
    assert "train.compile: the first step took" in log


def test_compile_with_layer_offloading_is_refused_before_loading(make_job, capsys):
    from aitk.config.validate import validate_command

    job = make_job("compile_offload", train={"compile": True}, model={"layer_offloading": True})
    assert validate_command([str(job)], strict=False) != 0
    assert "train.compile with model.layer_offloading" in capsys.readouterr().err


def test_bf16_autocast_trains_fp32_master_weights(make_job, baseline):
    """train.dtype bf16: the frozen base is stored in bf16 and the forward runs in bf16 autocast,
    while the LoRA (the trained weights and their optimizer state) stays fp32; the losses follow
    the fp32 run within bf16's precision (8 bits of mantissa)."""
    job = make_job("bf16", train={"steps": STEPS, "dtype": "bf16"})
    trainer, result = train(job)
    assert result.state == "completed"
    assert trainer.session.mixed_precision == "bf16"
    unet = trainer.adapter.denoiser()
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert trainer.params and all(p.dtype == torch.float32 for p in trainer.params)
    moments = [s["exp_avg"] for s in trainer.optimizer.state.values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    losses = losses_of(job)
    assert len(losses) == STEPS and losses != baseline  # really ran in bf16
    assert losses == pytest.approx(baseline, rel=0.05)
