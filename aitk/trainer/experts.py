"""Which expert a step trains (WAN 2.2: high-noise and low-noise), and per-expert learning rates.

The active expert is a pure function of the step number, so a resumed run continues with the
same expert, at the same point of its `switch_boundary_every` steps, with nothing extra saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ExpertRotation:
    """Trained experts in alternation order; each trains `every` steps, then the next one."""

    experts: list[str] = field(default_factory=list)  # empty: a single-model run
    every: int | None = None  # train.switch_boundary_every (None = 1)

    def __post_init__(self) -> None:
        self.every = max(1, int(self.every or 1))

    def active(self, step: int) -> str | None:
        if not self.experts:
            return None
        return self.experts[(int(step) // self.every) % len(self.experts)]

    def describe(self) -> str:
        if len(self.experts) == 1:
            return f"training only the {self.experts[0]} expert"
        return f"training {' and '.join(self.experts)}, switching every {self.every} step(s)"


def expert_learning_rate(expert: str, default: float, optimizer_params: dict | None) -> float:
    """`<expert>_lr` from train.optimizer_params (high_noise_lr / low_noise_lr), else `default`."""
    value = (optimizer_params or {}).get(f"{expert}_lr")
    if value is None:
        return float(default)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"train.optimizer_params.{expert}_lr: {value!r} is not a number") from None


def expert_optimizer(network: Any, train_cfg: Any) -> Any:
    """The job's optimizer over `network` (a NetworkGroup): one parameter group per network, each
    with its expert's learning rate; automagic reads <expert>_min_lr / _max_lr / _lr_bump from
    the group's "expert"."""
    from aitk.networks.group import SINGLE
    from aitk.optim import build_optimizer

    lr = train_cfg.unet_lr if train_cfg.unet_lr is not None else train_cfg.lr
    groups = []
    for name in network:
        group = {
            "params": network.trainable_parameters(name),
            "lr": expert_learning_rate(name, lr, train_cfg.optimizer_params),
        }
        if name != SINGLE:
            group["expert"] = name
        groups.append(group)
    return build_optimizer(train_cfg.optimizer, groups, lr=lr, optimizer_params=train_cfg.optimizer_params)
