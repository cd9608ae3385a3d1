"""Accuracy-recovery adapters: a LoRA that corrects what quantizing the base model loses.

`model.qtype: "uint4|owner/repo/file.safetensors"` (ai-toolkit's spelling; uint2 ... uint8, or a
local file after "|") quantizes the denoiser and adds that LoRA on top as a frozen peft adapter
named "recovery". ai-toolkit publishes such files (ostris/accuracy_recovery_adapters), trained to
make the N-bit model behave like the full-precision one, so a LoRA trained on top learns the
subject rather than the quantization error.

- Quantization follows the file: the Linear layers it covers are stored in the qtype, every other
  Linear in uint8 (`aitk.models.quantize`), as the published adapters expect.
- The adapter is on in training and in previews (unlike FLUX's assistant LoRA, it is part of the
  base model as the job describes it), for every model family and each WAN 2.2 expert.
- It is never trained and never saved: the trained network is a second peft adapter on the same
  layers, and its handle (what LoRA files and checkpoints are written from) sees only its own.
- Key names: whatever the family's LoRA files use (kohya / ComfyUI stems from the model adapter's
  `lora_key_stem`, diffusers' "<prefix>.<module>", or bare module paths), lora_A / lora_B or
  lora_down / lora_up, `.alpha` optional (alpha = rank, scale 1, when absent).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "RECOVERY_ADAPTER",
    "RecoveryAdapterError",
    "RecoveryFile",
    "read_recovery_file",
    "recovery_targets",
    "attach_recovery_adapter",
]

RECOVERY_ADAPTER = "recovery"
KEY = "model.qtype"
_DOWN = ("lora_A.weight", "lora_down.weight")
_UP = ("lora_B.weight", "lora_up.weight")
_SUFFIXES = (*_DOWN, *_UP, "alpha")


class RecoveryAdapterError(ValueError):
    """A recovery adapter that cannot be used; str() names the file and the fix in one line."""


@dataclass
class RecoveryFile:
    """A recovery adapter read from disk: its tensors by key, keyed per module stem."""

    reference: str
    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def stems(self) -> dict[str, dict[str, torch.Tensor]]:
        """key stem -> {suffix: tensor}; raises for keys that are no LoRA (DoRA, LoKr, ...)."""
        out: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
        odd: list[str] = []
        for key, tensor in self.tensors.items():
            suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
            if suffix is None:
                odd.append(key)
                continue
            out[key[: -len(suffix) - 1]][suffix] = tensor
        if odd:
            raise RecoveryAdapterError(
                f"{KEY}: {self.reference}: {len(odd)} keys are not plain LoRA weights (e.g. {odd[:3]}); "
                "recovery adapters are LoRA files (lora_A / lora_B or lora_down / lora_up, optional .alpha)"
            )
        return dict(out)


def read_recovery_file(reference: str, *, log: Callable[[str], None] | None = None) -> RecoveryFile:
    """Resolve (download when on the Hub) and read the recovery adapter named after "|".

    Raises aitk.hub_files.HubFileError for references that do not resolve, RecoveryAdapterError
    for a file that is no LoRA."""
    from aitk.hub_files import resolve_lora_file
    from aitk.networks.export import load_lora_file

    path = resolve_lora_file(reference, key=f"{KEY} (accuracy recovery adapter)", log=log)
    try:
        tensors, metadata = load_lora_file(path)
    except Exception as exc:  # noqa: BLE001 - a broken file is a job error
        raise RecoveryAdapterError(f"{KEY}: {reference}: {path} cannot be read as safetensors ({exc})") from exc
    if not tensors:
        raise RecoveryAdapterError(f"{KEY}: {reference}: {path} holds no tensors")
    return RecoveryFile(reference, path, tensors, metadata)


KeyFor = Callable[[str], str]


def _stem_index(module: nn.Module, key_for: KeyFor, diffusers_prefix: str) -> dict[str, str]:
    """Every key stem a LoRA file may use for a Linear / Conv2d of `module` -> the module name."""
    from aitk.networks.lora import eligible_modules

    index: dict[str, str] = {}
    for name in eligible_modules(module):
        try:
            own = [key_for(name)]
        except ValueError:  # a layer the family's file naming has no name for (WAN: patch embedding)
            own = []
        for stem in (*own, f"{diffusers_prefix}.{name}", name):
            index.setdefault(stem, name)
    return index


def recovery_targets(
    module: nn.Module, file: RecoveryFile, *, key_for: KeyFor, diffusers_prefix: str
) -> dict[str, int]:
    """Module name -> rank of every layer of `module` the file covers (model order).

    Raises RecoveryAdapterError when a key names no layer of this model (a file made for another
    model) or a layer's weights are incomplete."""
    index = _stem_index(module, key_for, diffusers_prefix)
    stems = file.stems()
    unknown = sorted(s for s in stems if s not in index)
    if unknown:
        raise RecoveryAdapterError(
            f"{KEY}: {file.reference}: {len(unknown)} of its {len(stems)} layers are not in this model "
            f"(e.g. {unknown[:3]}; this model's layers are named like {list(index)[:2]}); use the recovery "
            "adapter made for this model and qtype"
        )
    ranks: dict[str, int] = {}
    for stem, parts in stems.items():
        down = next((parts[s] for s in _DOWN if s in parts), None)
        up = next((parts[s] for s in _UP if s in parts), None)
        if down is None or up is None:
            raise RecoveryAdapterError(f"{KEY}: {file.reference}: layer {stem} lacks its lora_A or lora_B weight")
        ranks[index[stem]] = int(down.shape[0])
    order = {name: i for i, name in enumerate(index.values())}
    return dict(sorted(ranks.items(), key=lambda item: order[item[0]]))


