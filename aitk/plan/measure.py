"""Measure one real training step's memory on the CPU, independently of the plan's tracker.

The model is loaded for real by its adapter (the trainer's loading, quantization, network and
checkpointing code), a batch of the job's largest bucket is encoded and noised, one warm-up step
creates the optimizer state, and then one step (forward, loss, backward) runs under
torch.profiler with profile_memory: the CPU allocator reports every allocation and free, and
the peak of their running sum, plus the step's inputs, is the step's memory above the loaded
model. Used by the tests and
bench/memory.py to check the plan; not by the plan itself.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class MeasuredStep:
    peak: int  # most bytes the step allocated above what existed before it (allocator's count)
    loaded: int  # bytes of the loaded model's parameters and buffers (for reference)
    seconds: float  # the profiled step's wall time


def allocator_peak(run: Any) -> tuple[int, float]:
    """(peak of the running sum of CPU allocator events while `run()` executes, seconds)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, seconds


def _pixels(adapter: Any, batch: int, size: tuple[int, int], frames: int) -> torch.Tensor:
    width, height = size
    generator = torch.Generator().manual_seed(0)
    if frames > 1:
        return torch.rand(batch, 3, frames, height, width, generator=generator) * 2 - 1
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


def measure_step(job: str | Path, process_index: int = 0) -> MeasuredStep:
    """Load the job's model on the CPU and measure one training step (see the module doc)."""
    from aitk.config.loader import load_job_file
    from aitk.models.archs import data_facts
    from aitk.models.base import BatchContext
    from aitk.models.quantize import quantize_frozen
    from aitk.models.registry import create_adapter
    from aitk.networks.build import build_network
    from aitk.optim import build_optimizer
    from aitk.plan.build import TORCH_DTYPES, storage_bytes
    from aitk.plan.settings import largest_bucket, settings_from_process

    process = load_job_file(job).job.config.process[process_index]
    settings = settings_from_process(process)
    dtype = TORCH_DTYPES[settings.dtype]
    adapter = create_adapter(process.model, torch.device("cpu"), dtype)
    adapter.load()
    experts = adapter.experts()
    trained = adapter.trained_experts()
    if settings.quantize:
        for module in experts.values():
            quantize_frozen(module, settings.qtype)
    params: list[torch.nn.Parameter] = []
    net = settings.network
    for name in trained:
        module = experts[name]
        if net is None:
            module.requires_grad_(True)
            params += list(module.parameters())
        else:
            handle = build_network(
                module, network_type=net.type, dora=net.dora, linear_rank=net.linear_rank,
                linear_alpha=net.linear_alpha, conv_rank=net.conv_rank, conv_alpha=net.conv_alpha,
                candidates=adapter.network_candidates(net.conv_rank is not None), seed=0,
            )
            params += list(handle.trainable_parameters())
        if settings.gradient_checkpointing and hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
        module.train()
    optimizer = build_optimizer(settings.optimizer, [{"params": params}], lr=1e-4, optimizer_params={})

    size = largest_bucket(settings, data_facts(settings.arch)[0])
    pixels = _pixels(adapter, settings.batch_size, size, settings.frames)
    first = pixels[:, :, 0] if pixels.ndim == 5 else pixels
    with torch.no_grad():
        latents = adapter.encode_images(pixels)
        cond = adapter.encode_prompts(["a red circle on a white background"] * settings.batch_size)
    context = BatchContext(
        controls=first if adapter.uses_controls else None,
        first_frames=first if getattr(adapter, "i2v", False) else None,
        expert=trained[0] if len(experts) > 1 else None,
    )
    generator = torch.Generator().manual_seed(0)
    noisy = adapter.make_noisy_batch(latents, process.train, generator, context)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
    # The step's inputs (noisy batch, target, conditioning) are step memory on a device; they are
    # made before the profiled region (I2V conditions come from a VAE encode, whose transient
    # memory is not the step's) and added by their size.
    inputs = [noisy.noisy_latents, noisy.timesteps, noisy.target, cond.hidden_states]
    inputs += [t for t in [*noisy.extra.values(), *cond.extra.values(), noisy.loss_weights] if isinstance(t, torch.Tensor)]
    input_bytes = storage_bytes(inputs)

    def step() -> None:
        with autocast:
            prediction = adapter.predict(noisy, cond)
        loss = torch.nn.functional.mse_loss(prediction.float(), noisy.target.float())
        loss.backward()  # prediction, like the trainer's local, is alive through backward

    step()  # warm-up: the optimizer state exists from the first step on, as in training
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    import gc

    gc.collect()
    peak, seconds = allocator_peak(step)
    peak += input_bytes
    loaded = sum(p.numel() * p.element_size() for m in experts.values() for p in m.parameters())
    optimizer.zero_grad(set_to_none=True)
    return MeasuredStep(peak=peak, loaded=loaded, seconds=seconds)
