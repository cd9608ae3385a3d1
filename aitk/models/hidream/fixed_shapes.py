"""HiDream's training step with shapes known before the data: for `aitk plan` only.

In training mode diffusers' mixture-of-experts feed-forward sends each token to its top-k experts
by boolean masks, so how many rows each expert runs is known only from the router's output, which
fake tensors (weights-free planning) do not have. Every token still runs through exactly k experts,
so the step's memory depends on the total rows, not on how the router splits them: the plan runs
the same ops on an even split.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU


def _even_split_forward(self: MOEFeedForwardSwiGLU, x: torch.Tensor) -> torch.Tensor:
    if not self.training or self._force_inference_output:
        return _ORIGINAL_FORWARD(self, x)
    dtype, identity, shape = x.dtype, x, x.shape
    _, topk_weight, _ = self.gate(x)
    rows = x.reshape(-1, shape[-1]).repeat_interleave(self.num_activated_experts, dim=0)
    per_expert, extra = divmod(rows.shape[0], len(self.experts))
    sizes = [per_expert + (1 if i < extra else 0) for i in range(len(self.experts))]
    # clone: the masked gather of the real routing copies each expert's rows
    outputs = [expert(chunk.clone()).to(dtype) for expert, chunk in zip(self.experts, rows.split(sizes))]
    y = torch.cat(outputs)
    y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1).view(*shape).to(dtype)
    return y + self.shared_experts(identity)


_ORIGINAL_FORWARD = MOEFeedForwardSwiGLU.forward


@contextmanager
def even_expert_routing() -> Iterator[None]:
    """Route tokens evenly over the experts while the plan traces a step."""
    MOEFeedForwardSwiGLU.forward = _even_split_forward
    try:
        yield
    finally:
        MOEFeedForwardSwiGLU.forward = _ORIGINAL_FORWARD
