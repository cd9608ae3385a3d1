"""Training health in real runs: gradient stability for every optimizer, alpha phases applied
live and saved with the LoRA, exact resume mid-phase, per-expert schedules, metrics lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_process, deep_update, write_job  # noqa: E402

VOLATILE = ("timestamp", "step_time_s", "samples_per_s")
REQUIRED = ("step", "timestamp", "loss", "grad_norm", "step_time_s", "samples_per_s", "gradient_stability",
            "gradient_stability_avg", "expert", "learning_rate", "lr_0", "alpha_enabled")
PHASE_FIELDS = ("phase", "phase_idx", "steps_in_phase", "conv_alpha", "linear_alpha", "loss_slope", "loss_r2",
                "loss_cv", "loss_samples")

# Loose criteria so phases change within a short tiny run: every check but min_steps/min_samples
# passes (the loss slope exists from 20 samples on, so a phase lasts at least 20 steps).
EASY_EXIT = {"loss_improvement_rate_below": 10.0, "min_gradient_stability": 0.0, "min_samples": 20}
SCHEDULE = {
    "enabled": True,
    "conv_alpha_phases": {
        "foundation": {"alpha": 2, "linear_alpha": 2, "min_steps": 20, "exit_criteria": EASY_EXIT},
        "balance": {"alpha": 4, "linear_alpha": 6, "min_steps": 20, "exit_criteria": EASY_EXIT},
        "emphasis": {"alpha": 8, "linear_alpha": 8, "min_steps": 5},
    },
}


def train(job: Path, **kwargs):
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    loaded = load_job_file(job)
    trainer = Trainer(loaded.job, loaded.job.config.process[0], **kwargs)
    return trainer, trainer.run()


def records(result, name: str) -> list[dict]:
    text = (result.output_dir / f"metrics_{name}.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    return [json.loads(line) for line in text.splitlines()]


def locon_schedule_job(make_job, name: str, **changes):
    base = {
        "network": {"linear": 4, "linear_alpha": 4, "conv": 4, "conv_alpha": 4, "alpha_schedule": SCHEDULE},
        "train": {"steps": 46, "lr": 1e-3},
        "save": {"save_every": 30},
    }
    return make_job(name, **deep_update(base, changes))


def test_phases_change_alpha_live_and_the_saved_file_carries_it(make_job):
    scales: dict[int, tuple[float, float]] = {}

    def forward_scale(layer, a: str, x: torch.Tensor) -> float:
        """The scale the module applies, read off its forward output: (y - base(x)) / B(A(x))."""
        with torch.no_grad():
            delta = layer.lora_B[a](layer.lora_A[a](x))
            extra = layer(x) - layer.base_layer(x)
        return float((extra * delta).sum() / (delta * delta).sum())

    def watch(trainer, step):
        handle = trainer.network.first
        layers = handle.lora_layers()
        conv = next(n for n in layers if handle.is_conv_module(n))
        linear = next(n for n in layers if isinstance(layers[n].base_layer, torch.nn.Linear))
        a = handle.adapter_name
        lin_layer, conv_layer = layers[linear], layers[conv]
        x_lin = torch.randn(2, lin_layer.base_layer.in_features)
        x_conv = torch.randn(1, conv_layer.base_layer.in_channels, 8, 8)
        scales[step] = (round(forward_scale(lin_layer, a, x_lin), 5), round(forward_scale(conv_layer, a, x_conv), 5))

    trainer, result = train(locon_schedule_job(make_job, "phases"), on_step_end=watch)
    lines = records(result, "phases")
    assert [m["phase"] for m in lines] == ["foundation"] * 20 + ["balance"] * 20 + ["emphasis"] * 6
    assert all(m["alpha_enabled"] is True and all(k in m for k in PHASE_FIELDS) for m in lines)
    assert [(m["linear_alpha"], m["conv_alpha"]) for m in (lines[0], lines[20], lines[40])] == [(2, 2), (6, 4), (8, 8)]
    # the wrapped modules' effective scale is alpha / rank (rank 4) after each transition
    assert scales[1] == (2 / 4, 2 / 4) and scales[21] == (6 / 4, 4 / 4) and scales[46] == (8 / 4, 8 / 4)
    log = (result.output_dir / "log.txt").read_text()
    assert "foundation -> balance" in log and "balance -> emphasis" in log
    # the LoRA saved at step 30 (balance) stores that phase's alphas; the final one emphasis'
    at8 = load_file(str(result.output_dir / "phases_000000030.safetensors"))
    final = load_file(str(result.final_lora))
    conv_key = next(k for k in at8 if k.endswith(".alpha") and "resnets" in k and "conv1" in k)
    lin_key = next(k for k in at8 if k.endswith(".alpha") and "attn1_to_q" in k)
    assert (at8[lin_key].item(), at8[conv_key].item()) == (6.0, 4.0)
    assert (final[lin_key].item(), final[conv_key].item()) == (8.0, 8.0)
    # the state is also written beside the checkpoint for users who look
    side = json.loads((result.output_dir / "checkpoints" / "000000030_alpha_scheduler.json").read_text())
    assert side["experts"][0]["phase"] == "balance"


def test_resume_mid_phase_gives_the_same_metrics_lines(make_job):
    _, straight = train(locon_schedule_job(make_job, "straight"))
    job = locon_schedule_job(make_job, "resumed")

    def stop_at_27(trainer, step):  # mid "balance" (steps 20..39)
        if step == 27:
            trainer.stop.request("test")

    train(job, on_step_end=stop_at_27)
    _, resumed = train(job)
    a = [{k: v for k, v in m.items() if k not in VOLATILE} for m in records(straight, "straight")]
    b = [{k: v for k, v in m.items() if k not in VOLATILE} for m in records(resumed, "resumed")]
    assert a == b
    x, y = load_file(str(straight.final_lora)), load_file(str(resumed.final_lora))
    assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("optimizer", ["adamw", "automagic"])
def test_every_metrics_line_has_the_spec_fields_and_a_stability(make_job, optimizer):
    params = {"optimizer": optimizer, "steps": 6, "lr": 1e-3}
    _, result = train(make_job(f"m_{optimizer}", train=params))
    lines = records(result, f"m_{optimizer}")
    for m in lines:
        assert all(k in m for k in REQUIRED), set(REQUIRED) - set(m)
        assert m["alpha_enabled"] is False and m["expert"] is None
    stabilities = [m["gradient_stability"] for m in lines]
    assert stabilities[0] is None  # nothing to compare with on the first step
    assert all(0.0 <= s <= 1.0 for s in stabilities[2:] if s is not None)
    assert sum(s is not None for s in stabilities) >= 4
    assert lines[-1]["gradient_stability_avg"] is not None


def test_wan22_experts_follow_their_own_schedules(shapes_dataset, tmp_path):
    from aitk.models.wan import build_tiny_wan

    model = build_tiny_wan(tmp_path / "wan22", "22_t2v")
    schedule = {
        "enabled": True,
        "alpha_phases": {
            "low": {"alpha": 2, "min_steps": 20, "exit_criteria": EASY_EXIT},
            "high": {"alpha": 6, "min_steps": 3},
        },
        # the high-noise expert must stay longer in its first phase
        # (an expert's own phase map lists its phases; keys it leaves out come from the global ones)
        "per_expert": {"high_noise": {"alpha_phases": {"low": {"min_steps": 24}, "high": {}}}},
    }
    process = deep_update(base_process(model, shapes_dataset, tmp_path / "out"), {
        "model": {"arch": "wan22_14b"},
        "network": {"linear": 2, "linear_alpha": 2, "alpha_schedule": schedule},
        "train": {"steps": 60, "lr": 1e-3, "switch_boundary_every": 2, "optimizer": "automagic"},
    })
    job = write_job(tmp_path / "experts.yaml", "experts", process)
    trainer, result = train(job)
    lines = records(result, "experts")
    assert all(all(k in m for k in REQUIRED + PHASE_FIELDS) for m in lines)
    for expert in ("high_noise", "low_noise"):
        mine = [m for m in lines if m["expert"] == expert]
        assert len(mine) == 30 and all(m["lr_1"] is not None for m in mine)
        first_high = next(i for i, m in enumerate(mine) if m["phase"] == "high")
        # the transition fires after that expert's own min_steps of its own steps
        assert first_high == (24 if expert == "high_noise" else 20), (expert, [m["phase"] for m in mine])
    a = trainer.network["high_noise"]
    assert a.linear_alpha == 6.0 and trainer.network["low_noise"].linear_alpha == 6.0


def test_a_lora_saved_mid_schedule_reproduces_the_trainer_in_diffusers(make_job, tiny_sd15):
    import numpy as np
    from diffusers import StableDiffusionPipeline

    # 30 steps end inside "balance" (linear 6, conv 4), so the file must carry those alphas
    trainer, result = train(locon_schedule_job(make_job, "midphase", train={"steps": 30, "lr": 5e-3}))
    handle = trainer.network.first
    assert (handle.linear_alpha, handle.conv_alpha) == (6.0, 4.0)

    def render(pipe) -> np.ndarray:
        return pipe("a red circle, shp style", num_inference_steps=3, height=64, width=64,
                    generator=torch.Generator().manual_seed(3), output_type="np").images[0]

    trainer.adapter.denoiser().eval()
    ours = render(trainer.adapter.sample_pipeline("ddim"))
    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None)
    fresh.scheduler = trainer.adapter.sample_pipeline("ddim").scheduler
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(str(result.final_lora))
    assert np.abs(ours - render(fresh)).max() < 1e-4


def test_sign_tracking_of_large_models_is_sampled():
    from aitk.trainer.health import GradientSignTracker

    tracker = GradientSignTracker(max_elements=1000)
    g = torch.randn(100, 100)
    assert tracker.update("main", {"w": g}) is None
    agreement = tracker.update("main", {"w": g.clone()})
    assert agreement == 1.0
    kept = tracker.state_dict()["main"]["w"]
    assert kept.numel() <= 1000 and kept.dtype == torch.int8
    assert tracker.update("main", {"w": -g}) == 0.0


def test_sign_agreement_of_a_lora_matches_a_direct_count_and_leaves_the_gradients_alone():
    """The one-call path (every tensor whole, on one device): the agreement is the share of
    elements whose sign repeats, and a lone tensor's gradient (flattened as a view) is untouched."""
    from aitk.trainer.health import GradientSignTracker

    torch.manual_seed(3)
    first = {f"m{i}.lora_A": torch.randn(4, 8) for i in range(3)} | {"m.lora_B": torch.randn(8, 4, 1, 1)}
    second = {name: torch.randn(g.shape) for name, g in first.items()}
    tracker = GradientSignTracker()
    assert tracker.update("main", first) is None
    same = sum(int((a.sign() == b.sign()).sum()) for a, b in zip(first.values(), second.values()))
    expected = same / sum(g.numel() for g in first.values())
    assert tracker.update("main", second) == pytest.approx(expected, abs=1e-6)
    assert 0.2 < expected < 0.8

    lone = GradientSignTracker()
    grad = torch.randn(6, 5)
    kept = grad.clone()
    lone.update("main", {"w": grad})
    assert lone.update("main", {"w": grad}) == 1.0
    assert torch.equal(grad, kept)  # not turned into its signs in place
