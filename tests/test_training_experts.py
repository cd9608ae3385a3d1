"""Multi-expert training (WAN 2.2 high-noise / low-noise) through the Trainer, and video datasets
training on the tiny WAN 2.1: expert rotation, timestep ranges, per-expert learning rates, LoRA
files and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import base_process, deep_update, write_job  # noqa: E402

BOUNDARY_T2V = 875.0


@pytest.fixture(scope="module")
def wan22(tmp_path_factory) -> Path:
    from aitk.models.wan import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("wan22") / "m", "22_t2v")


@pytest.fixture(scope="module")
def wan21(tmp_path_factory) -> Path:
    from aitk.models.wan import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("wan21") / "m", "t2v")


def expert_job(tmp_path: Path, name: str, model_folder: Path, data: Path, **changes) -> Path:
    process = base_process(model_folder, data, tmp_path / "out")
    process = deep_update(process, {
        "model": {"arch": "wan22_14b"},
        "train": {"steps": 12, "lr": 5e-3, "switch_boundary_every": 3,
                  "optimizer_params": {"high_noise_lr": 4e-3, "low_noise_lr": 2e-3}},
        "network": {"linear": 4, "linear_alpha": 4},
        "save": {"save_every": 6},
    })
    return write_job(tmp_path / f"{name}.yaml", name, deep_update(process, changes))


def train(job_path: Path, **kwargs):
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    loaded = load_job_file(job_path)
    trainer = Trainer(loaded.job, loaded.job.config.process[0], **kwargs)
    return trainer, trainer.run()


def metrics(result, name: str) -> list[dict]:
    return [json.loads(line) for line in (result.output_dir / f"metrics_{name}.jsonl").read_text().splitlines()]


def snapshot(trainer) -> dict[str, dict[str, torch.Tensor]]:
    return {e: h.network_state_dict() for e, h in trainer.network.items()}


def test_experts_alternate_with_their_own_timesteps_rates_and_files(wan22, shapes_dataset, tmp_path, monkeypatch):
    from aitk.models.wan import Wan22Adapter

    drawn: list[tuple[str | None, torch.Tensor]] = []
    original = Wan22Adapter.make_noisy_batch

    def recording(self, latents, train_cfg, generator, context=None):
        batch = original(self, latents, train_cfg, generator, context)
        drawn.append((context.expert if context else None, batch.timesteps.detach().clone()))
        return batch

    monkeypatch.setattr(Wan22Adapter, "make_noisy_batch", recording)
    changed: list[set[str]] = []
    state = {}

    def watch(trainer, step):
        now = snapshot(trainer)
        if state:
            changed.append({e for e in now if any(not torch.equal(now[e][k], state[e][k]) for k in now[e])})
        else:
            changed.append(set(now))  # the first step: compare with the start below
        state.update(now)

    job = expert_job(tmp_path, "experts", wan22, shapes_dataset)
    trainer, result = train(job, on_step_end=watch)
    assert result.state == "completed"

    expected = ["high_noise"] * 3 + ["low_noise"] * 3
    expected = (expected * 2)[:12]
    records = metrics(result, "experts")
    assert [m["expert"] for m in records] == expected
    assert [e for e, _ in drawn] == expected
    for expert, timesteps in drawn:  # every timestep of a step lies in its expert's range
        if expert == "high_noise":
            assert bool((timesteps >= BOUNDARY_T2V).all()), timesteps
        else:
            assert bool((timesteps < BOUNDARY_T2V).all()), timesteps
    for step, (was_changed, expert) in enumerate(zip(changed[1:], expected[1:]), start=1):
        assert was_changed == {expert}, (step, was_changed)  # only the active expert moved

    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == [4e-3, 2e-3]
    assert records[0]["lr_0"] == 4e-3 and records[0]["lr_1"] == 2e-3

    run = result.output_dir
    assert [p.name for p in result.final_loras] == ["experts_high_noise.safetensors", "experts_low_noise.safetensors"]
    for expert in ("high_noise", "low_noise"):
        for suffix in ("", "_000000006", "_000000012"):
            assert (run / f"experts_{expert}{suffix}.safetensors").is_file()
    high = load_file(str(run / "experts_high_noise.safetensors"))
    low = load_file(str(run / "experts_low_noise.safetensors"))
    assert high.keys() == low.keys() and all(k.startswith("diffusion_model.blocks.") for k in high)
    assert any(not torch.equal(high[k], low[k]) for k in high if "lora_up" in k)


def test_resume_mid_window_continues_the_same_expert_and_matches_a_straight_run(wan22, shapes_dataset, tmp_path):
    _, straight = train(expert_job(tmp_path, "straight", wan22, shapes_dataset))
    job = expert_job(tmp_path, "resumed", wan22, shapes_dataset)

    def stop_at_4(trainer, step):  # step 4 is the second of low_noise's three steps (3, 4, 5)
        if step == 4:
            trainer.stop.request("test")

    _, first = train(job, on_step_end=stop_at_4)
    assert first.state == "stopped" and first.step == 4
    trainer, second = train(job)
    assert second.state == "completed"
    a, b = metrics(straight, "straight"), metrics(second, "resumed")
    assert [m["expert"] for m in a] == [m["expert"] for m in b]
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    for expert in ("high_noise", "low_noise"):
        x = load_file(str(straight.output_dir / f"straight_{expert}.safetensors"))
        y = load_file(str(second.output_dir / f"resumed_{expert}.safetensors"))
        assert all(torch.equal(x[k], y[k]) for k in x), expert


def test_training_only_the_low_noise_expert(wan22, shapes_dataset, tmp_path):
    job = expert_job(tmp_path, "low_only", wan22, shapes_dataset,
                     model={"model_kwargs": {"train_high_noise": False}}, train={"steps": 4})
    trainer, result = train(job)
    assert list(trainer.network) == ["low_noise"]
    assert {m["expert"] for m in metrics(result, "low_only")} == {"low_noise"}
    assert [p.name for p in result.final_loras] == ["low_only_low_noise.safetensors"]
    assert not (result.output_dir / "low_only_high_noise.safetensors").exists()


# ------------------------------------------------------------------ video datasets on WAN 2.1


def test_clips_of_different_lengths_fps_and_shapes_train_together(wan21, tmp_path, monkeypatch):
    from test_data_video_training import write_clip

    clips = tmp_path / "clips"
    clips.mkdir()
    write_clip(clips / "wide.mp4", 24, 64, 32, fps=24)  # 9 frames spread over 24
    write_clip(clips / "tall.mp4", 30, 32, 64, fps=30)
    write_clip(clips / "short.mp4", 6, 48, 48, fps=8)  # 6 frames -> 5 (4k+1)
    for name in ("wide", "tall", "short"):
        (clips / f"{name}.txt").write_text(f"a clip, {name}")
    process = base_process(wan21, clips, tmp_path / "out")
    process = deep_update(process, {
        "model": {"arch": "wan21"},
        "train": {"steps": 24, "lr": 1e-2, "batch_size": 1},
        "network": {"linear": 8, "linear_alpha": 8},
        "sample": {"sample_every": 1000, "prompts": ["a clip"], "width": 64, "height": 64, "num_frames": 5,
                   "sample_steps": 2, "guidance_scale": 1.0},
    })
    process["datasets"] = [{"folder_path": str(clips), "resolution": [64], "num_frames": 9,
                            "max_pixels_per_frame": 48 * 48, "cache_latents": True}]
    job = write_job(tmp_path / "video.yaml", "video", process)
    seen_shapes: set[tuple[int, ...]] = set()
    from aitk.models.wan import Wan21Adapter

    original = Wan21Adapter.make_noisy_batch

    def recording(self, latents, train_cfg, generator, context=None):
        seen_shapes.add(tuple(latents.shape[2:]))
        return original(self, latents, train_cfg, generator, context)

    monkeypatch.setattr(Wan21Adapter, "make_noisy_batch", recording)
    trainer, result = train(job)
    assert result.state == "completed"
    # latent (frames, h, w): 9 frames -> 3 latent frames, 5 -> 2; sizes from each clip's bucket
    assert seen_shapes == {(3, 4, 8), (3, 8, 4), (2, 6, 6)}, seen_shapes
    log = (result.output_dir / "log.txt").read_text()
    assert "frame counts: 5 frames: 1, 9 frames: 2" in log
    losses = [m["loss"] for m in metrics(result, "video")]
    assert np.mean(losses[-8:]) < np.mean(losses[:8])
    assert list((result.output_dir / "samples").glob("*.mp4"))


def test_rerunning_a_finished_expert_run_reports_its_files(wan22, shapes_dataset, tmp_path):
    job = expert_job(tmp_path, "done", wan22, shapes_dataset, train={"steps": 4})
    _, first = train(job)
    _, again = train(job)
    assert again.state == "completed" and again.step == 4
    assert again.final_loras == first.final_loras and all(p.is_file() for p in again.final_loras)
    assert [p.name for p in again.final_loras] == ["done_high_noise.safetensors", "done_low_noise.safetensors"]
