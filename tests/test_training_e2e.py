"""End-to-end training runs on the tiny SD 1.5 model: loss, outputs, resume, stop, interop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aitk.config.loader import load_job_file
from aitk.trainer.loop import Trainer
from interop_results import record


def train(job_path: Path, **kwargs):
    loaded = load_job_file(job_path)
    trainer = Trainer(loaded.job, loaded.job.config.process[0], **kwargs)
    return trainer, trainer.run()


def read_metrics(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / f"metrics_{name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_loss_falls_and_outputs_are_written(make_job, tmp_path):
    job = make_job(
        "falls",
        train={"steps": 120, "lr": 2e-3, "lr_scheduler": "constant"},
        network={"linear": 8, "linear_alpha": 8},
        save={"save_every": 50},
    )
    trainer, result = train(job)
    assert result.state == "completed" and result.step == 120
    run_dir = result.output_dir
    metrics = read_metrics(run_dir, "falls")
    assert [m["step"] for m in metrics] == list(range(120))
    losses = [m["loss"] for m in metrics]
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.8 * first, (first, last)
    for record in metrics:
        for key in ("timestamp", "loss", "grad_norm", "step_time_s", "samples_per_s", "learning_rate", "lr_0"):
            assert record[key] is not None, key
        assert record["alpha_enabled"] is False and record["expert"] is None
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 120 and status["total_steps"] == 120
    assert (run_dir / "falls.safetensors").is_file()
    assert (run_dir / "falls_000000050.safetensors").is_file()
    assert (run_dir / "falls_000000100.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["000000050", "000000100", "000000120"]
    assert (run_dir / "config.yaml").is_file() and "falls" in (run_dir / "log.txt").read_text()


def _final_network(run_dir: Path) -> dict[str, torch.Tensor]:
    from aitk.trainer.checkpoint import list_checkpoints

    newest = list_checkpoints(run_dir / "checkpoints")[0]
    return load_file(str(newest.path / "network.safetensors"))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_is_identical_to_a_straight_run(make_job, accumulation):
    changes = dict(
        train={"steps": 40, "lr_scheduler": "cosine_with_warmup", "lr_warmup_steps": 5,
               "gradient_accumulation": accumulation},
        dataset={"caption_dropout_rate": 0.2, "flip_x": True},
        network={"linear": 4, "linear_alpha": 8, "dropout": 0.1},
        save={"save_every": 15},
    )
    straight_job = make_job("straight", **changes)
    _, straight = train(straight_job)

    resumed_job = make_job("resumed", **changes)

    def stop_at_20(trainer: Trainer, step: int) -> None:
        if step == 20:
            trainer.stop.request("test")

    _, first = train(resumed_job, on_step_end=stop_at_20)
    assert first.state == "stopped" and first.step == 20
    _, second = train(resumed_job)
    assert second.state == "completed" and second.step == 40

    a, b = _final_network(straight.output_dir), _final_network(second.output_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lora_a = load_file(str(straight.output_dir / "straight.safetensors"))
    lora_b = load_file(str(second.output_dir / "resumed.safetensors"))
    assert all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)
    # The metrics file of the resumed run has each step once, with the same losses.
    losses_a = [m["loss"] for m in read_metrics(straight.output_dir, "straight")]
    metrics_b = read_metrics(second.output_dir, "resumed")
    assert [m["step"] for m in metrics_b] == list(range(40))
    assert losses_a == [m["loss"] for m in metrics_b]


def test_rerunning_a_finished_job_does_nothing(make_job):
    job = make_job("twice", train={"steps": 3})
    _, first = train(job)
    _, second = train(job)
    assert first.state == second.state == "completed" and second.step == 3


def test_pruning_keeps_the_newest_saves(make_job):
    job = make_job("prune", train={"steps": 12}, save={"save_every": 2, "max_step_saves_to_keep": 2})
    _, result = train(job)
    run_dir = result.output_dir
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["000000010", "000000012"]
    step_files = sorted(p.name for p in run_dir.glob("prune_*.safetensors"))
    assert step_files == ["prune_000000010.safetensors", "prune_000000012.safetensors"]


@pytest.mark.parametrize("with_conv", [False, True], ids=["lora", "lora+locon"])
def test_saved_lora_loads_in_diffusers_and_matches_the_trainer(make_job, tiny_sd15, with_conv):
    from diffusers import StableDiffusionPipeline

    network = {"linear": 4, "linear_alpha": 8}
    if with_conv:
        network |= {"conv": 4, "conv_alpha": 2}
    job = make_job("interop", train={"steps": 15, "lr": 5e-3}, network=network)
    trainer, result = train(job)

    def render(pipe) -> np.ndarray:
        generator = torch.Generator().manual_seed(3)
        return pipe("a red circle, shp style", num_inference_steps=3, height=64, width=64,
                    generator=generator, output_type="np").images[0]

    trainer.adapter.denoiser().eval()
    ours = render(trainer.adapter.sample_pipeline("ddim"))
    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None)
    fresh.scheduler = trainer.adapter.sample_pipeline("ddim").scheduler
    base = render(fresh)
    fresh.load_lora_weights(str(result.final_lora))
    theirs = render(fresh)
    assert np.abs(ours - base).max() > 1e-3  # the LoRA changes the image, so the check can fail
    record("sd1", "locon" if with_conv else "lora", "diffusers load_lora_weights",
           (max_diff := float(np.abs(ours - theirs).max())) < 1e-4, max_diff)
    assert np.abs(ours - theirs).max() < 1e-4
    keys = load_file(str(result.final_lora)).keys()
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any("resnets" in k for k in keys) == with_conv


def test_samples_are_written_with_inline_flags(make_job):
    job = make_job(
        "samples",
        train={"steps": 4},
        sample={"sample_every": 2, "width": 64, "height": 64, "sample_steps": 2,
                "prompts": ["a red circle [trigger] --seed 3 --w 64 --h 128", "a blue square --cfg 2"]},
    )
    _, result = train(job)
    names = sorted(p.name for p in (result.output_dir / "samples").iterdir())
    assert names == [f"{step:09d}_{i}.jpg" for step in (0, 2, 4) for i in (0, 1)]
    from PIL import Image

    assert Image.open(result.output_dir / "samples" / "000000004_0.jpg").size == (64, 128)


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"train": {"train_unet": False}}, "config.process[0].train.train_unet"),
        ({"model": {"arch": "not_an_arch"}}, "config.process[0].model.arch"),
        ({"train": {"noise_scheduler": "flowmatch"}}, "config.process[0].train.noise_scheduler"),
    ],
)
def test_unsupported_settings_stop_the_run_before_loading(make_job, changes, key):
    from aitk.trainer.loop import TrainingAborted

    job = make_job("unsupported", **changes)
    with pytest.raises(TrainingAborted, match=key.replace("[", r"\[").replace("]", r"\]")):
        train(job)


def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    from aitk.cli import main
    from aitk.demo import DEMO_NAME

    monkeypatch.setenv("AITK_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--output", str(tmp_path / "demo_out"), "--steps", "6"]) == 0
    run_dir = tmp_path / "demo_out" / DEMO_NAME
    assert (run_dir / f"{DEMO_NAME}.safetensors").is_file()
    assert len(list((run_dir / "samples").glob("*.jpg"))) == 2 * 4  # steps 0, 2, 4, 6
    assert len((run_dir / f"metrics_{DEMO_NAME}.jsonl").read_text().splitlines()) == 6
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"


@pytest.mark.parametrize(
    "train_changes",
    [
        {"optimizer": "prodigy", "lr": 1.0},
        {"optimizer": "lion", "lr": 1e-4},
        {"optimizer": "adafactor"},
        {"optimizer": "sgd", "lr": 0.1},
        {"loss_type": "pseudo_huber", "noise_offset": 0.05, "min_snr_gamma": 5.0},
        {"loss_type": "mae", "content_or_style": "content", "lr_scheduler": "cosine_with_warmup",
         "lr_warmup_steps": 1},
        {"dtype": "bf16"},
    ],
    ids=["prodigy", "lion", "adafactor", "sgd", "huber+offset+minsnr", "mae+content+cosine", "bf16"],
)
def test_training_options_run_and_move_the_weights(make_job, train_changes):
    job = make_job("options", train={"steps": 3, **train_changes})
    trainer, result = train(job)
    assert result.state == "completed"
    losses = [m["loss"] for m in read_metrics(result.output_dir, "options")]
    assert len(losses) == 3 and all(np.isfinite(losses))
    lora_b = [v for k, v in trainer.network.network_state_dict().items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # lora_B starts at zero: it trained


def test_gradient_checkpointing_gives_the_same_losses(make_job):
    plain = make_job("plain", train={"steps": 4})
    checkpointed = make_job("ckpt", train={"steps": 4, "gradient_checkpointing": True})
    _, a = train(plain)
    _, b = train(checkpointed)
    losses_a = [m["loss"] for m in read_metrics(a.output_dir, "plain")]
    losses_b = [m["loss"] for m in read_metrics(b.output_dir, "ckpt")]
    assert np.allclose(losses_a, losses_b, rtol=1e-5, atol=1e-6)


def test_ema_weights_are_what_is_saved(make_job):
    job = make_job("ema", train={"steps": 6, "ema_config": {"use_ema": True, "ema_decay": 0.9}})
    trainer, result = train(job)
    from aitk.networks.export import kohya_to_network_state, load_lora_file

    tensors, _ = load_lora_file(result.final_lora)
    saved, _ = kohya_to_network_state(trainer.network.first, tensors, prefix="lora_unet")
    live = trainer.network.network_state_dict()
    with trainer.ema.applied():
        ema = trainer.network.network_state_dict()
    key = next(k for k in live if "lora_B" in k)
    assert torch.allclose(saved[key], ema[key]) and not torch.allclose(saved[key], live[key])


def test_gradient_accumulation_counts_optimizer_steps(make_job):
    job = make_job("accum", train={"steps": 3, "gradient_accumulation": 2})
    trainer, result = train(job)
    # 3 optimizer steps x 2 micro-batches x batch 2 = 12 samples = one epoch of the 12 images.
    assert trainer.data.state_dict()["epoch"] == 1 and trainer.data.state_dict()["position"] == 0
    assert len(read_metrics(result.output_dir, "accum")) == 3


def test_bf16_training_samples_and_saves(make_job):
    job = make_job("bf16", train={"steps": 2, "dtype": "bf16"},
                   sample={"sample_every": 1, "width": 64, "height": 64, "sample_steps": 2, "prompts": ["a circle"]})
    _, result = train(job)
    assert result.state == "completed"
    assert sorted(p.name for p in (result.output_dir / "samples").iterdir()) == [
        "000000000_0.jpg", "000000001_0.jpg", "000000002_0.jpg"]
    assert "failed" not in (result.output_dir / "log.txt").read_text()


def test_a_stop_during_the_last_step_completes_the_run(make_job):
    job = make_job("last", train={"steps": 3})

    def stop_at_end(trainer: Trainer, step: int) -> None:
        if step == 3:
            trainer.stop.request("test")

    _, result = train(job, on_step_end=stop_at_end)
    assert result.state == "completed" and result.final_lora.is_file()


def test_metrics_log_the_learning_rate_each_step_used(make_job):
    job = make_job("lr", train={"steps": 4, "lr": 1e-3, "lr_scheduler": "constant_with_warmup",
                                "lr_warmup_steps": 2})
    _, result = train(job)
    rates = [m["learning_rate"] for m in read_metrics(result.output_dir, "lr")]
    assert rates == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])


def test_resuming_with_another_rank_or_optimizer_is_refused_clearly(make_job):
    from aitk.trainer.loop import TrainingAborted

    make_job("changed", train={"steps": 2})
    _, first = train(make_job("changed", train={"steps": 2}))
    job = make_job("changed", train={"steps": 4, "optimizer": "lion"}, network={"linear": 8, "linear_alpha": 8})
    with pytest.raises(TrainingAborted) as info:
        train(job)
    message = str(info.value)
    assert "checkpoints/000000002" in message and "linear_rank: 4 in the checkpoint, 8 now" in message
    assert "optimizer: 'adamw' in the checkpoint, 'lion' now" in message and "config.name" in message


def test_a_failing_preview_is_a_warning_not_a_lost_run(make_job, monkeypatch):
    from aitk.models.sd import SD15Adapter

    def broken(self, latents):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(SD15Adapter, "decode_latents", broken)
    job = make_job("preview_fails", train={"steps": 2},
                   sample={"sample_every": 1, "width": 64, "height": 64, "sample_steps": 1, "prompts": ["x"]})
    _, result = train(job)
    assert result.state == "completed" and result.final_lora.is_file()
    assert "samples for step 1 failed (RuntimeError: out of memory (simulated))" in (
        result.output_dir / "log.txt").read_text()
