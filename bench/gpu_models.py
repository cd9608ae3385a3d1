"""Random-init models at real size, built from the configs `aitk plan` ships, with no download.

`empty_part` builds a part's diffusers class from its config with parameters on the meta
device (accelerate's init_empty_weights: no memory, no init cost; buffers such as rotary
tables are computed as usual). `random_weights` then gives every parameter host storage in its
training dtype and fills it with scaled random values by copying slices of one random pool
(filling 28 GB with torch.randn would take minutes on the host; copies run at memory speed).
Never fp32 at 12-14B: weights are made directly in the dtype the adapters load them in.

Each case gets fresh modules whose parameters are the same host tensors (`module_from_weights`,
load_state_dict(assign=True)): placement, quantization and the network change the case's
modules, never the shared host weights, so one fill serves every case of a model.

`random_adapter` is `ModelAdapter.load()` for these modules: the job's adapter class bound
(`ModelAdapter.bind`) to the denoisers and VAE with the shipped part configs, so it derives the
same facts `load()` would (the adapter's default scheduler: the plan ships no scheduler configs).
Text encoders are not built: the benchmark feeds random prompt embeddings of the real shape
(`ModelAdapter.example_batch`).
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from torch import nn

#: elements in the random pool parameters are filled from (at most; tiny models need less)
POOL_SIZE = 1 << 22


def keeps_fp32(arch: str) -> bool:
    """Whether `arch`'s adapter loads with torch_dtype, so diffusers keeps the modules its class
    names in fp32 (the parts are built the same way)."""
    from aitk.models.registry import adapter_class

    return adapter_class(arch).keeps_fp32_modules


def empty_part(part: Any, dtype: torch.dtype, keep_fp32: bool = False) -> nn.Module:
    """The part's class from its config (aitk.plan.sources.PartSpec), parameters on meta in
    `dtype`, as the adapters load it (from_pretrained(torch_dtype=...)): with `keep_fp32` the
    modules the class names in `_keep_in_fp32_modules` stay float32, and buffers (rotary tables)
    keep the dtype they were computed in."""
    import importlib

    from accelerate import init_empty_weights

    cls = getattr(importlib.import_module(part.library), part.class_name)
    config = {k: v for k, v in part.config.items() if not k.startswith("_")}
    with init_empty_weights(include_buffers=False):
        module = cls.from_config(config) if part.library == "diffusers" else cls(cls.config_class.from_dict(config))
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ()) if keep_fp32 else set()
    for name, param in module.named_parameters():
        wanted = torch.float32 if keep and keep.intersection(name.split(".")) else dtype
        if param.is_floating_point() and param.dtype != wanted:
            param.data = param.data.to(wanted)  # on meta: no memory, no time
    module.requires_grad_(False)
    return module


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class RandomPool:
    """Slices of one N(0, 1) pool, scaled and cast per (dtype, scale), at random offsets."""

    def __init__(self, seed: int = 0, size: int = POOL_SIZE) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.base = torch.randn(size, generator=generator)
        self.offsets = random.Random(seed)
        self._scaled: dict[tuple[torch.dtype, float], torch.Tensor] = {}

    def source(self, dtype: torch.dtype, scale: float) -> torch.Tensor:
        key = (dtype, round(scale, 8))
        if key not in self._scaled:
            self._scaled[key] = (self.base * scale).to(dtype)
        return self._scaled[key]

    def fill(self, tensor: torch.Tensor, scale: float) -> None:
        flat = tensor.view(-1)
        source = self.source(tensor.dtype, scale)
        size, done, total = source.numel(), 0, flat.numel()
        while done < total:
            start = self.offsets.randrange(size)
            n = min(size - start, total - done)
            flat[done:done + n].copy_(source[start:start + n])
            done += n


def init_scale(name: str, shape: torch.Size) -> float | None:
    """What a parameter is filled with: None = its constant (biases 0, 1-D norm scales 1),
    else the std of N(0, 1/fan_in), which keeps activations finite through deep stacks."""
    if len(shape) <= 1:
        return None
    fan_in = math.prod(shape[1:])
    return 1.0 / math.sqrt(max(fan_in, 1))


def random_weights(module: nn.Module, pool: RandomPool) -> dict[str, torch.Tensor]:
    """Give every (meta) parameter of `module` host storage filled with random values; returns
    the state dict (the host weights every case of the model shares)."""
    with torch.no_grad():
        for owner_name, owner in module.named_modules():
            for name, param in list(owner._parameters.items()):
                if param is None:
                    continue
                tensor = torch.empty(param.shape, dtype=param.dtype, device="cpu")
                scale = init_scale(name, param.shape)
                if scale is not None:
                    pool.fill(tensor, scale)
                else:
                    tensor.fill_(0.0 if name == "bias" else 1.0)
                owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    return module.state_dict()


def module_from_weights(part: Any, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                        keep_fp32: bool = False) -> nn.Module:
    """A fresh module of `part` whose parameters are the tensors in `weights` (shared, no copy)."""
    module = empty_part(part, dtype, keep_fp32)
    module.load_state_dict(weights, strict=True, assign=True)
    module.requires_grad_(False)
    return module


def built_parts(spec: Any) -> list[str]:
    """The parts the benchmark builds: the denoisers (each expert) and the VAE (placed and
    parked like the trainer's, since latents are cached). Text encoders are left out."""
    return [*spec.denoisers, *(["vae"] if "vae" in spec.parts else [])]


def part_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if name == "vae" else dtype  # the VAE stays fp32 in every adapter


def host_weights(spec: Any, arch: str, dtype: torch.dtype, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """part name -> random host weights of that part (see the module docstring)."""
    modules = {
        name: empty_part(spec.parts[name], part_dtype(name, dtype), keeps_fp32(arch) and name != "vae")
        for name in built_parts(spec)
    }
    largest = max((p.numel() for m in modules.values() for p in m.parameters()), default=1)
    pool = RandomPool(seed, size=max(4096, min(POOL_SIZE, largest)))
    return {name: random_weights(module, pool) for name, module in modules.items()}


def random_adapter(process: Any, spec: Any, weights: dict[str, dict[str, torch.Tensor]],
                   device: torch.device, dtype: torch.dtype, tokenizer_lengths: dict[str, int]) -> Any:
    """The job's adapter holding fresh modules over the shared host weights, as after `load()`:
    on the host in the training dtype (VAE fp32), frozen, ready for aitk.trainer.placing."""
    from aitk.models.registry import adapter_class

    arch = process.model.resolved_arch
    adapter = adapter_class(arch)(process.model, device, dtype)
    modules = {
        name: module_from_weights(spec.parts[name], weights[name], part_dtype(name, dtype),
                                  keeps_fp32(arch) and name != "vae")
        for name in built_parts(spec)
    }
    adapter.bind(modules, spec.configs(tokenizer_lengths))
    return adapter
