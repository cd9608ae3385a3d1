"""Maps `model.arch` to its adapter module, imported only when a job needs it."""

from __future__ import annotations

import importlib

import torch

from aitk.config.schema import ModelConfig
from aitk.models.archs import ADAPTERS as _ADAPTERS, supported_archs
from aitk.models.base import ModelAdapter



class UnknownArchitectureError(ValueError):
    pass


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
