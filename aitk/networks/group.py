"""The networks of one run: one per trained expert (WAN 2.2 trains a high-noise and a low-noise
network), or a single one named "main".

Parameter and state names are prefixed with "<expert>/" when there are several networks; a single
"main" network keeps its plain names, so single-model checkpoints read exactly as before.

Text-encoder networks (train.train_text_encoder, aitk.networks.text_encoders) ride along: their
parameters and state are named "<encoder>/<module>..." ("text_encoder/", "text_encoder_2/"), they
train, save, resume and take the preview multiplier with the rest, but they are no expert: the
denoiser networks alone are iterated (`items()`, `wrapped_module_names()`: LoRA files, the alpha
schedule, expert rotation).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from aitk.networks.lora import NetworkHandle

SINGLE = "main"


class NetworkGroup:
    def __init__(self, networks: dict[str, NetworkHandle], text_encoders: dict[str, NetworkHandle] | None = None) -> None:
        if not networks:
            raise ValueError("a run needs at least one network")
        self.networks = dict(networks)
        self.text_encoders = dict(text_encoders or {})  # encoder attribute -> its LoRA
        if self.text_encoders and not self.is_single:
            raise ValueError("text-encoder networks train with a single denoiser network only")

    # --- structure -------------------------------------------------------------------------
    @property
    def is_single(self) -> bool:
        return list(self.networks) == [SINGLE]

    @property
    def is_full_model(self) -> bool:
        """A full fine-tune (no network section): the handles stand for whole models."""
        return getattr(self.first, "algo", None) == "full"

    @property
    def first(self) -> NetworkHandle:
        return next(iter(self.networks.values()))

    def __getitem__(self, expert: str) -> NetworkHandle:
        return self.networks[expert]

    def __iter__(self) -> Iterator[str]:
        return iter(self.networks)

    def items(self) -> list[tuple[str, NetworkHandle]]:
        return list(self.networks.items())

    def _prefix(self, expert: str) -> str:
        return "" if self.is_single else f"{expert}/"

    def wrapped_module_names(self) -> list[str]:
        """The denoiser networks' wrapped modules (text encoders: `text_encoder_module_names`)."""
        return [self._prefix(e) + n for e, h in self.networks.items() for n in h.wrapped_module_names()]

    def text_encoder_module_names(self) -> list[str]:
        return [f"{te}/{n}" for te, h in self.text_encoders.items() for n in h.wrapped_module_names()]

    def _all_named(self) -> list[tuple[str, NetworkHandle]]:
        """(state-name prefix, handle) of every network: denoisers, then text encoders."""
        return [(self._prefix(e), h) for e, h in self.networks.items()] + [
            (f"{te}/", h) for te, h in self.text_encoders.items()
        ]

    # --- parameters --------------------------------------------------------------------------
    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {prefix + k: p for prefix, h in self._all_named() for k, p in h.named_trainable_parameters().items()}

    def trainable_parameters(self, expert: str | None = None) -> list[nn.Parameter]:
        """Every network's parameters (text encoders' last), or only `expert`'s denoiser network's."""
        if expert is not None:
            return self.networks[expert].trainable_parameters()
        return [p for _, h in self._all_named() for p in h.trainable_parameters()]

    def text_encoder_parameters(self) -> list[nn.Parameter]:
        return [p for h in self.text_encoders.values() for p in h.trainable_parameters()]

    def network_state_dict(self) -> dict[str, torch.Tensor]:
        return {prefix + k: t for prefix, h in self._all_named() for k, t in h.network_state_dict().items()}

    def load_network_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        for te, handle in self.text_encoders.items():
            prefix = f"{te}/"
            handle.load_network_state_dict({k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)})
        if self.is_single:
            self.first.load_network_state_dict(state)
            return
        unknown = sorted({k.split("/", 1)[0] for k in state} - set(self.networks))
        if unknown:
            raise KeyError(f"the checkpoint has networks for {unknown}, this run trains {sorted(self.networks)}")
        for expert, handle in self.networks.items():
            prefix = f"{expert}/"
            handle.load_network_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    # --- strength ------------------------------------------------------------------------------
    def set_multiplier(self, m: float) -> None:
        for _, handle in self._all_named():
            handle.set_multiplier(m)

    def __getattr__(self, name: str):
        """A single-network group stands for its network (lora_layers, module_alpha, ...)."""
        networks = self.__dict__.get("networks")
        if networks is not None and list(networks) == [SINGLE]:
            return getattr(networks[SINGLE], name)
        raise AttributeError(f"{type(self).__name__} of {sorted(networks or {})} has no attribute {name!r}")
