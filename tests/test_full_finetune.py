"""Full fine-tuning (no `network:` section): the denoiser's own weights train; saves are diffusers
folders (and, with save.single_file, one safetensors file) that load back to the trained model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aitk.config.loader import load_job_file
from aitk.trainer.loop import Trainer
from conftest import base_process, write_job


def full_job(tiny_sd15, shapes_dataset, tmp_path, name: str, **train):
    process = base_process(tiny_sd15, shapes_dataset, tmp_path / "out")
    del process["network"]
    process["train"].update({"steps": 12, "lr": 1e-4, "lr_scheduler": "constant", **train})
    process["save"].update({"save_every": 6, "single_file": True})
    return write_job(tmp_path / f"{name}.yaml", name, process)


def run(job, **kwargs):
    loaded = load_job_file(job)
    trainer = Trainer(loaded.job, loaded.job.config.process[0], **kwargs)
    return trainer, trainer.run()


def test_full_fine_tune_trains_saves_a_loadable_model_and_resumes(tiny_sd15, shapes_dataset, tmp_path):
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    trainer, result = run(full_job(tiny_sd15, shapes_dataset, tmp_path, "full"))
    assert result.state == "completed"
    unet = trainer.adapter.denoiser()
    changed = [n for n, p in unet.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert len(changed) > 0.9 * len(list(unet.parameters()))  # the model itself trained, not a few layers
    run_dir = result.output_dir
    for folder in ("full", "full_000000006", "full_000000012"):
        assert (run_dir / folder / "config.json").is_file() and (run_dir / f"{folder}.safetensors").is_file()
    reloaded = UNet2DConditionModel.from_pretrained(run_dir / "full")
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    unet.eval()
    with torch.no_grad():
        # saved in save.dtype float32 (conftest): the reloaded model is the trained one
        assert torch.equal(reloaded(x, t, c).sample, unet(x, t, c).sample)
    single = load_file(str(run_dir / "full.safetensors"))
    assert all(torch.equal(single[k], v) for k, v in unet.state_dict().items())
    lines = [json.loads(line) for line in (run_dir / "metrics_full.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all(m["gradient_stability"] is None or 0 <= m["gradient_stability"] <= 1 for m in lines)

    # resume: stopped at 7 and resumed equals the straight run
    job = full_job(tiny_sd15, shapes_dataset, tmp_path, "full_resumed")

    def stop_at_7(t, step):
        if step == 7:
            t.stop.request("test")

    run(job, on_step_end=stop_at_7)
    resumed, second = run(job)
    assert second.state == "completed"
    a = load_file(str(run_dir / "full.safetensors"))
    b = load_file(str(second.output_dir / "full_resumed.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_fine_tune_with_ema_and_an_8bit_optimizer(tiny_sd15, shapes_dataset, tmp_path, monkeypatch):
    from aitk.extras import extras_dir

    if extras_dir().is_dir():
        monkeypatch.syspath_prepend(str(extras_dir()))
    job = full_job(tiny_sd15, shapes_dataset, tmp_path, "full_ema", steps=4, optimizer="adamw8bit",
                   ema_config={"use_ema": True, "ema_decay": 0.9})
    trainer, result = run(job)
    assert result.state == "completed"
    saved = load_file(str(result.output_dir / "full_ema.safetensors"))
    live = trainer.adapter.denoiser().state_dict()
    with trainer.ema.applied():
        ema = {k: v.clone() for k, v in trainer.adapter.denoiser().state_dict().items()}
    key = next(k for k in saved if "attn1.to_q.weight" in k)
    assert torch.equal(saved[key], ema[key]) and not torch.equal(saved[key], live[key])
