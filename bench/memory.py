"""The plan against a measured step at real size: SD 1.5's UNet (random init, SD 1.5's config),
512 px, batch 1, LoRA rank 16, fp32, on the CPU; with and without gradient checkpointing.

Planned: `aitk.plan.plan_job` on a job naming stable-diffusion-v1-5/stable-diffusion-v1-5 (the
shipped public config; no download). Measured: the same UNet built for real from the same config,
the same network (the trainer's builder and targets) and inputs, one warm-up step with AdamW, then
one step under torch.profiler's CPU allocator events (aitk.plan.measure.allocator_peak), plus the
step's inputs. Needs about 10 GB of free memory and a few minutes on 2 cores. Not in `make test`.

    .venv/bin/python bench/memory.py          # prints a Markdown table (docs/memory.md has one)
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
RESOLUTION, BATCH, RANK = 512, 1, 16
MIB = 2**20


def job_file(folder: Path, checkpointing: bool) -> Path:
    process = {
        "type": "sd_trainer",
        "training_folder": str(folder / "out"),
        "device": "cpu",
        "network": {"type": "lora", "linear": RANK, "linear_alpha": RANK},
        "datasets": [{"folder_path": str(folder), "resolution": [RESOLUTION], "cache_latents_to_disk": True}],
        "train": {"batch_size": BATCH, "optimizer": "adamw", "dtype": "fp32", "gradient_checkpointing": checkpointing,
                  "cache_text_embeddings": True},
        "model": {"name_or_path": HUB_ID, "arch": "sd1"},
    }
    path = folder / f"sd15_gc{int(checkpointing)}.yaml"
    path.write_text(yaml.safe_dump({"job": "extension", "config": {"name": "bench", "process": [process]}}))
    return path


def measure(checkpointing: bool) -> tuple[int, float, int]:
    """(step bytes above the loaded model, step seconds, UNet parameter bytes) of a real step."""
    from aitk.config.schema import ModelConfig
    from aitk.models.sd import SD15Adapter
    from aitk.networks.build import build_network
    from aitk.plan.build import storage_bytes
    from aitk.plan.measure import allocator_peak
    from aitk.plan.sources import model_spec

    spec = model_spec(HUB_ID, "sd1")
    unet_part = spec.parts["unet"]
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({k: v for k, v in unet_part.config.items() if not k.startswith("_")})
    unet.requires_grad_(False)
    adapter = SD15Adapter(ModelConfig(name_or_path=HUB_ID, arch="sd1"), torch.device("cpu"), torch.float32)
    adapter.bind({"unet": unet}, spec.configs({}))
    handle = build_network(unet, linear_rank=RANK, linear_alpha=RANK, candidates=adapter.network_candidates(False), seed=0)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(list(handle.trainable_parameters()), lr=1e-4, eps=1e-6)
    batch, cond = adapter.example_batch(BATCH, (RESOLUTION, RESOLUTION), 1, expert="main", with_controls=False)
    inputs = storage_bytes([batch.noisy_latents, batch.timesteps, batch.target, cond.hidden_states])

    def step() -> None:
        prediction = adapter.predict(batch, cond)
        loss = torch.nn.functional.mse_loss(prediction.float(), batch.target.float())
        loss.backward()

    step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    peak, seconds = allocator_peak(step)
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    return peak + inputs, seconds, weights


def main() -> int:
    from aitk.plan import plan_job

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for checkpointing in (False, True):
            start = time.perf_counter()
            plan = plan_job(job_file(Path(tmp), checkpointing))
            plan_seconds = time.perf_counter() - start
            planned = plan.step.gradients + plan.step.activations + plan.step.workspace
            measured, step_seconds, weights = measure(checkpointing)
            gc.collect()
            rows.append((checkpointing, plan, planned, measured, plan_seconds, step_seconds, weights))
    print(f"SD 1.5 UNet (random init), {RESOLUTION} px, batch {BATCH}, LoRA rank {RANK}, fp32, CPU "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}\n")
    print("| gradient checkpointing | planned step memory | measured step memory | planned / measured | "
          "activations | workspace | gradients | UNet weights (plan / real) | FLOPs per step | plan time | step time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for checkpointing, plan, planned, measured, plan_seconds, step_seconds, weights in rows:
        s = plan.step
        print(f"| {'on' if checkpointing else 'off'} | {planned / MIB:,.1f} MiB | {measured / MIB:,.1f} MiB | "
              f"{planned / measured:.3f} | {s.activations / MIB:,.1f} MiB | {s.workspace / MIB:,.1f} MiB | "
              f"{s.gradients / MIB:,.1f} MiB | {s.weights / MIB:,.0f} / {weights / MIB:,.0f} MiB | "
              f"{plan.flops_per_step / 1e12:.2f} T | {plan_seconds:.1f} s | {step_seconds:.1f} s |")
    worst = max(abs(planned / measured - 1) for _, _, planned, measured, *_ in rows)
    print(f"\nlargest deviation: {worst:.1%} (acceptance: 15%)")
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
