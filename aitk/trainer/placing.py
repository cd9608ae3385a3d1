"""Which part of the model lives where during a run: the policy over aitk.models.placement.

- Denoisers (each expert) are resident, with `layer_offloading_transformer_percent` of their
  blocks offloaded when `layer_offloading` is on. With `low_vram`, a multi-expert model (WAN 2.2)
  keeps one expert on the device at a time; they swap when the other one runs.
- Text encoders are resident only when a step may encode (no `cache_text_embeddings`) and
  `low_vram` is off; otherwise they come to the device only while they encode.
- The VAE (and other auxiliary parts) are resident only when a step runs them (latents not cached,
  or the model encodes control images / first frames each step) and `low_vram` is off.
- Parts are quantized (`quantize` / `quantize_te`) on the way to the device, block by block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from aitk.config.schema import ModelConfig
from aitk.models.base import ModelAdapter
from aitk.models.offload import DeviceLedger
from aitk.models.placement import Placement, Quantizer

EXPERT_PREFIX = "denoiser:"
EXPERTS_GROUP = "experts"


def expert_part(name: str) -> str:
    return EXPERT_PREFIX + name


def place_adapter(
    adapter: ModelAdapter,
    model_cfg: ModelConfig,
    *,
    text_cached: bool,
    latents_cached: bool,
    device: torch.device,
    fully_trained: frozenset[str] = frozenset(),
    sharded: bool = False,
    quantizer: Callable[[str, nn.Module], Quantizer | None] = lambda _p, _m: None,
    after_quantize: Callable[[str, nn.Module], None] | None = None,
    ledger: DeviceLedger | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> Placement:
    """Place every loaded part of `adapter` (on the host after `load()`) as the settings ask.

    `quantizer(part, module)`: how to quantize a part (None: not at all); `after_quantize(part,
    module)` runs on each denoiser once it is quantized (the accuracy-recovery adapter).
    `fully_trained`: experts whose own weights train (a full fine-tune): always resident, never
    offloaded (the optimizer holds their weights). `sharded`: they are left on the host for FSDP,
    which moves each process's shard to the device (aitk.trainer.fsdp)."""
    placement = Placement(device, ledger, log)
    low_vram = model_cfg.low_vram
    offloading = model_cfg.layer_offloading
    denoiser_share = model_cfg.layer_offloading_transformer_percent if offloading else 0.0
    text_share = model_cfg.layer_offloading_text_encoder_percent if offloading else 0.0

    experts = adapter.experts()
    swapped = [name for name in experts if name not in fully_trained] if low_vram and len(experts) > 1 else []
    for name, module in experts.items():
        part = expert_part(name)
        if sharded and name in fully_trained:
            continue
        placement.add(
            part, module,
            resident=name not in swapped,
            blocks=adapter.offload_blocks(module),
            offload_share=0.0 if name in fully_trained else denoiser_share,
            quantize=quantizer(part, module),
            after_quantize=(lambda part=part, module=module: after_quantize(part, module)) if after_quantize else None,
            group=EXPERTS_GROUP if name in swapped else None,
        )
    if swapped:
        placement.exclusive([expert_part(name) for name in swapped])
        log(f"low_vram: {' and '.join(swapped)} take turns on the device; the idle one waits in host memory")

    for name, module in adapter.text_encoders().items():
        placement.add(
            name, module,
            resident=not (low_vram or text_cached),
            blocks=adapter.offload_blocks(module),
            offload_share=text_share,
            quantize=quantizer(name, module),
        )
    step_parts = step_part_names(adapter, latents_cached)
    for name, module in adapter.auxiliary_modules().items():
        placement.add(name, module, resident=name in step_parts and not low_vram)
    parked = [p.name for p in placement.parts.values() if not p.resident]
    if parked:
        log(f"in host memory until used: {', '.join(parked)}")
    return placement


def step_part_names(adapter: ModelAdapter, latents_cached: bool) -> tuple[str, ...]:
    """The parts a training step runs besides the denoiser and text encoders."""
    names = list(adapter.step_auxiliary_names)
    if not latents_cached:
        names += [n for n in adapter.latent_encoder_names if n not in names]
    return tuple(names)

