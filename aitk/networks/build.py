"""One entry point that injects the network a job's `network:` section asks for.

network.type -> what is injected:
- lora / locon: peft LoRA (kxk convs only with a conv rank); `dora: true` makes it DoRA
- dora: peft LoRA with DoRA (same as lora + dora: true)
- lokr / loha: peft LoKr / LoHa layers (aitk.networks.lycoris)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from aitk.networks.lora import NetworkHandle, inject_network

__all__ = ["NETWORK_TYPES", "network_algo", "build_network"]

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
) -> NetworkHandle:
    """Inject the network of this type into `module` in place; returns its handle.

    Arguments as in `inject_network`; `lokr_factor` / `lokr_full_rank` only matter for lokr.
    """
    algo = network_algo(network_type, dora)
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