def _group_file(file: RecoveryFile, names: set[str], module: nn.Module, key_for: KeyFor,
                diffusers_prefix: str) -> dict[str, torch.Tensor]:
    """The file's tensors of the modules `names`, renamed to `key_for` stems with lora_A / lora_B."""
    index = _stem_index(module, key_for, diffusers_prefix)
    out: dict[str, torch.Tensor] = {}
    for stem, parts in file.stems().items():
        name = index[stem]
        if name not in names:
            continue
        stem_out = key_for(name)
        for suffix, tensor in parts.items():
            kind = "lora_A.weight" if suffix in _DOWN else "lora_B.weight" if suffix in _UP else "alpha"
            out[f"{stem_out}.{kind}"] = tensor
        if "alpha" not in parts:  # the convention of files without alphas: alpha = rank (scale 1)
            rank = next(parts[s] for s in _DOWN if s in parts).shape[0]
            out[f"{stem_out}.alpha"] = torch.tensor(float(rank))
    return out


def _is_kxk_conv(layer: nn.Module) -> bool:
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    return isinstance(base, nn.Conv2d) and tuple(base.kernel_size) != (1, 1)


def attach_recovery_adapter(
    module: nn.Module, file: RecoveryFile, *, key_for: KeyFor, diffusers_prefix: str
) -> list[object]:
    """Add the recovery adapter to `module` (after quantization) as frozen, active peft adapters.

    One adapter per rank in the file ("recovery", or "recovery_r<rank>" when ranks differ).
    Returns their network handles (for tests and logs; the trainer keeps none of them)."""
    from aitk.networks.export import load_network_file
    from aitk.networks.lora import eligible_modules, inject_network

    targets = recovery_targets(module, file, key_for=key_for, diffusers_prefix=diffusers_prefix)
    eligible = eligible_modules(module)
    by_rank: dict[int, list[str]] = collections.defaultdict(list)
    for name, rank in targets.items():
        by_rank[rank].append(name)
    handles = []
    for rank, names in sorted(by_rank.items()):
        adapter_name = RECOVERY_ADAPTER if len(by_rank) == 1 else f"{RECOVERY_ADAPTER}_r{rank}"
        has_conv = any(_is_kxk_conv(eligible[n]) for n in names)
        try:
            handle = inject_network(
                module, linear_rank=rank, linear_alpha=float(rank), conv_rank=rank if has_conv else None,
                candidates=names, adapter_name=adapter_name,
            )
            load_network_file(
                handle, (_group_file(file, set(names), module, key_for, diffusers_prefix), {}),
                key_for=key_for,
            )
        except (KeyError, ValueError, RuntimeError) as exc:
            raise RecoveryAdapterError(f"{KEY}: {file.reference} does not fit this model: {exc}") from exc
        for parameter in handle.trainable_parameters():
            parameter.requires_grad_(False)
        handles.append(handle)
    return handles
