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
}
DEFAULT_QTYPE = "qfloat8"  # ai-toolkit's default


class QuantizeError(ValueError):
    pass


def _linear_count(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if isinstance(m, nn.Linear))


def quantize_frozen(module: nn.Module, qtype: str | None) -> int:
    """Quantize every Linear weight of `module` in place; returns how many were quantized."""
    from aitk.extras import import_extra

    name = (qtype or DEFAULT_QTYPE).lower()
    if name not in QTYPES:
        raise QuantizeError(
            f"model.qtype: {qtype!r} is not supported; use one of {', '.join(sorted(QTYPES))}"
        )
    torchao = import_extra("torchao.quantization", needed_for="model.quantize", pip_spec="torchao==0.18.0")
    count = _linear_count(module)
    config = getattr(torchao, QTYPES[name])()
    torchao.quantize_(module, config)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return count
