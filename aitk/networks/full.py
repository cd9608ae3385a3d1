"""Full fine-tuning: the model's own weights are the "network".

`FullModelHandle` gives a denoiser the interface the trainer uses for networks (named trainable
parameters, state dict, alphas, multiplier), so checkpoints, EMA, resume, multi-expert rotation
and 8-bit optimizers work the same; what is saved is a diffusers model folder instead of a LoRA.

Under FSDP (aitk/trainer/fsdp.py) the module's parameters are DTensor shards: the state goes in
and out whole, gathered on process 0 and broadcast from it, and every process must make the call.
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

    @property
    def is_sharded(self) -> bool:
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self.module, FSDPModule)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights and persistent buffers, as `save_pretrained` writes them. Sharded: gathered on
        process 0 in host memory (an empty dict on the others)."""
        if not self.is_sharded:
            return self.module.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def network_state_dict(self) -> dict[str, torch.Tensor]:
        if self.is_sharded:
            names = {name for name, _ in self.module.named_parameters()}
            return {k: v for k, v in self.model_state_dict().items() if k in names}
        return {k: p.detach().clone() for k, p in self.module.named_parameters()}

    def load_network_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.module.named_parameters())
        sharded = self.is_sharded
        if sharded:
            import torch.distributed as dist

        checked = not sharded or dist.get_rank() == 0  # sharded: the others get what process 0 read
        missing = sorted(set(params) - set(state)) if checked else []
        unexpected = sorted(set(state) - set(params)) if checked else []
        if missing or unexpected:
            raise KeyError(
                f"model state does not match the model: {len(missing)} missing {missing[:3]}, "
                f"{len(unexpected)} unexpected {unexpected[:3]}"
            )
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(
                self.module, state,
                options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False),
            )
            return
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
