"""Bake a network file into a base model's weights (what `aitk merge` runs).

Reads every layout aitk writes, and the same layouts from other tools:
- LoRA / LoCon: `<stem>.lora_down.weight` + `.lora_up.weight` (or lora_A / lora_B) + `.alpha`
  dW = alpha / r * up @ down  (r = rank; no `.alpha`: scale 1)
- DoRA: the LoRA tensors + `<stem>.dora_scale` (or PEFT's `lora_magnitude_vector`)
  W' = m * (W + dW) / ||W + dW||, the norm per output channel (dora_scale (out, 1, ...)) or per
  input channel (dora_scale (1, in, ...), older LyCORIS files), as LyCORIS defines it
- LoKr: dW = alpha / r * kron(w1, w2), w = full factor or a @ b (or the Tucker form with
  lokr_t2); scale 1 when no factor is rank-decomposed or `.alpha` is missing
- LoHa: dW = alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b) (or the Tucker form with hada_t1 / hada_t2)
- PEFT / diffusers keys `<diffusers_prefix>.<module path>.lora_A.weight`, alphas from the
  `lora_adapter_metadata` config (none: alpha = rank)

`strength` multiplies dW (for DoRA inside the normalisation, as peft / diffusers apply an adapter
weight and as aitk's previews apply `network_multiplier`; ComfyUI instead blends the final
DoRA weight with the base weight, which differs at strengths other than 1).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from aitk.networks.export import (
    KeyFor,
    _unprefixed_config,
    config_alphas,
    is_diffusers_layout,
    kohya_module_key,
    load_lora_file,
)
from aitk.networks.lora import _tuner_base, eligible_modules
from aitk.networks.lycoris_files import LYCORIS_SUFFIXES, split_stem

__all__ = ["merged_weight", "merge_network_file", "group_by_module"]

#: file suffix -> part name used below
_PARTS = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    "lora_magnitude_vector": "magnitude",
    **{s: s for s in LYCORIS_SUFFIXES},
}


def group_by_module(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """{stem: {part: tensor}} and the keys with no known suffix."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        stem, suffix = split_stem(key, tuple(_PARTS))
        if not suffix:
            unknown.append(key)
            continue
        groups.setdefault(stem, {})[_PARTS[suffix]] = t
    return groups, unknown


def _f(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.detach().to(device=device, dtype=torch.float32)


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LyCORIS's Tucker form: core (r, r, k, k), a (r, out), b (r, in) -> (out, in, k, k)."""
    return torch.einsum("i j k l, i p, j r -> p r k l", core, a, b)


def _delta(parts: dict[str, torch.Tensor], shape: torch.Size, device: torch.device) -> tuple[torch.Tensor, float]:
    """(unscaled dW shaped like the weight, alpha / rank scale) of one module's parts."""
    p = {k: _f(v, device) for k, v in parts.items() if k not in ("alpha", "dora_scale", "magnitude")}
    alpha = float(parts["alpha"].item()) if "alpha" in parts else None
    rank: int | None = None
    if "down" in p and "up" in p:
        down, up = p["down"], p["up"]
        rank = down.shape[0]
        delta = (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(shape)
    elif any(k.startswith("lokr_") for k in p):
        if "lokr_w1" in p:
            w1 = p["lokr_w1"]
        else:
            w1, rank = p["lokr_w1_a"] @ p["lokr_w1_b"], p["lokr_w1_b"].shape[0]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:
            w2, rank = _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"]), p["lokr_w2_b"].shape[0]
        else:
            w2, rank = p["lokr_w2_a"] @ p["lokr_w2_b"], p["lokr_w2_b"].shape[0]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2).reshape(shape)
    elif any(k.startswith("hada_") for k in p):
        if "hada_t1" in p:
            w1 = _tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
            w2 = _tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
        else:
            w1, w2 = p["hada_w1_a"] @ p["hada_w1_b"], p["hada_w2_a"] @ p["hada_w2_b"]
        rank = p["hada_w1_b"].shape[0]
        delta = (w1 * w2).reshape(shape)
    else:
        raise KeyError(f"no LoRA / LoKr / LoHa weights among {sorted(parts)}")
    scale = alpha / rank if (alpha is not None and rank is not None) else 1.0
    return delta, scale


def merged_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], strength: float = 1.0) -> torch.Tensor:
    """The weight with one module's network parts applied at `strength` (a new tensor, weight's dtype).

    `parts`: {down, up, alpha, dora_scale | magnitude, lokr_*, hada_*} as `group_by_module` gives.
    """
    w = weight.detach().to(torch.float32)
    delta, scale = _delta(parts, w.shape, w.device)
    combined = w + (float(strength) * scale) * delta
    out = w.shape[0]
    rest = [1] * (w.dim() - 1)
    if "magnitude" in parts:  # peft's vector: always per output channel, (out,) or (1, out, 1, 1)
        m, axis = _f(parts["magnitude"], w.device).reshape(out, *rest), 0
    elif "dora_scale" in parts:
        m = _f(parts["dora_scale"], w.device)
        axis = 0 if (m.shape[0] == out and m.numel() == out) else 1
        m = m.reshape(out, *rest) if axis == 0 else m.reshape(1, w.shape[1], *rest[1:])
    else:
        return combined.to(weight.dtype)
    if axis == 0:
        norm = combined.reshape(out, -1).norm(dim=1).reshape(out, *rest)
    else:
        norm = combined.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, w.shape[1], *rest[1:])
    return (combined * (m / norm)).to(weight.dtype)


