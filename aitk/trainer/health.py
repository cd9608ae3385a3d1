"""Training health: gradient stability and the alpha schedule, step by step.

Gradient stability for optimizers that do not report it: the share of trainable elements whose
gradient sign equals the previous step's (of the same expert), weighted by element count.

The previous signs are int8 tensors (one per parameter) kept per expert and saved with the
checkpoint, so a resumed run reports exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


# A LoRA has far fewer elements; a full fine-tune is sampled (a fixed stride per tensor), so the
# kept signs and their copy in each checkpoint stay small whatever the model size.
MAX_TRACKED_ELEMENTS = 1 << 20


class GradientSignTracker:
    def __init__(self, max_elements: int = MAX_TRACKED_ELEMENTS) -> None:
        self._previous: dict[str, dict[str, torch.Tensor]] = {}
        self.max_elements = int(max_elements)

    @torch.no_grad()
    def update(self, expert: str, named_grads: dict[str, torch.Tensor | None]) -> float | None:
        """Record this step's gradient signs; returns the agreement with the previous step's, or
        None on the expert's first step. Tensors without a gradient are left out."""
        previous = self._previous.get(expert)
        current: dict[str, torch.Tensor] = {}
        agree, total = 0, 0
        present = [g for g in named_grads.values() if g is not None]
        stride = max(1, -(-sum(g.numel() for g in present) // self.max_elements))
        for name, grad in named_grads.items():
            if grad is None:
                continue
            signs = torch.sign(grad.detach().reshape(-1)[::stride]).to(torch.int8)
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


class TrainingHealth:
    """Per-step training health: gradient stability (from the optimizer when it reports it,
    else from gradient signs), its 50-step EMA, and the alpha schedule (applied live to the
    networks). Every process feeds it the same all-reduced numbers, so all agree on transitions."""

    def __init__(self, network: Any, network_cfg: Any, log: Callable[[str], None]) -> None:
        from aitk.schedule.alpha import AlphaScheduler

        self.network = network
        self.log = log
        experts = None if network.is_single else list(network)
        self.scheduler = AlphaScheduler.from_config(network_cfg, experts)
        self.signs = GradientSignTracker()
        self._ema: dict[str, Any] = {}
        if self.scheduler is not None:
            handles = [h for _, h in network.items()]
            has_conv = any(h.conv_module_names() for h in handles)
            has_linear = any(len(h.wrapped_module_names()) > len(h.conv_module_names()) for h in handles)
            for warning in self.scheduler.startup_warnings(has_conv, has_linear):
                log(f"warning: network.alpha_schedule: {warning}")
            for line in self.scheduler.describe():
                log(f"alpha schedule: {line}")
            self.apply_alphas()

    @staticmethod
    def _key(expert: str | None) -> str:
        return expert or "main"

    def apply_alphas(self, expert: str | None = None) -> None:
        """Set each network's alphas to what the schedule says now (one expert, or all)."""
        if self.scheduler is None:
            return
        for name, handle in self.network.items():
            key = None if self.network.is_single else name
            if expert is not None and key != expert:
                continue
            linear, conv = self.scheduler.alphas(key)
            handle.set_alphas(linear, conv)

    def sign_stability(self, expert: str | None, named_params: dict[str, Any]) -> float | None:
        """Gradient-sign agreement of this step's (synced, unscaled) gradients."""
        return self.signs.update(self._key(expert), {n: p.grad for n, p in named_params.items()})

    def after_step(self, expert: str | None, step: int, loss: float, stability: float | None) -> dict[str, Any]:
        """Record one optimizer step; returns the health fields of its metrics line."""
        from aitk.schedule.stats import StabilityEMA

        fields: dict[str, Any] = {"gradient_stability": stability}
        if self.scheduler is None:
            ema = self._ema.setdefault(self._key(expert), StabilityEMA())
            fields["gradient_stability_avg"] = ema.update(stability)
            fields["alpha_enabled"] = False
            return fields
        transition = self.scheduler.observe(expert, step, loss if math.isfinite(loss) else float("nan"), stability)
        fields.update(self.scheduler.metrics_fields(expert))
        if transition is not None:
            self.log(transition.banner())
            self.apply_alphas(expert)
            # the line describes the step as trained: the phase it ran in, with the statistics
            # that let it exit (the next line is the first of the new phase)
            fields.update({
                "phase": transition.from_phase,
                "phase_idx": fields["phase_idx"] - 1,
                "steps_in_phase": transition.steps_in_phase,
                "linear_alpha": transition.old_linear,
                "conv_alpha": transition.old_conv,
                **{k: transition.stats.get(k) for k in ("loss_slope", "loss_r2", "loss_cv", "loss_samples")},
            })
        return fields

    def state_dict(self) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
        """(JSON part for trainer_state.json, tensors for health.pt)."""
        json_part = {
            "stability_ema": {k: v.state_dict() for k, v in self._ema.items()},
            "alpha_scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }
        return json_part, self.signs.state_dict()

    def load_state_dict(self, json_part: dict[str, Any] | None, signs: dict | None) -> None:
        from aitk.schedule.stats import StabilityEMA

        json_part = json_part or {}
        self._ema = {}
        for key, state in (json_part.get("stability_ema") or {}).items():
            ema = StabilityEMA()
            ema.load_state_dict(state)
            self._ema[key] = ema
        saved = json_part.get("alpha_scheduler")
        if self.scheduler is not None and saved:
            self.scheduler.load_state_dict(saved)
            for warning in getattr(self.scheduler, "load_warnings", []):
                self.log(f"warning: alpha schedule: {warning}")
            self.apply_alphas()
        self.signs.load_state_dict(signs)
