"""Weight-only quantization of the frozen base model (model.quantize / qtype) through torchao.

The denoiser's Linear weights are stored in 8, 4, 3 or 2 bits (or float8) and dequantized on the
fly; the network added afterwards trains in full precision on top (quantize first: wrapping a
module and then quantizing its base weight breaks the backward pass). Previews use the same
quantized base.

qtype names are ai-toolkit's: qint8 / qfloat8 (optimum-quanto spellings, same storage here),
int8 / float8, and uint2 ... uint8 (torchao's unsigned N-bit weights: asymmetric, one scale and
zero point per group of 64 input weights). "<qtype>|<LoRA file>" adds an accuracy-recovery
adapter (aitk.models.recovery): the layers it covers are stored in <qtype>, every other Linear in
uint8, the way ai-toolkit quantizes around its published adapters (they were trained to correct
exactly that quantization).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from torch import nn

#: the scheme of each qtype: "int8" / "float8" torchao configs, or N-bit affine (bits)
QTYPES: dict[str, str] = {
    "int8": "Int8WeightOnlyConfig",
    "qint8": "Int8WeightOnlyConfig",
    "float8": "Float8WeightOnlyConfig",
    "qfloat8": "Float8WeightOnlyConfig",
    "fp8": "Float8WeightOnlyConfig",
    "float8_e4m3fn": "Float8WeightOnlyConfig",
    # N-bit: torchao's generic int-x weight-only tensors (run on CPU and GPU)
    "uint2": "IntxWeightOnlyConfig",
    "uint3": "IntxWeightOnlyConfig",
    "uint4": "IntxWeightOnlyConfig",
    "uint5": "IntxWeightOnlyConfig",
    "uint6": "IntxWeightOnlyConfig",
    "uint7": "IntxWeightOnlyConfig",
    "uint8": "IntxWeightOnlyConfig",
    "int4": "IntxWeightOnlyConfig",
    "qint4": "IntxWeightOnlyConfig",
}
#: bits per weight of the N-bit qtypes
QTYPE_BITS: dict[str, int] = {f"uint{n}": n for n in range(2, 9)} | {"int4": 4, "qint4": 4}
DEFAULT_QTYPE = "qfloat8"  # ai-toolkit's default
#: what layers outside an accuracy-recovery adapter are stored in (no adapter corrects them)
UNCOVERED_QTYPE = "uint8"
#: input weights sharing one scale / zero point in the N-bit qtypes (torchao's uintx default)
GROUP_SIZE = 64


class QuantizeError(ValueError):
    pass


@dataclass(frozen=True)
class QuantizeReport:
    """What `quantize_frozen` did: Linear layers stored in the qtype, and in `UNCOVERED_QTYPE`."""

    quantized: int
    uncovered: int = 0


def _linear_count(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if isinstance(m, nn.Linear))


def split_qtype(qtype: str | None) -> tuple[str, str | None]:
    """ai-toolkit's "uint4|<accuracy recovery adapter>" -> ("uint4", adapter); plain -> (qtype, None)."""
    name, _, adapter = (qtype or DEFAULT_QTYPE).partition("|")
    return name.strip().lower(), adapter.strip() or None


def check_qtype(qtype: str | None) -> str:
    """The qtype's name (without an adapter); QuantizeError naming the choices when unknown."""
    name, _ = split_qtype(qtype)
    if name not in QTYPES:
        raise QuantizeError(
            f"model.qtype: {qtype!r} is not supported; use one of {', '.join(sorted(QTYPES))}"
        )
    return name


def _config_for(name: str, linear: nn.Linear, torchao: object) -> object:
    """The torchao config that stores this Linear's weight in qtype `name`."""
    import torch

    config_class = getattr(torchao, QTYPES[name])
    if name not in QTYPE_BITS:
        return config_class()
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    # a layer narrower than a group (tiny test models) gets one scale per output row
    in_features = linear.weight.shape[-1]
    granularity = PerGroup(GROUP_SIZE) if in_features % GROUP_SIZE == 0 else PerAxis(0)
    return config_class(
        weight_dtype=getattr(torch, f"int{QTYPE_BITS[name]}"),
        granularity=granularity,
        mapping_type=MappingType.ASYMMETRIC,
    )


def _adapter_weight_modules(module: nn.Module) -> set[int]:
    """ids of the Linear layers inside peft adapters already in `module` (an assistant LoRA's
    lora_A / lora_B): adapter weights stay in full precision, only base layers are quantized."""
    found: set[int] = set()
    for sub in module.modules():
        if hasattr(sub, "get_base_layer") and hasattr(sub, "active_adapters"):
            base = sub.get_base_layer()
            found.update(id(m) for m in sub.modules() if m is not sub and m is not base)
    return found


def quantize_frozen(
    module: nn.Module, qtype: str | None, *, covered: Collection[str] | None = None
) -> int:
    """Quantize every Linear weight of `module` in place; returns how many were quantized.

    `covered`: the module names an accuracy-recovery adapter wraps; those are stored in `qtype`,
    every other Linear in `UNCOVERED_QTYPE` (see `quantize_with_report`). None: all in `qtype`.
    """
    report = quantize_with_report(module, qtype, covered=covered)
    return report.quantized + report.uncovered


def quantize_with_report(
    module: nn.Module, qtype: str | None, *, covered: Collection[str] | None = None
) -> QuantizeReport:
    """`quantize_frozen` with the split between covered and uncovered layers."""
    from aitk.extras import import_extra

    name = check_qtype(qtype)
    torchao = import_extra("torchao.quantization", needed_for="model.quantize", pip_spec="torchao==0.18.0")
    wanted = set(covered) if covered is not None else None
    # configs are chosen per layer (group size depends on its width); one quantize_ call per kind
    by_config: dict[tuple[str, bool], list[str]] = {}
    adapter_parts = _adapter_weight_modules(module)
    for layer_name, layer in module.named_modules():
        if not isinstance(layer, nn.Linear) or id(layer) in adapter_parts:
            continue
        # a layer an adapter already wraps (FLUX's assistant LoRA) is named by its wrapper
        owner = layer_name.removesuffix(".base_layer")
        layer_qtype = name if wanted is None or owner in wanted else UNCOVERED_QTYPE
        grouped = layer.weight.shape[-1] % GROUP_SIZE == 0
        by_config.setdefault((layer_qtype, grouped), []).append(layer_name)
    counts = {name: 0, UNCOVERED_QTYPE: 0}
    for (layer_qtype, _), names in by_config.items():
        chosen = set(names)
        sample = module.get_submodule(names[0])
        torchao.quantize_(
            module,
            _config_for(layer_qtype, sample, torchao),
            filter_fn=lambda m, fqn, chosen=chosen: isinstance(m, nn.Linear) and fqn in chosen,
        )
        counts[layer_qtype] = counts.get(layer_qtype, 0) + len(names)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    if wanted is None or name == UNCOVERED_QTYPE:
        return QuantizeReport(quantized=sum(counts.values()))
    return QuantizeReport(quantized=counts[name], uncovered=counts[UNCOVERED_QTYPE])
