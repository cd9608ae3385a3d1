"""One benchmark case through the trainer's own code: set-up as aitk/trainer/setup.py does it,
then training steps as aitk/trainer/loop.py takes them.

Set-up: the family's adapter over random host weights (bench/gpu_models.py), placed by
`aitk.trainer.placing.place_adapter` with the job's quantization (`BaseQuantization`: block by
block on the way to the device), layer offloading and low_vram; the network injected by
`aitk.networks.build.build_network` on each trained expert, moved to the device; the optimizer
from `aitk.optim.build_optimizer`. A step: `adapter.make_noisy_batch` on latent-shaped random
input (as if cached), `adapter.predict` under autocast with random prompt embeddings of the real
shape, the trainer's loss, backward, gradient clipping, optimizer step.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpu_cases import Case, job_dict, load_job
from gpu_timing import DeviceOps, StepTimes, time_steps

SEED = 0


@dataclass
class ModelContext:
    """What every case of one model shares: configs, shapes and the random host weights."""

    name_or_path: str
    tiny: bool
    spec: Any  # aitk.plan.sources.ModelSpec
    tokenizer_lengths: dict[str, int]
    size: tuple[int, int]  # (width, height) of the largest bucket, pixels
    frames: int
    weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def model_context(case: Case, name_or_path: str, tiny: bool) -> ModelContext:
    """Configs and shapes of `case.model` as `aitk plan` reads them (no weights yet)."""
    from aitk.models.archs import data_facts
    from aitk.plan.planner import Planner
    from aitk.plan.settings import largest_bucket

    process = load_job(job_dict(case, name_or_path, tiny)).config.process[0]
    planner = Planner(case.id, process)
    settings = planner.settings
    size = largest_bucket(settings, data_facts(settings.arch)[0])
    return ModelContext(name_or_path, tiny, planner.spec, dict(planner.tokenizer_lengths), size, settings.frames)


@dataclass
class Measurement:
    """What one case measured; filled as it goes, so a failure keeps what came before."""

    setup_seconds: float | None = None
    setup_peak: int | None = None  # device bytes, set-up (placement, network, optimizer)
    baseline: int | None = None  # device bytes allocated before the case began
    times: StepTimes = field(default_factory=StepTimes)
    ledger_peak: int | None = None  # what the placement counted on the device (weights)
    trainable_parameters: int | None = None
    text_tokens: int | None = None
    swaps: int = 0
    swap_seconds: float = 0.0
    log: list[str] = field(default_factory=list)


def add_network(adapter: Any, process: Any) -> Any:
    """The job's network on each trained expert, built as the trainer builds it."""
    from aitk.networks.build import build_expert_networks
    from aitk.networks.group import NetworkGroup

    networks = build_expert_networks(adapter, process.network, seed=SEED)
    for module in adapter.experts().values():
        if process.train.gradient_checkpointing and hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
        module.train()
    return NetworkGroup(networks)


def expert_schedule(experts: list[str], warmup: int) -> tuple[int, list[str | None]]:
    """(warm-up steps, expert of each warm-up step): with several trained experts each one runs
    once in warm-up (its optimizer state exists, low_vram swaps once each way), then the first
    again, so the timed steps train the first expert with no swap."""
    if len(experts) < 2:
        return warmup, [None] * warmup
    order: list[str | None] = [*experts, experts[0]]
    order += [experts[0]] * max(0, warmup - len(order))
    return len(order), order


def run_case(case: Case, ctx: ModelContext, ops: DeviceOps, dtype: torch.dtype, measured: Measurement, *,
             warmup: int, timed: int, deadline: float | None) -> Measurement:
    """Set up `case` on `ops.device` and time its steps, filling `measured` as it goes."""
    from aitk.models.base import BatchContext
    from aitk.models.offload import DeviceLedger
    from aitk.trainer.loss import diffusion_loss
    from aitk.trainer.placing import place_adapter, step_part_names
    from aitk.trainer.quantizing import BaseQuantization

    from gpu_models import random_adapter

    device = ops.device
    process = load_job(job_dict(case, ctx.name_or_path, ctx.tiny)).config.process[0]
    train_cfg = process.train
    measured.baseline = ops.allocated()
    ops.reset_peak()
    started = time.perf_counter()
    adapter = random_adapter(process, ctx.spec, ctx.weights, device, dtype, ctx.tokenizer_lengths)
    ledger = DeviceLedger()
    quantization = BaseQuantization(adapter, process.model, has_network=True, job_path=None,
                                    log=measured.log.append)
    placement = place_adapter(
        adapter, process.model, text_cached=True, latents_cached=True, device=device,
        quantizer=quantization.quantizer, after_quantize=quantization.after_quantize, ledger=ledger,
        log=measured.log.append,
    )
    from aitk.trainer.experts import expert_optimizer

    network = add_network(adapter, process)
    params = network.trainable_parameters()
    placement.move_trainable(params)
    optimizer = expert_optimizer(network, train_cfg)
    ops.sync()
    measured.setup_seconds = time.perf_counter() - started
    measured.setup_peak = ops.peak_allocated()
    measured.trainable_parameters = sum(p.numel() for p in params)

    experts = adapter.trained_experts()
    multi = len(adapter.experts()) > 1
    warmup, order = expert_schedule(experts if multi else [], warmup)
    first, cond = adapter.example_batch(1, ctx.size, ctx.frames, expert=experts[0], with_controls=False)
    measured.text_tokens = cond.hidden_states.shape[1]
    latents = first.noisy_latents.float().to(device)  # stands for a cached latent
    cond = cond.to(device, dtype)
    del first
    batch_weights = torch.ones(latents.shape[0], device=device)
    generator = torch.Generator().manual_seed(SEED)
    step_parts = step_part_names(adapter, latents_cached=True)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else nullcontext
    max_norm = train_cfg.max_grad_norm if train_cfg.max_grad_norm and train_cfg.max_grad_norm > 0 else float("inf")
    target_size = (ctx.size[1], ctx.size[0])  # (height, width) in BatchContext

    def step(i: int) -> torch.Tensor:
        expert = order[i] if i < len(order) else (experts[0] if multi else None)
        with placement.using(*step_parts):
            noisy = adapter.make_noisy_batch(
                latents, train_cfg, generator, BatchContext(target_sizes=[target_size], expert=expert)
            )
        with autocast():
            prediction = adapter.predict(noisy, cond)
        loss = diffusion_loss(prediction.float(), noisy.target.float(), loss_type=train_cfg.loss_type,
                              huber_c=train_cfg.huber_c, sample_weights=batch_weights, mask=None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    ops.reset_peak()
    try:
        time_steps(step, warmup=warmup, timed=timed, ops=ops, deadline=deadline, times=measured.times)
    finally:
        measured.ledger_peak = ledger.peak
        measured.swaps, measured.swap_seconds = placement.swaps, placement.swap_seconds
        for part in placement.parts.values():  # hooks and pinned host copies go with the case
            if part.offloader is not None:
                part.offloader.remove()
    return measured


def tiny_folder(case: Case, root: Path) -> Path:
    """The tiny random-init folder of the case's family under `root` (built once)."""
    return case.model.build_tiny(root / f"tiny-{case.model.key}")
