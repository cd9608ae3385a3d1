"""One training step of the job's model, traced on fake tensors.

The step is the trainer's own: the model's adapter (`ModelAdapter.predict`) runs the denoiser on
a NoisyBatch of the job's largest bucket, the loss is taken in fp32 and backward runs, under
autocast when the job trains in bf16 / fp16, as `aitk.trainer.loop` does. The inputs are the
adapter's own (`ModelAdapter.example_batch`: the VAE, text encoders and noise draws of
`make_noisy_batch` are not run; their outputs are small tensors of known shape).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from aitk.models.base import ModelAdapter

@dataclass
class StepTrace:
    peak: int  # most bytes the step's own tensors held at once
    at_peak: dict[str, int]  # their kinds at that moment (activations, workspace, gradients)
    flops: int  # forward + backward


def trace_step(
    adapter: ModelAdapter,
    denoiser: nn.Module,
    inputs: Any,
    fake_mode: Any,
) -> StepTrace:
    """Forward, loss and backward of one batch under the memory (and FLOP) tracker.

    `inputs` is a callable returning (NoisyBatch, PromptEmbeds); it runs inside the fake mode so
    the step's inputs are counted as the step's memory.
    """
    from aitk.plan.tracker import WORKSPACE, StepMemoryTracker

    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    tracker = StepMemoryTracker()
    autocast = (
        torch.autocast("cpu", dtype=adapter.dtype) if adapter.dtype != torch.float32 else nullcontext()
    )
    with fake_mode, tracker, adapter.fixed_shape_step():
        tracker.known([*denoiser.parameters(), *denoiser.buffers()])
        hooks = tracker.watch_gradients(trainable)
        try:
            batch, cond = inputs()
            with autocast:
                prediction = adapter.predict(batch, cond)
            # as in aitk.trainer.loop: the batch, conditioning and prediction stay referenced
            # through backward
            loss = torch.nn.functional.mse_loss(prediction.float(), batch.target.float())
            tracker.phase = WORKSPACE
            loss.backward()
        finally:
            for hook in hooks:
                hook.remove()
        peak, at_peak = tracker.peak, dict(tracker.at_peak)
        for param in trainable:
            param.grad = None
    return StepTrace(peak=peak, at_peak=at_peak, flops=tracker.flops)
