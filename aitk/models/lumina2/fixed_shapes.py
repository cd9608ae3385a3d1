"""Lumina 2's training step with shapes known before the data: for `aitk plan` only.

diffusers' Lumina 2 rotary embedding reads each prompt's token count from the attention mask
(`mask.sum().tolist()`) to lay out the joint sequence; fake tensors (weights-free planning) have no
values to read. The plan takes every prompt at the full padded length, the longest sequence and so
the most memory a batch of that shape can take.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from diffusers.models.transformers.transformer_lumina2 import Lumina2RotaryPosEmbed

_ORIGINAL_FORWARD = Lumina2RotaryPosEmbed.forward


class _FullLengthMask:
    """Stands in for the mask in the embedder, which reads only its shape and per-row sums."""

    def __init__(self, shape: torch.Size) -> None:
        self.shape = shape

    def sum(self, dim: int) -> SimpleNamespace:
        lengths = [int(self.shape[1])] * int(self.shape[0])
        return SimpleNamespace(tolist=lambda: lengths)


def _full_length_forward(self: Lumina2RotaryPosEmbed, hidden_states: torch.Tensor, attention_mask: torch.Tensor):
    if any(freqs.is_meta for freqs in self.freqs_cis):
        # the rotary tables are plain attributes, not buffers, so the weights-free model holds them
        # on the meta device; inside the plan's fake mode, empty tensors of their shape stand in
        self.freqs_cis = [torch.empty(freqs.shape, dtype=freqs.dtype) for freqs in self.freqs_cis]
    return _ORIGINAL_FORWARD(self, hidden_states, _FullLengthMask(attention_mask.shape))


@contextmanager
def full_length_prompts() -> Iterator[None]:
    """Lay every prompt out at its padded length while the plan traces a step."""
    Lumina2RotaryPosEmbed.forward = _full_length_forward
    try:
        yield
    finally:
        Lumina2RotaryPosEmbed.forward = _ORIGINAL_FORWARD
