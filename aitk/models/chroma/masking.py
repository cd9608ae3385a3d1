"""Chroma's text attention mask, applied the same way in training, previews and under gradient
checkpointing.

Chroma masks T5's padding tokens in the transformer's joint attention, all but the first one
(lodestones' reference code; ChromaPipeline builds the same keep-mask: 1 for the prompt's tokens
and one pad token). Two diffusers 0.42 details would make that mask differ between places:

- ChromaPipeline hands the mask to the transformer as floats (0 / 1); PyTorch's SDPA adds a float
  mask to the attention logits instead of masking (diffusers issues #12116, #13619), so stock
  previews attend to every padding token. `preview_pipeline_class` gives a ChromaPipeline whose
  masks are boolean, so previews mask as training does.
- Under gradient checkpointing ChromaTransformer2DModel calls its single-stream blocks without the
  mask. `masked_checkpointing` hands the mask to those calls (and to their recomputation in
  backward), so a checkpointed step computes what an unchecked one does.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def joint_mask(text_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """(B, L + N) bool over the joint sequence (text tokens first): the text mask, then every image
    token (what ChromaPipeline._prepare_attention_mask builds, kept boolean)."""
    image = torch.ones(text_mask.shape[0], image_tokens, dtype=torch.bool, device=text_mask.device)
    return torch.cat([text_mask.to(torch.bool), image], dim=1)


@contextmanager
def masked_checkpointing(transformer: torch.nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """While open, checkpointed single-stream blocks of `transformer` get `mask` too.

    ChromaTransformer2DModel checkpoints a single block as func(block, hidden, temb, rotary): no
    mask. The wrapper passes the block with the mask bound in instead; checkpointing keeps that
    callable for the recomputation in backward, so it holds after this context closes.
    """
    from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock

    original = getattr(transformer, "_gradient_checkpointing_func", None)
    if original is None or not getattr(transformer, "gradient_checkpointing", False):
        yield
        return

    def with_mask(block: Any, *args: Any) -> Any:
        if isinstance(block, ChromaSingleTransformerBlock) and len(args) == 3:
            return original(functools.partial(block, attention_mask=mask), *args)
        return original(block, *args)

    transformer._gradient_checkpointing_func = with_mask
    try:
        yield
    finally:
        transformer._gradient_checkpointing_func = original


@functools.cache
def preview_pipeline_class() -> type:
    """ChromaPipeline with boolean text masks: padding masked in previews as in training."""
    from diffusers import ChromaPipeline

    class ChromaPreviewPipeline(ChromaPipeline):
        def _get_t5_prompt_embeds(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, mask = super()._get_t5_prompt_embeds(*args, **kwargs)
            return embeds, mask.to(torch.bool)

        def _prepare_attention_mask(self, batch_size: int, sequence_length: int, dtype: torch.dtype,
                                    attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
            if attention_mask is None:
                return None
            return joint_mask(attention_mask, sequence_length)

    return ChromaPreviewPipeline
