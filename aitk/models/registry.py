"""Maps `model.arch` to its adapter module, imported only when a job needs it."""

from __future__ import annotations

import importlib

import torch

from aitk.config.schema import ModelConfig
from aitk.models.base import ModelAdapter

# arch key -> "module:Class"; modules are imported lazily so a job loads only its own family.
_ADAPTERS: dict[str, str] = {
    "sd1": "aitk.models.sd15:SD15Adapter",
    "sd15": "aitk.models.sd15:SD15Adapter",
    "sd2": "aitk.models.sd15:SD15Adapter",
}


class UnknownArchitectureError(ValueError):
    pass


def supported_archs() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_class(arch: str) -> type[ModelAdapter]:
    try:
        target = _ADAPTERS[arch]
    except KeyError:
        raise UnknownArchitectureError(
            f"model.arch: {arch!r} is not supported in this version; use one of {', '.join(supported_archs())}"
        ) from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def create_adapter(model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> ModelAdapter:
    return adapter_class(model_cfg.resolved_arch)(model_cfg, device, dtype)
