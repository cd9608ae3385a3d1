"""The job's model at real size on fake tensors: denoisers with the network, encoders, VAE, and
the sizes the plan's accounting needs (per-block weight bytes for layer offloading)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from aitk.config.schema import ModelConfig
from aitk.plan import build
from aitk.plan.settings import PlanSettings
from aitk.plan.sources import ModelSpec

ENCODER_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder")


@dataclass
class PartSizes:
    """Device bytes of one frozen part and of each of its repeated blocks (for offloading)."""

    total: int
    blocks: list[int] = field(default_factory=list)
    full_precision: int = 0  # the same weights unquantized, in the training dtype (set-up on the host)

    def on_device(self, share: float) -> tuple[int, int]:
        """(device bytes, host bytes) with round(share * n) blocks offloaded: an offloaded block
        lives on the host and at most two of them (running + prefetched) are on the device."""
        from aitk.models.offload import WINDOW, offloaded_indices

        chosen = [self.blocks[i] for i in offloaded_indices(len(self.blocks), share)]
        window = sum(sorted(chosen, reverse=True)[:WINDOW])
        return self.total - sum(chosen) + window, sum(chosen)


def _sizes(module: nn.Module, blocks: list[nn.Module], full_precision: int) -> PartSizes:
    return PartSizes(build.frozen_bytes(module), [build.frozen_bytes(b) for b in blocks], full_precision)


def _full_precision(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


@dataclass
class FakeModel:
    adapter: Any  # the job's ModelAdapter, bound to the fake denoisers
    denoisers: dict[str, nn.Module]  # part name -> module
    expert_parts: dict[str, str]  # expert name -> part name
    trained: list[str]  # trained experts, in order
    sizes: dict[str, PartSizes]  # part name -> frozen bytes (denoisers, encoders, vae)
    trainable: list[nn.Parameter]  # every trained expert's trainable parameters
    text_lengths: dict[str, int]

    @property
    def traced_part(self) -> str:
        return self.expert_parts[self.trained[0]]


def _expert_parts(adapter: Any, denoisers: dict[str, nn.Module]) -> dict[str, str]:
    """expert name -> the part holding it (the bound adapter's experts are the denoisers given)."""
    part_of = {id(module): name for name, module in denoisers.items()}
    return {expert: part_of[id(module)] for expert, module in adapter.experts().items()}


def build_fake_model(
    settings: PlanSettings, spec: ModelSpec, model_cfg: ModelConfig, fake_mode: Any, tokenizer_lengths: dict[str, int]
) -> FakeModel:
    """Denoisers (cast, networked, quantized), encoders and VAE as fake tensors, and their sizes."""
    from aitk.models.registry import adapter_class

    dtype = build.TORCH_DTYPES[settings.dtype]
    adapter = adapter_class(settings.arch)(model_cfg, torch.device("cpu"), dtype)
    keep_fp32 = adapter.keeps_fp32_modules  # parts built as the adapter loads them
    denoisers: dict[str, nn.Module] = {}
    for name in spec.denoisers:
        module = build.cast(build.build_on_meta(spec.parts[name]), dtype, keep_fp32)
        module.requires_grad_(False)
        denoisers[name] = module
    adapter.bind(denoisers, spec.configs(tokenizer_lengths))
    expert_parts = _expert_parts(adapter, denoisers)
    trained = adapter.trained_experts()
    full_precision = {name: _full_precision(m) for name, m in denoisers.items()}
    for expert in trained:
        module = denoisers[expert_parts[expert]]
        _add_network(adapter, module, settings)
        # the trainer keeps fp32 masters: for a network in bf16 and fp16, for a full fine-tune in
        # fp16 (GradScaler unscales fp32 only)
        if settings.dtype == "fp16" or (settings.dtype == "bf16" and settings.network is not None):
            for param in build.trainable_parameters(module):
                param.data = param.data.float()
        if settings.gradient_checkpointing and getattr(module, "_supports_gradient_checkpointing", False):
            module.enable_gradient_checkpointing()
        module.train()
    sizes: dict[str, PartSizes] = {}
    trainable: list[nn.Parameter] = []
    for name, module in denoisers.items():
        build.materialize_fake(module, fake_mode)
        if settings.quantize:
            build.quantize_fake(module, settings.qtype, fake_mode)
        sizes[name] = _sizes(module, adapter.offload_blocks(module), full_precision[name])
        trainable += build.trainable_parameters(module)
    for name in (*ENCODER_PARTS, "vae"):
        if name not in spec.parts:
            continue
        module = build.build_on_meta(spec.parts[name])
        if name.startswith("text_encoder"):
            module = adapter.keep_of_text_encoder(name, module)
        # the VAE stays fp32 in every adapter; the encoders take the training dtype
        module = build.cast(module, torch.float32 if name == "vae" else dtype, keep_fp32)
        module.requires_grad_(False)
        full = _full_precision(module)
        blocks = adapter.offload_blocks(module) if name != "vae" else []
        if settings.quantize_te and name.startswith("text_encoder"):
            build.materialize_fake(module, fake_mode)
            build.quantize_fake(module, settings.qtype_te or settings.qtype, fake_mode)
        sizes[name] = _sizes(module, blocks, full)
    return FakeModel(adapter, denoisers, expert_parts, trained, sizes, trainable, tokenizer_lengths)


def _add_network(adapter: Any, module: nn.Module, settings: PlanSettings) -> None:
    """The job's network on `module` (on meta), by the trainer's own builder and targets; a full
    fine-tune makes the whole module trainable."""
    from aitk.plan.errors import PlanInputError

    net = settings.network
    if net is None:
        module.requires_grad_(True)
        return
    from aitk.networks.build import adapter_name_forms, build_network

    try:
        build_network(
            module,
            network_type=net.type,
            dora=net.dora,
            linear_rank=net.linear_rank,
            linear_alpha=net.linear_alpha,
            conv_rank=net.conv_rank,
            conv_alpha=net.conv_alpha,
            only_if_contains=list(net.only_if_contains) if net.only_if_contains else None,
            ignore_if_contains=list(net.ignore_if_contains) if net.ignore_if_contains else None,
            candidates=adapter.network_candidates(net.conv_rank is not None),
            seed=0,
            lokr_factor=net.lokr_factor,
            lokr_full_rank=net.lokr_full_rank,
            name_forms=adapter_name_forms(adapter),  # filters as the trainer matches them
        )
    except ValueError as exc:
        raise PlanInputError(f"network: {exc}") from None