def _stem_map(model: nn.Module, prefix: str, key_for: KeyFor | None) -> dict[str, str]:
    """file key stem -> module name, for every Linear / Conv2d the naming can express."""
    out: dict[str, str] = {}
    for name in eligible_modules(model):
        try:
            stem = key_for(name) if key_for is not None else kohya_module_key(prefix, name)
        except ValueError:  # a module the file naming cannot express (WAN: not in the original layout)
            continue
        out[stem] = name
    return out


@torch.no_grad()
def merge_network_file(
    model: nn.Module,
    source: str | Path | tuple[dict[str, torch.Tensor], dict[str, str]],
    *,
    strength: float = 1.0,
    prefix: str = "lora_unet",
    key_for: KeyFor | None = None,
    diffusers_prefix: str = "unet",
    strict: bool = True,
) -> list[str]:
    """Add a network file to `model`'s weights in place; returns the merged module names.

    `source`: a path or (tensors, metadata). Naming arguments as for `aitk.networks.export.save_lora`
    (a model adapter's `lora_prefix`, `lora_key_stem`, `diffusers_lora_prefix`); PEFT-keyed files
    (save_format diffusers) are recognised by their keys. A module already wrapped by a peft
    adapter has its base layer's weight changed. `strict`: keys that match no module of `model`,
    or that no algorithm here reads, raise KeyError (else they are skipped).
    """
    tensors, metadata = load_lora_file(source) if isinstance(source, (str, Path)) else source
    groups, unknown = group_by_module(tensors)
    modules = eligible_modules(model)
    if is_diffusers_layout(tensors, metadata, diffusers_prefix):
        p = diffusers_prefix + "."
        names = {stem: stem[len(p):] for stem in groups}
        cfg = _unprefixed_config(metadata, diffusers_prefix)
        if cfg:
            for stem, name in names.items():
                groups[stem]["alpha"] = torch.tensor(config_alphas(cfg, [name])[name])
    else:
        stems = _stem_map(model, prefix, key_for)
        names = {stem: stems[stem] for stem in groups if stem in stems}
    unmatched = [s for s in groups if s not in names or names[s] not in modules]
    if strict and (unknown or unmatched):
        raise KeyError(
            f"{len(unmatched)} module(s) of the file match nothing in the model (e.g. {unmatched[:3]}), "
            f"{len(unknown)} key(s) of no known kind (e.g. {unknown[:3]}); examples of this model's "
            f"module names: {list(modules)[:3]}"
        )
    merged: list[str] = []
    for stem, parts in groups.items():
        name = names.get(stem)
        if name is None or name not in modules:
            continue
        layer = _tuner_base(modules[name]) or modules[name]
        if not layer.weight.is_floating_point():
            raise TypeError(f"{name}: cannot merge into a {layer.weight.dtype} (quantized?) weight")
        layer.weight.copy_(merged_weight(layer.weight, parts, strength))
        merged.append(name)
    return merged
