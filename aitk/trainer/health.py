"""Training health: gradient stability and the alpha schedule, step by step.

Gradient stability for optimizers that do not report it: the share of trainable elements whose
gradient sign equals the previous step's (of the same expert), weighted by element count.

The previous signs are int8 tensors (one per parameter) kept per expert and saved with the
checkpoint, so a resumed run reports exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch._utils import _flatten_dense_tensors


# A LoRA has far fewer elements; a full fine-tune is sampled (a fixed stride per tensor), so the
# kept signs and their copy in each checkpoint stay small whatever the model size.
MAX_TRACKED_ELEMENTS = 1 << 20


@dataclass
class KeptSigns:
    """One expert's gradient signs as one flat int8 vector on the device, and its layout: the
    (name, element count) of each tensor in order. One vector makes a step's measure a handful of
    ops whatever the number of tensors."""

    layout: tuple[tuple[str, int], ...]
    flat: torch.Tensor

    def by_name(self) -> dict[str, torch.Tensor]:
        sizes = [n for _, n in self.layout]
        return {name: part for (name, _), part in zip(self.layout, torch.split(self.flat, sizes))}


@dataclass
class SignMeasure:
    """One step's gradient signs (on the device) and their agreement with the previous step's
    (a 0-dim tensor on the device, None on the expert's first step): read by the step's one host
    sync, kept (`GradientSignTracker.commit`) only when the update is applied."""

    expert: str
    signs: KeptSigns
    agreement: torch.Tensor | None


class GradientSignTracker:
    def __init__(self, max_elements: int = MAX_TRACKED_ELEMENTS) -> None:
        self._previous: dict[str, KeptSigns] = {}  # on the device the gradients are on
        self._plans: dict[tuple, tuple[int, tuple[tuple[str, int], ...]]] = {}  # (names, sizes) -> stride, layout
        self.max_elements = int(max_elements)

    @torch.no_grad()
    def measure(self, expert: str, named_grads: dict[str, torch.Tensor | None]) -> SignMeasure:
        """This step's signs and their agreement with the kept ones, without a host sync.
        Tensors without a gradient are left out."""
        present = {name: grad for name, grad in named_grads.items() if grad is not None}
        if not present:
            return SignMeasure(expert, KeptSigns((), torch.zeros(0, dtype=torch.int8)), None)
        grads = list(present.values())
        device = grads[0].device
        key = (tuple(present), tuple(g.numel() for g in grads))
        plan = self._plans.get(key)
        if plan is None:  # the same tensors every step of a run: stride and layout are worked out once
            stride = max(1, -(-sum(key[1]) // self.max_elements))
            layout = tuple((name, len(range(0, n, stride))) for name, n in zip(*key))
            plan = self._plans[key] = (stride, layout)
        stride, layout = plan
        if stride == 1 and all(g.device == device for g in grads):
            # one call for every tensor (a slice and copy per tensor took 4x the host time); a lone
            # tensor comes back as a view of its gradient, hence the sign() out of place
            flat = _flatten_dense_tensors(grads)
        else:
            flat = torch.cat([g.detach().reshape(-1)[::stride].to(device) for g in grads])
        signs = KeptSigns(layout, flat.sign().to(torch.int8))
        previous = self._previous.get(expert)
        if previous is None:
            return SignMeasure(expert, signs, None)
        if previous.layout == layout:  # every step but the first after a change of tensors
            return SignMeasure(expert, signs, signs.flat.eq(previous.flat.to(device)).float().mean())
        before, now = previous.by_name(), signs.by_name()
        shared = [n for n in now if n in before and before[n].numel() == now[n].numel()]
        if not shared:
            return SignMeasure(expert, signs, None)
        same = torch.cat([now[n] for n in shared]).eq(torch.cat([before[n].to(device) for n in shared]))
        return SignMeasure(expert, signs, same.float().mean())  # weighted by element count

    def commit(self, measured: SignMeasure) -> None:
        self._previous[measured.expert] = measured.signs

    def update(self, expert: str, named_grads: dict[str, torch.Tensor | None]) -> float | None:
        """measure + commit, read on the host: the agreement, or None on the expert's first step."""
        measured = self.measure(expert, named_grads)
        self.commit(measured)
        return None if measured.agreement is None else float(measured.agreement)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per expert, per tensor name (the checkpoint's health.pt format)."""
        return {e: {k: v.to("cpu", copy=True) for k, v in kept.by_name().items()} for e, kept in self._previous.items()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]] | None) -> None:
        self._previous = {}
        for expert, signs in (state or {}).items():
            if signs:
                layout = tuple((k, v.numel()) for k, v in signs.items())
                self._previous[expert] = KeptSigns(layout, torch.cat([v.reshape(-1).to(torch.int8) for v in signs.values()]))


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

    def measure_signs(self, expert: str | None, named_params: dict[str, Any]) -> SignMeasure:
        """Gradient-sign agreement of this step's (synced, unscaled) gradients, on the device;
        `self.signs.commit(...)` keeps the signs once the update is applied."""
        return self.signs.measure(self._key(expert), {n: p.grad for n, p in named_params.items()})

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
