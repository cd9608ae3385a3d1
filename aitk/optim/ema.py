"""Exponential moving average of the trained parameters (train.ema_config)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

import torch


class NetworkEMA:
    """EMA of the trainable parameters (the LoRA network, or the model in a full fine-tune).

    The shadow copy is float32 on each parameter's device. Call update() after every
    optimizer.step(). The effective decay warms up like diffusers' EMAModel:
    min(decay, (1 + n) / (10 + n)), n = number of earlier updates.
    """

    def __init__(self, params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], decay: float):
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"train.ema_config.ema_decay: {decay!r} must be between 0 and 1 (exclusive)")
        self.params: dict[str, torch.Tensor] = dict(params)  # a mapping or (name, tensor) pairs
        if not self.params:
            raise ValueError("NetworkEMA needs at least one parameter")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            n: p.detach().to(dtype=torch.float32, copy=True) for n, p in self.params.items()
        }

    @classmethod
    def from_config(cls, params: Mapping[str, torch.Tensor], ema_config) -> "NetworkEMA | None":
        """None when ema_config.use_ema is false, else an EMA with ema_config.ema_decay."""
        if ema_config is None or not getattr(ema_config, "use_ema", False):
            return None
        return cls(params, ema_config.ema_decay)

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for name, p in self.params.items():
            s = self.shadow[name]
            s.lerp_(p.detach().to(device=s.device, dtype=torch.float32), 1.0 - d)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": {n: t.clone() for n, t in self.shadow.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, d: Mapping) -> None:
        shadow = d["shadow"]
        missing = sorted(set(self.shadow) - set(shadow))
        unexpected = sorted(set(shadow) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(
                "EMA state does not match the network: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for n, t in shadow.items():
            if tuple(t.shape) != tuple(self.shadow[n].shape):
                raise ValueError(f"EMA state for {n}: shape {tuple(t.shape)} != {tuple(self.shadow[n].shape)}")
        for n, t in shadow.items():
            self.shadow[n].copy_(t.to(device=self.shadow[n].device, dtype=torch.float32))
        self.decay = float(d.get("decay", self.decay))
        self.num_updates = int(d["num_updates"])

    @torch.no_grad()
    def copy_to(self, params: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write the EMA weights into `params` (name -> tensor; default: the tracked params)."""
        target = self.params if params is None else params
        for n, p in target.items():
            if n not in self.shadow:
                raise KeyError(f"no EMA weights for {n!r}")
            p.copy_(self.shadow[n].to(device=p.device, dtype=p.dtype))

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the tracked params (to save or sample);
        the training weights are restored on exit, also after an exception."""
        with torch.no_grad():
            backup = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            self.copy_to()
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])
