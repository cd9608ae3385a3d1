"""Bytes of optimizer state per trainable tensor, by train.optimizer (aitk.optim.factory).

Counted from each library's state layout rather than by running the optimizer, because some
(bitsandbytes' AdamW8bit) run native kernels that fake tensors cannot go through.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

BNB_BLOCK = 2048  # bitsandbytes' blockwise 8-bit state: one fp32 absmax per block of 2048 values
FP32 = 4


def _factored(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(rows, cols) of Adafactor / Automagic's factored second moment; None for vectors."""
    if len(shape) < 2:
        return None
    return shape[0], math.prod(shape[1:])


def state_bytes(optimizer: str, shape: tuple[int, ...], element_size: int) -> int:
    """Optimizer state of one trainable tensor of `shape` whose elements take `element_size`."""
    n = math.prod(shape)
    name = optimizer.lower()
    if name in ("adamw", "adam"):
        return 2 * n * element_size  # exp_avg, exp_avg_sq, in the parameter's dtype
    if name == "adamw8bit":
        # two uint8 states + an fp32 absmax per block each (tensors under 4096 values stay 32-bit)
        if n < 4096:
            return 2 * n * FP32
        return 2 * (n + FP32 * math.ceil(n / BNB_BLOCK))
    if name == "prodigy":
        return 4 * n * element_size  # exp_avg, exp_avg_sq, s, p0
    if name == "lion":
        return n * element_size  # exp_avg
    if name == "sgd":
        return 0  # no momentum unless optimizer_params sets it (see momentum_bytes)
    if name == "adafactor":
        matrix = _factored(shape)
        return FP32 * (sum(matrix) if matrix else n)
    if name == "automagic":
        matrix = _factored(shape)
        second = FP32 * (sum(matrix) if matrix else n)
        return n * 2 + n * 1 + second  # lr_code int16, sign int8, second moment
    raise ValueError(f"unknown optimizer {optimizer!r}")


def total_state_bytes(optimizer: str, tensors: Iterable[tuple[tuple[int, ...], int]], momentum: float = 0.0) -> int:
    """Sum over (shape, element_size) of the trainable tensors; SGD with momentum keeps a buffer."""
    total = 0
    for shape, size in tensors:
        total += state_bytes(optimizer, shape, size)
        if optimizer.lower() == "sgd" and momentum:
            total += math.prod(shape) * size
    return total
