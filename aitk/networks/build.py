"""One entry point that injects the network a job's `network:` section asks for.

network.type -> what is injected:
- lora / locon: peft LoRA (kxk convs only with a conv rank); `dora: true` makes it DoRA
- dora: peft LoRA with DoRA (same as lora + dora: true)
- lokr / loha: peft LoKr / LoHa layers (aitk.networks.lycoris)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from aitk.networks.filters import NameForms
from aitk.networks.lora import NetworkHandle, inject_network

__all__ = ["NETWORK_TYPES", "network_algo", "build_network", "build_expert_networks"]

NETWORK_TYPES = ("lora", "locon", "dora", "lokr", "loha")


def network_algo(network_type: str, dora: bool = False) -> str:
    """The kind of network a type (+ the `dora` flag) trains: "lora", "dora", "lokr" or "loha".

    `dora: true` only combines with lora / locon / dora: peft has no DoRA for LoKr / LoHa.
    """
    kind = str(network_type).lower()
    if kind not in NETWORK_TYPES:
        raise ValueError(f"network type {network_type!r} is not one of {', '.join(NETWORK_TYPES)}")
    if kind in ("lokr", "loha"):
        if dora:
            raise ValueError(f"dora: true works with network type lora, locon or dora, not {kind}")
        return kind
    return "dora" if (kind == "dora" or dora) else "lora"


def build_network(
    module: nn.Module,
    *,
    network_type: str = "lora",
    dora: bool = False,
    linear_rank: int,
    linear_alpha: float,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    dropout: float = 0.0,
    only_if_contains: list[str] | None = None,
    ignore_if_contains: list[str] | None = None,
    candidates: list[str] | None = None,
    adapter_name: str = "default",
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    lokr_factor: int = -1,
    lokr_full_rank: bool = False,
    name_forms: NameForms | None = None,
    warn: Callable[[str], None] = lambda _m: None,
) -> NetworkHandle:
    """Inject the network of this type into `module` in place; returns its handle.

    Arguments as in `inject_network`; `lokr_factor` / `lokr_full_rank` only matter for lokr.
    `name_forms`: the other names a module path is written as (component prefix, LoRA key stem);
    with it the filters match every form (aitk.networks.filters) and unmatched entries are
    reported (an error for only_if_contains, `warn` for ignore_if_contains).
    """
    algo = network_algo(network_type, dora)
    if name_forms is not None and (only_if_contains or ignore_if_contains):
        from aitk.networks.filters import apply_module_filters
        from aitk.networks.lora import eligible_modules

        pool = list(candidates) if candidates is not None else list(eligible_modules(module))
        candidates = apply_module_filters(pool, only_if_contains, ignore_if_contains, name_forms, warn)
        only_if_contains = ignore_if_contains = None
    common: dict[str, Any] = dict(
        linear_rank=linear_rank,
        linear_alpha=linear_alpha,
        conv_rank=conv_rank,
        conv_alpha=conv_alpha,
        dropout=dropout,
        only_if_contains=only_if_contains,
        ignore_if_contains=ignore_if_contains,
        candidates=candidates,
        adapter_name=adapter_name,
        seed=seed,
        dtype=dtype,
    )
    if algo in ("lokr", "loha"):
        from aitk.networks.lycoris import inject_lycoris

        return inject_lycoris(module, algo=algo, lokr_factor=lokr_factor, lokr_full_rank=lokr_full_rank, **common)
    return inject_network(module, use_dora=algo == "dora", **common)


def adapter_name_forms(adapter: Any) -> NameForms:
    """How users write a denoiser module path: with the diffusers component prefix
    (`transformer.` / `unet.`) or as its LoRA key stem (kohya `lora_unet_...`, ComfyUI's WAN names)."""

    def forms(name: str) -> tuple[str, str]:
        return f"{adapter.diffusers_lora_prefix}.{name}", adapter.lora_key_stem(name)

    return forms


def build_expert_networks(
    adapter: Any, net_cfg: Any, *, seed: int, warn: Callable[[str], None] = lambda _m: None
) -> dict[str, NetworkHandle]:
    """The job's `network:` section on each expert the adapter trains: one network per expert
    (keyed by expert name for multi-expert models, `SINGLE` otherwise). ValueError when the
    settings select nothing or do not combine; `warn` gets filter entries that ignore nothing."""
    from aitk.networks.group import SINGLE

    said: set[str] = set()

    def warn_once(message: str) -> None:  # each expert would say it again
        if message not in said:
            said.add(message)
            warn(message)

    experts = adapter.experts()
    networks: dict[str, NetworkHandle] = {}
    for expert in adapter.trained_experts():
        networks[expert if len(experts) > 1 else SINGLE] = build_network(
            experts[expert],
            network_type=net_cfg.type,
            dora=net_cfg.dora,
            linear_rank=net_cfg.linear_rank,
            linear_alpha=net_cfg.linear_alpha_value,
            conv_rank=net_cfg.conv_rank,
            conv_alpha=net_cfg.conv_alpha_value,
            dropout=net_cfg.dropout,
            only_if_contains=net_cfg.network_kwargs.only_if_contains,
            ignore_if_contains=net_cfg.network_kwargs.ignore_if_contains,
            candidates=adapter.network_candidates(net_cfg.conv_rank is not None),
            seed=seed,
            lokr_factor=net_cfg.lokr_factor,
            lokr_full_rank=net_cfg.lokr_full_rank,
            name_forms=adapter_name_forms(adapter),
            warn=warn_once,
        )
    return networks
