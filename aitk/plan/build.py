"""A model's parts at their real size with no storage.

Parts are built from their configs on the meta device (diffusers' / transformers' own classes,
`from_config`), cast to the job's dtypes and wrapped by the job's network there, then every
parameter and buffer is replaced by a fake tensor (torch._subclasses.fake_tensor) of the same
shape, dtype and requires_grad, so that a training step can run through the real code with real
kernel choices (e.g. the CPU flash-attention path of scaled_dot_product_attention; on the meta
device it would take the math path and materialise the attention matrix). Quantization runs
torchao itself on the fake weights, so the bytes counted are those of the formats torchao really
stores (scales and zero points included).

Why not build under FakeTensorMode directly: Module.to() on fake parameters swaps tensors and
fails (peft moves its new layers with .to()), so structure and casts happen on meta first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from aitk.plan.errors import PlanInputError
from aitk.plan.sources import PartSpec

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_on_meta(part: PartSpec) -> nn.Module:
    """The part's model class built from its config on the meta device (no memory, no init cost)."""
    import importlib

    if part.library not in ("diffusers", "transformers"):
        raise PlanInputError(
            f"{part.name}: library {part.library!r} is not one aitk plan can build (diffusers or transformers)"
        )
    library = importlib.import_module(part.library)
    cls = getattr(library, part.class_name, None)
    if cls is None:
        raise PlanInputError(
            f"{part.name}: class {part.class_name!r} is not in {part.library} {library.__version__}; "
            "give a model whose parts this version supports"
        )
    config = {k: v for k, v in part.config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            if part.library == "diffusers":
                return cls.from_config(config)
            return cls(cls.config_class.from_dict(config))
    except Exception as exc:  # a config the class rejects: wrong keys or values
        raise PlanInputError(
            f"{part.name}: its config.json does not build a {part.class_name} ({type(exc).__name__}: {exc}); "
            "give the model's own config"
        ) from None


def cast(module: nn.Module, dtype: torch.dtype, keep_fp32: bool = False) -> nn.Module:
    """Cast floating weights to `dtype`; with `keep_fp32`, the modules the class names in
    `_keep_in_fp32_modules` stay float32 (what diffusers' from_pretrained(torch_dtype=) does)."""
    from diffusers.utils import logging as diffusers_logging

    # diffusers logs a warning on every cast of a class that names fp32 modules; the cast here is
    # the adapters' own (they cast after loading), so the warning says nothing to a plan's reader
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        module.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    if keep_fp32 and keep and dtype != torch.float32:
        for name, param in module.named_parameters():
            if any(k in name.split(".") for k in keep):
                param.data = param.data.to(torch.float32)
    return module


def materialize_fake(module: nn.Module, fake_mode: Any) -> None:
    """Replace every parameter and buffer by a fake tensor of the same shape, dtype and
    requires_grad (device: the CPU, whose kernels the step then runs)."""
    with fake_mode:
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None:
                    sub._parameters[name] = nn.Parameter(
                        torch.empty(param.shape, dtype=param.dtype), requires_grad=param.requires_grad
                    )
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None:
                    sub._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)


def quantize_fake(module: nn.Module, qtype: str | None, fake_mode: Any) -> None:
    """Quantize the frozen Linear layers with the trainer's own torchao path, on fake weights.

    Layers inside peft adapters (the network) stay as they are; parameters that were trainable
    before stay trainable (quantize_frozen freezes everything it sees).
    """
    from aitk.models.quantize import QuantizeError, quantize_frozen

    trainable = [p for p in module.parameters() if p.requires_grad]
    try:
        with fake_mode:
            quantize_frozen(module, qtype)
    except (QuantizeError, ImportError) as exc:
        raise PlanInputError(str(exc)) from None
    for param in trainable:
        param.requires_grad_(True)


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (quantized subclasses: their inner tensors)."""
    from torch.distributed._tools.common_utils import get_untyped_storages

    seen: dict[int, int] = {}
    for tensor in tensors:
        for storage in get_untyped_storages(tensor):
            seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def frozen_bytes(module: nn.Module) -> int:
    """Bytes of the module's frozen parameters and its buffers: the weights a device holds."""
    frozen = [p for p in module.parameters() if not p.requires_grad]
    return storage_bytes(frozen + list(module.buffers()))


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
