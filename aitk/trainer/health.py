"""Gradient stability for optimizers that do not report it: the share of trainable elements whose
gradient sign equals the previous step's (of the same expert), weighted by element count.

The previous signs are int8 tensors (one per parameter) kept per expert and saved with the
checkpoint, so a resumed run reports exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import torch


class GradientSignTracker:
    def __init__(self) -> None:
        self._previous: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def update(self, expert: str, named_grads: dict[str, torch.Tensor | None]) -> float | None:
        """Record this step's gradient signs; returns the agreement with the previous step's, or
        None on the expert's first step. A missing gradient counts as zeros."""
        previous = self._previous.get(expert)
        current: dict[str, torch.Tensor] = {}
        agree, total = 0, 0
        for name, grad in named_grads.items():
            if grad is None:
                continue
            signs = torch.sign(grad.detach()).to(torch.int8)
            current[name] = signs
            if previous is not None and name in previous:
                agree += int((signs == previous[name].to(signs.device)).sum().item())
                total += signs.numel()
        self._previous[expert] = {k: v.cpu() for k, v in current.items()}
        if previous is None or total == 0:
            return None
        return agree / total

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {e: {k: v.clone() for k, v in signs.items()} for e, signs in self._previous.items()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]] | None) -> None:
        self._previous = {e: {k: v.to(torch.int8) for k, v in signs.items()} for e, signs in (state or {}).items()}
