"""One training step of the job's model, traced on fake tensors.

The step is the trainer's own: the model's adapter (`ModelAdapter.predict`) runs the denoiser on
a NoisyBatch of the job's largest bucket, the loss is taken in fp32 and backward runs, under
autocast when the job trains in bf16 / fp16, as `aitk.trainer.loop` does. Only the inputs are
made here (the VAE, text encoders and noise draws of `make_noisy_batch` are not run: their
outputs are small tensors of known shape).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from aitk.models.base import ModelAdapter, NoisyBatch, PromptEmbeds
from aitk.plan.sources import ModelSpec

CLIP_TOKENS = 77


@dataclass
class StepTrace:
    peak: int  # most bytes the step's own tensors held at once
    at_peak: dict[str, int]  # their kinds at that moment (activations, workspace, gradients)
    flops: int  # forward + backward


def family(adapter: ModelAdapter) -> str:
    from aitk.models.flux import FluxAdapter
    from aitk.models.sdxl import SDXLAdapter

    if isinstance(adapter, SDXLAdapter):
        return "sdxl"
    if isinstance(adapter, FluxAdapter):
        return "flux"
    if hasattr(adapter, "two_experts"):
        return "wan"
    return "sd"


def vae_scale(spec: ModelSpec) -> int:
    vae = spec.parts.get("vae")
    if vae is None:
        return 8
    if "block_out_channels" in vae.config:
        return 2 ** (len(vae.config["block_out_channels"]) - 1)
    return 8  # WAN's VAE: 8x spatial


def bind_adapter(adapter: ModelAdapter, spec: ModelSpec, denoisers: dict[str, nn.Module]) -> None:
    """Give the adapter the (fake) denoisers and the facts its `predict` reads."""
    kind = family(adapter)
    if kind in ("sd", "sdxl"):
        adapter.unet = denoisers["unet"]
        return
    adapter.transformer = denoisers["transformer"]
    if kind == "flux":
        adapter.has_guidance = bool(spec.parts["transformer"].config.get("guidance_embeds", True))
        adapter.train_guidance = float(adapter.model_cfg.model_kwargs.get("guidance", 1.0))
        adapter.vae_scale_factor = vae_scale(spec)
        return
    adapter.transformer_2 = denoisers.get("transformer_2")
    if adapter.two_experts:
        adapter.boundary_ratio = spec.boundary_ratio or adapter.default_boundary_ratio


def text_tokens(adapter: ModelAdapter, spec: ModelSpec, tokenizer_lengths: dict[str, int]) -> int:
    """Tokens per prompt the denoiser attends to (the adapters' rules)."""
    kind = family(adapter)
    kwargs = adapter.model_cfg.model_kwargs
    if kind == "flux":
        guidance = bool(spec.parts["transformer"].config.get("guidance_embeds", True))
        wanted = int(kwargs.get("max_sequence_length", 512 if guidance else 256))
        return min(wanted, tokenizer_lengths.get("tokenizer_2", wanted))
    if kind == "wan":
        return int(kwargs.get("max_sequence_length", 512))
    return tokenizer_lengths.get("tokenizer", CLIP_TOKENS)


def make_inputs(
    adapter: ModelAdapter,
    spec: ModelSpec,
    expert: str,
    batch: int,
    size: tuple[int, int],
    frames: int,
    text_len: int,
    with_controls: bool,
) -> tuple[NoisyBatch, PromptEmbeds]:
    """A NoisyBatch and PromptEmbeds of the shapes the trainer feeds `predict` for one batch of
    the bucket `size` (width, height in pixels) and `frames` frames."""
    kind = family(adapter)
    dtype = adapter.dtype
    scale = vae_scale(spec)
    h, w = size[1] // scale, size[0] // scale
    denoiser_cfg = spec.parts[spec.denoisers[0]].config
    extra: dict[str, Any] = {}
    if kind in ("sd", "sdxl"):
        latents = torch.randn(batch, denoiser_cfg.get("in_channels", 4), h, w)
        timesteps = torch.randint(0, 1000, (batch,))
        hidden = torch.randn(batch, text_len, denoiser_cfg["cross_attention_dim"], dtype=dtype)
        cond = PromptEmbeds(hidden)
        if kind == "sdxl":
            pooled_dim = denoiser_cfg["projection_class_embeddings_input_dim"] - 6 * denoiser_cfg["addition_time_embed_dim"]
            cond.extra["pooled"] = torch.randn(batch, pooled_dim, dtype=dtype)
            extra["time_ids"] = torch.tensor([[float(size[1]), float(size[0]), 0.0, 0.0, float(size[1]), float(size[0])]] * batch)
    elif kind == "flux":
        latents = torch.randn(batch, denoiser_cfg["in_channels"] // 4, h, w)
        timesteps = torch.rand(batch) * 1000.0
        cond = PromptEmbeds(
            torch.randn(batch, text_len, denoiser_cfg["joint_attention_dim"], dtype=dtype),
            {"pooled": torch.randn(batch, denoiser_cfg["pooled_projection_dim"], dtype=dtype)},
        )
        if with_controls:
            extra["control_latents"] = torch.randn(batch, denoiser_cfg["in_channels"] // 4, h, w, dtype=dtype)
    else:
        latent_frames = (max(frames, 1) - 1) // 4 + 1
        latents = torch.randn(batch, denoiser_cfg.get("out_channels", 16), latent_frames, h, w)
        timesteps = torch.rand(batch) * 1000.0
        cond = PromptEmbeds(torch.randn(batch, text_len, denoiser_cfg["text_dim"], dtype=dtype))
        extra["expert"] = expert
        if adapter.i2v:
            extra["condition"] = torch.randn(batch, denoiser_cfg["in_channels"] - latents.shape[1], latent_frames, h, w, dtype=dtype)
        if adapter.uses_image_encoder:
            vision = spec.parts["image_encoder"].config
            tokens = (vision.get("image_size", 224) // vision.get("patch_size", 14)) ** 2 + 1
            extra["image_embeds"] = torch.randn(batch, tokens, vision["hidden_size"], dtype=dtype)
    noisy = NoisyBatch(latents.to(dtype), timesteps, torch.randn(latents.shape), None, extra)
    return noisy, cond


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
    with fake_mode, tracker:
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
