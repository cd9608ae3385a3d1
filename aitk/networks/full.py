"""Full fine-tuning: the model's own weights are the "network".

`FullModelHandle` gives a denoiser the interface the trainer uses for networks (named trainable
parameters, state dict, alphas, multiplier), so checkpoints, EMA, resume, multi-expert rotation
and 8-bit optimizers work the same; what is saved is a diffusers model folder instead of a LoRA.
"""

from __future__ import annotations

import torch
from torch import nn


class FullModelHandle:
    algo = "full"
    linear_rank = 0
    conv_rank: int | None = None
    linear_alpha = 0.0
    conv_alpha: float | None = None
    multiplier = 1.0

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        for parameter in module.parameters():
            parameter.requires_grad_(True)

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.module.named_parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters())

    def network_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.module.named_parameters()}

    def load_network_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.module.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise KeyError(
                f"model state does not match the model: {len(missing)} missing {missing[:3]}, "
                f"{len(unexpected)} unexpected {unexpected[:3]}"
            )
        with torch.no_grad():
            for name, parameter in params.items():
                parameter.copy_(state[name].to(device=parameter.device, dtype=parameter.dtype))

    # a full fine-tune has no wrapped modules, alphas or strength
    def wrapped_module_names(self) -> list[str]:
        return []

    def conv_module_names(self) -> list[str]:
        return []

    def lora_layers(self) -> dict[str, nn.Module]:
        return {}

    def set_alphas(self, linear_alpha: float, conv_alpha: float | None) -> None:
        pass

    def set_multiplier(self, m: float) -> None:
        pass  # previews of a full fine-tune always show the model as trained
