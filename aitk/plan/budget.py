"""Where the bytes are in each phase of a run, from the part sizes and the traced step.

Residency rules (docs/memory.md, "What the plan assumes"):
- denoisers: on the device, less the offloaded blocks (model.layer_offloading); WAN 2.2 with
  model.low_vram keeps only the active expert on the device, the other on the host.
- text encoders (and WAN 2.1 I2V's image encoder): with cache_text_embeddings they are on the
  device only while caching, then released; otherwise they stay on the device (low_vram: parked
  on the host between uses). The image encoder runs every step (resident unless low_vram).
- VAE: with cached latents only while caching; otherwise resident (low_vram: parked).
- the network, its optimizer state and EMA copy are always on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

from aitk.plan.model import PartSizes
from aitk.plan.report import DeviceSplit
from aitk.plan.settings import PlanSettings
from aitk.plan.step import StepTrace
from aitk.plan.tracker import ACTIVATIONS, GRADIENTS, WORKSPACE

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class Budget:
    step: DeviceSplit
    phases: dict[str, int]
    weights_by_part: dict[str, int]
    host: dict[str, int]


def account(
    settings: PlanSettings,
    sizes: dict[str, PartSizes],
    expert_parts: dict[str, str],
    active_part: str,
    trainable: int,
    optimizer: int,
    trace: StepTrace,
) -> Budget:
    denoiser_share = settings.offloaded_share
    te_share = settings.te_offloaded_share
    host: dict[str, int] = {"set-up": sum(s.full_precision or s.total for s in sizes.values())}
    step_weights: dict[str, int] = {}
    resident_denoisers = 0
    parked = 0
    offloaded = 0
    for part in expert_parts.values():
        device, on_host = sizes[part].on_device(denoiser_share)
        if settings.low_vram and len(expert_parts) > 1 and part != active_part:
            parked += sizes[part].total  # the inactive expert waits on the host
            continue
        step_weights[part] = device
        resident_denoisers += device
        offloaded += on_host

    def encoder_device(name: str) -> tuple[int, int]:
        share = te_share if name in TEXT_ENCODERS else 0.0
        return sizes[name].on_device(share)

    text_encoders = [n for n in TEXT_ENCODERS if n in sizes]
    encoding_weights = 0
    for name in text_encoders:
        device, on_host = encoder_device(name)
        encoding_weights += device
        if settings.cache_text_embeddings:
            continue  # released after caching
        if settings.low_vram:
            parked += sizes[name].total
        else:
            step_weights[name] = device
            offloaded += on_host
    if "image_encoder" in sizes:
        if settings.low_vram:
            parked += sizes["image_encoder"].total
        else:
            step_weights["image_encoder"] = sizes["image_encoder"].total
    if "vae" in sizes:
        if settings.cache_latents or settings.low_vram:
            parked += sizes["vae"].total
        else:
            step_weights["vae"] = sizes["vae"].total
    host["offloaded blocks"] = offloaded
    host["parked parts"] = parked

    at_peak = trace.at_peak
    step = DeviceSplit(
        weights=sum(step_weights.values()),
        trainable=trainable,
        optimizer=optimizer,
        gradients=at_peak.get(GRADIENTS, 0),
        activations=at_peak.get(ACTIVATIONS, 0),
        workspace=at_peak.get(WORKSPACE, 0),
    )
    phases = {"training step": step.total}
    always = trainable + optimizer
    beside = 0 if settings.low_vram else resident_denoisers
    if text_encoders and (settings.cache_text_embeddings or settings.low_vram):
        phases["text encoding"] = encoding_weights + beside + always
    if "vae" in sizes and (settings.cache_latents or settings.low_vram):
        phases["latent caching"] = sizes["vae"].total + beside + always
    return Budget(step, phases, step_weights, host)
