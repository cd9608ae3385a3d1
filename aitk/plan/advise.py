"""The cheapest settings that fit a device budget.

Tried in order of what they cost, each step keeping the previous ones: quantize to qfloat8
(little quality), gradient checkpointing (~20-30% slower steps), layer offloading in 10% steps
(host copies, hidden by prefetch while compute lasts longer than the copy), uint4 quantization
(more quality), batch 1, then smaller resolutions. Offloading only changes where frozen weights
live, so each offload share is accounted without tracing the step again.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from aitk.plan.settings import PlanSettings

OFFLOAD_STEPS = [i / 10 for i in range(1, 11)]
RESOLUTION_STEP = 128
MIN_RESOLUTION = 256


def _changes(base: PlanSettings, new: PlanSettings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if (new.quantize, new.qtype) != (base.quantize, base.qtype):
        out["model.quantize"] = True
        out["model.qtype"] = new.qtype
    if new.gradient_checkpointing != base.gradient_checkpointing:
        out["train.gradient_checkpointing"] = new.gradient_checkpointing
    if new.layer_offloading and (
        not base.layer_offloading or new.offload_transformer_percent != base.offload_transformer_percent
    ):
        out["model.layer_offloading"] = True
        out["model.layer_offloading_transformer_percent"] = new.offload_transformer_percent
    if new.batch_size != base.batch_size:
        out["train.batch_size"] = new.batch_size
    if new.resolution != base.resolution:
        out["datasets.resolution"] = [new.resolution]
    return out


def _with_offload(
    planner: Any, settings: PlanSettings, budget: int, offload: bool = True
) -> tuple[PlanSettings, int] | None:
    """`settings` as is when it fits, else (with `offload`) with the smallest offload share that fits."""
    plan = planner.evaluate(settings)
    if plan.peak_device <= budget:
        return settings, plan.peak_device
    if not offload or settings.network is None:
        return None  # a full fine-tune's weights are trainable: offloading moves none of them
    start = settings.offload_transformer_percent if settings.layer_offloading else 0.0
    for share in OFFLOAD_STEPS:
        if share <= start:
            continue
        candidate = replace(settings, layer_offloading=True, offload_transformer_percent=share)
        plan = planner.evaluate(candidate)
        if plan.peak_device <= budget:
            return candidate, plan.peak_device
    return None


def cheapest_fit(planner: Any, budget: int) -> tuple[dict[str, Any], int] | None:
    """(job keys -> values, planned peak) of the first setting on the ladder that fits, or None."""
    base: PlanSettings = planner.settings
    current = base
    ladder: list[PlanSettings] = []
    if not current.quantize and current.network is not None:
        current = replace(current, quantize=True, qtype="qfloat8")
        ladder.append(current)
    if not current.gradient_checkpointing:
        current = replace(current, gradient_checkpointing=True)
        ladder.append(current)
    if not ladder:
        ladder.append(current)
    if current.network is not None and current.quantized_qtype not in ("uint4", "uint3", "uint2"):
        current = replace(current, quantize=True, qtype="uint4")
        ladder.append(current)
    if current.batch_size > 1:
        current = replace(current, batch_size=1)
        ladder.append(current)
    resolution = current.resolution - RESOLUTION_STEP
    while resolution >= MIN_RESOLUTION:
        ladder.append(replace(current, resolution=resolution, max_pixels_per_frame=None))
        resolution -= RESOLUTION_STEP
    for candidate in ladder:
        # offloading only once checkpointing is on: it costs more time than checkpointing does
        found = _with_offload(planner, candidate, budget, offload=candidate.gradient_checkpointing)
        if found is not None:
            return _changes(base, found[0]), found[1]
    return None
