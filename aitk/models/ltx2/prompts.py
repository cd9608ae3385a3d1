"""LTX-2 prompt embeddings: the real tokens kept, the pipeline's left padding restored for use.

LTX2Pipeline pads every prompt on the left to max_sequence_length tokens (1024) and stacks all of
Gemma 3's hidden states per token (49 x 3840 values for the real model). The connectors mask the
padding, so only the real tokens matter: they are kept front-aligned with a bool "mask" (what
caches and batches hold, PromptEmbeds.cat right-pads them), and put back on the right end of a
zero-padded sequence of the pipeline's length whenever the connectors read them.
"""

from __future__ import annotations

from typing import Any

import torch

from aitk.models.base import PromptEmbeds


def real_tokens(embeds: torch.Tensor, mask: torch.Tensor) -> PromptEmbeds:
    """Left-padded pipeline embeddings (B, L, D) and their mask (B, L) -> PromptEmbeds of the real
    tokens only, front-aligned (B, longest, D) with a bool "mask"."""
    keep = mask.bool()
    counts = keep.sum(dim=1)
    longest = max(1, int(counts.max()))
    hidden = embeds.new_zeros(embeds.shape[0], longest, embeds.shape[-1])
    out_mask = torch.zeros(embeds.shape[0], longest, dtype=torch.bool, device=embeds.device)
    for i in range(embeds.shape[0]):
        n = int(counts[i])
        hidden[i, :n] = embeds[i][keep[i]]
        out_mask[i, :n] = True
    return PromptEmbeds(hidden, {"mask": out_mask})


def left_padded(cond: PromptEmbeds, length: int, device: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (B, length, D), mask (B, length) int64) as the pipeline's encode_prompt gives them:
    each prompt's real tokens at the right end, zeros and mask 0 before them. Fake tensors (the
    plan's example prompts, made full length) have no values to index: they are used as given."""
    from torch._subclasses.fake_tensor import is_fake

    hidden = cond.hidden_states.to(device, dtype)
    mask = cond.extra.get("mask")
    if mask is None or is_fake(mask) or is_fake(hidden):
        full = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return hidden, full
    mask = mask.to(device).bool()
    counts = mask.sum(dim=1)
    if int(counts.max()) > length:
        raise ValueError(f"a prompt of {int(counts.max())} tokens is longer than max_sequence_length {length}")
    out = hidden.new_zeros(hidden.shape[0], length, hidden.shape[-1])
    out_mask = torch.zeros(hidden.shape[0], length, dtype=torch.long, device=hidden.device)
    for i in range(hidden.shape[0]):
        n = int(counts[i])
        if n:
            out[i, length - n:] = hidden[i][mask[i]]
            out_mask[i, length - n:] = 1
    return out, out_mask
