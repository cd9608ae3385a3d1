"""train.dtype fp16: autocast with GradScaler loss scaling, fp32 master weights, overflow skips.

The session turns fp16 into fp32 on the CPU (aitk.trainer.session), so these tests give the trainer
the session a GPU run gets (fp16 weights, autocast fp16, a GradScaler). torch 2.13 runs every op
of the tiny SD 1.5 in fp16 on the CPU under autocast, so the loop's whole fp16 path runs here:
scaled backward, unscale, the scaler's skip of an overflowing update, the scale's back-off. What
it cannot show is the speed or the numerics of CUDA's fp16 kernels.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aitk.config.loader import load_job_file
from aitk.trainer.loop import Trainer

INIT_SCALE = 2.0**16  # GradScaler's default first scale


@pytest.fixture
def fp16_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every run with the session of an fp16 GPU run, on the CPU."""
    from aitk.trainer import session, setup

    real = session.start_session

    def fp16(process):  # noqa: ANN001, ANN202 - the patched function's own signature
        started = real(process)
        notes = [note for note in started.notes if "fp16" not in note]
        return dataclasses.replace(started, weight_dtype=torch.float16, mixed_precision="fp16", notes=notes)

    monkeypatch.setattr(setup, "start_session", fp16)


@pytest.fixture
def unscale_spy(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The ratio of one gradient element before / after each GradScaler.unscale_ (= the scale
    the backward ran with)."""
    ratios: list[float] = []
    real = torch.amp.GradScaler.unscale_

    def spying(self: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grad = max(grads, key=lambda g: float(g.abs().max()))
        index = int(grad.abs().argmax())
        before = float(grad.reshape(-1)[index])
        real(self, optimizer)
        after = float(grad.reshape(-1)[index])
        ratios.append(before / after if after != 0 and math.isfinite(after) else math.nan)

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", spying)
    return ratios


def _run(job_path: Path, **kwargs) -> tuple[Trainer, object]:
    loaded = load_job_file(job_path)
    trainer = Trainer(loaded.job, loaded.job.config.process[0], **kwargs)
    return trainer, trainer.run()


def _metrics(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"metrics_{name}.jsonl").read_text().splitlines()]


def test_fp16_steps_scale_the_loss_and_keep_fp32_master_weights(
    fp16_session, unscale_spy, make_job, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aitk.models.sd import SD15Adapter

    seen: dict[str, object] = {}
    predictions: list[torch.dtype] = []
    real_predict = SD15Adapter.predict

    def predict(self, batch, cond):  # noqa: ANN001, ANN202
        out = real_predict(self, batch, cond)
        predictions.append(out.dtype)
        return out

    monkeypatch.setattr(SD15Adapter, "predict", predict)

    def look(trainer: Trainer, step: int) -> None:
        if step == 1:
            unet = trainer.adapter.denoiser()
            seen["precision"] = trainer.session.mixed_precision
            seen["base"] = {p.dtype for n, p in unet.named_parameters() if "lora_" not in n}
            seen["network"] = {p.dtype for p in trainer.params}
            seen["scaler"] = trainer.grad_scaler

    job = make_job("fp16", train={"steps": 4, "dtype": "fp16", "lr": 1e-3})
    trainer, result = _run(job, on_step_end=look)

    assert result.state == "completed" and result.step == 4
    assert seen["precision"] == "fp16"
    assert seen["base"] == {torch.float16}  # the frozen UNet is stored in fp16
    assert seen["network"] == {torch.float32}  # the LoRA trains as fp32 master weights
    assert isinstance(seen["scaler"], torch.amp.GradScaler) and seen["scaler"].is_enabled()
    assert predictions == [torch.float16] * 4  # the UNet ran in fp16 (autocast)
    # every backward ran on the loss times the scale, and unscale_ divided it out again
    assert len(unscale_spy) == 4 and all(r == pytest.approx(INIT_SCALE, rel=1e-3) for r in unscale_spy), unscale_spy
    metrics = _metrics(result.output_dir, "fp16")
    assert all(math.isfinite(m["loss"]) and m["grad_norm"] is not None for m in metrics)
    assert [m["loss_scale"] for m in metrics] == [INIT_SCALE] * 4
    assert not any(m["update_skipped"] for m in metrics)
    lora = load_file(str(result.final_lora))
    assert any(k.endswith("lora_up.weight") and bool(v.abs().max() > 0) for k, v in lora.items())  # it trained
    newest = max((result.output_dir / "checkpoints").iterdir())
    assert torch.load(newest / "grad_scaler.pt")["scale"] == INIT_SCALE  # a resume continues the scale


def test_an_overflowing_fp16_step_is_skipped_counted_and_training_goes_on(fp16_session, make_job) -> None:
    overflow_at = 2  # 0-based step whose gradient is made inf
    snapshots: dict[int, list[torch.Tensor]] = {}

    def look(trainer: Trainer, step: int) -> None:
        snapshots[step] = [p.detach().clone() for p in trainer.params]
        if step == overflow_at:  # the next backward gives one gradient inf, once
            param = trainer.params[-1]
            fired: list[bool] = []

            def inf_once(grad: torch.Tensor) -> torch.Tensor:
                if fired:
                    return grad
                fired.append(True)
                return torch.full_like(grad, math.inf)

            param.register_hook(inf_once)

    job = make_job("overflow", train={"steps": 6, "dtype": "fp16", "lr": 1e-3})
    trainer, result = _run(job, on_step_end=look)

    assert result.state == "completed" and result.step == 6  # the overflow did not stop the run
    same = [torch.equal(a, b) for a, b in zip(snapshots[overflow_at], snapshots[overflow_at + 1])]
    assert all(same)  # the overflowing step changed no weight
    for step in (overflow_at, overflow_at + 2):  # the steps around it did train
        assert not all(torch.equal(a, b) for a, b in zip(snapshots[step - 1], snapshots[step]))
    metrics = _metrics(result.output_dir, "overflow")
    assert [m["update_skipped"] for m in metrics] == [i == overflow_at for i in range(6)]
    assert metrics[overflow_at]["grad_norm"] is None  # inf is written as null
    assert all(math.isfinite(m["loss"]) for m in metrics)
    # the scale each step ran with: halved after the overflow and kept (no 2000 good steps since)
    scales = [INIT_SCALE] * (overflow_at + 1) + [INIT_SCALE / 2] * (6 - overflow_at - 1)
    assert [m["loss_scale"] for m in metrics] == scales
    assert trainer.grad_scaler.get_scale() == INIT_SCALE / 2
    log = (result.output_dir / "log.txt").read_text()
    assert log.count("fp16 gradient overflow") == 1 and f"step {overflow_at}:" in log
    assert trainer.state.nonfinite_in_a_row == 0  # routine for fp16: not a step towards aborting
