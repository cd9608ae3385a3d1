"""Weight-only quantization of the frozen base model (model.quantize / qtype) through torchao.

The denoiser's Linear weights are stored in int8 or float8 and dequantized on the fly; the
network added afterwards trains in full precision on top (quantize first: wrapping a module and
then quantizing its base weight breaks the backward pass). Previews use the same quantized base.
"""

from __future__ import annotations

from torch import nn

# ai-toolkit / optimum-quanto spellings -> torchao config class names
QTYPES: dict[str, str] = {
    "int8": "Int8WeightOnlyConfig",
    "qint8": "Int8WeightOnlyConfig",
    "float8": "Float8WeightOnlyConfig",
    "qfloat8": "Float8WeightOnlyConfig",
    "fp8": "Float8WeightOnlyConfig",
    "float8_e4m3fn": "Float8WeightOnlyConfig",
    # 4-bit: torchao's generic int-x weight-only kernel (runs on CPU and GPU)
    "uint4": "IntxWeightOnlyConfig",
    "int4": "IntxWeightOnlyConfig",
    "qint4": "IntxWeightOnlyConfig",
}
DEFAULT_QTYPE = "qfloat8"  # ai-toolkit's default


class QuantizeError(ValueError):
    pass


def _linear_count(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if isinstance(m, nn.Linear))


def split_qtype(qtype: str | None) -> tuple[str, str | None]:
    """ai-toolkit's "uint4|<accuracy recovery adapter>" -> ("uint4", adapter); plain -> (qtype, None)."""
    name, _, adapter = (qtype or DEFAULT_QTYPE).partition("|")
    return name.strip().lower(), adapter.strip() or None


def quantize_frozen(module: nn.Module, qtype: str | None) -> int:
    """Quantize every Linear weight of `module` in place; returns how many were quantized.
    An accuracy-recovery adapter after "|" is not applied (the caller warns)."""
    import torch

    from aitk.extras import import_extra

    name, _ = split_qtype(qtype)
    if name not in QTYPES:
        raise QuantizeError(
            f"model.qtype: {qtype!r} is not supported; use one of {', '.join(sorted(QTYPES))}"
        )
    torchao = import_extra("torchao.quantization", needed_for="model.quantize", pip_spec="torchao==0.18.0")
    count = _linear_count(module)
    config_class = getattr(torchao, QTYPES[name])
    config = config_class(weight_dtype=torch.int4) if QTYPES[name] == "IntxWeightOnlyConfig" else config_class()
    torchao.quantize_(module, config)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return count
