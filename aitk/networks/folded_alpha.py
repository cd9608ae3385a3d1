"""LoRA files with alpha folded into the up weights (the comfyui layout of the families whose
adapter sets `lora_alpha_in_weights`: AuraFlow, HiDream, CogView4, Krea 2, ERNIE-Image, FLUX.2).

diffusers' loaders of these pipelines refuse `.alpha` keys, ComfyUI reads a LoRA without them at
scale 1, and upstream ai-toolkit writes them that way. So each LoRA / DoRA module is written as

    up_file = up * alpha / rank        (computed in float32, then cast to the file's dtype)
    no `.alpha` key                    (every loader: scale 1, the same update up_file @ down)

DoRA's direction W + s * up @ down is the same product, so its `dora_scale` is unchanged.
LoKr / LoHa keep their `.alpha` (no diffusers loader reads them anyway).

The header entry `aitk_alpha_in_weights` records the trained alphas by module path (the
network's module names, the same in the comfyui and the diffusers layout):
JSON {"alpha": <most modules' alpha>, "modules": {<module>: <alpha>, ...for the others}}.
aitk's readers give the trained network back by dividing up by alpha / rank again, but only for
modules whose alpha in the file is their rank (no `.alpha`, or a diffusers config saying so):
the record can then never scale weights a second time, whatever else a tool wrote into the file.
Dividing in float32 by the same float32 factor the writer multiplied with gives the up back
exactly when alpha / rank is a power of two (1 included), otherwise within one float32 ulp
(relative 1.2e-7, under 1e-6) - apart from the file's dtype cast, which rounds as any save does.
Files of other tools carry no record: their modules load at alpha = rank, as everywhere.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping

import torch

__all__ = ["ALPHA_RECORD_KEY", "FoldedAlphaError", "alpha_record", "alpha_record_json", "recorded_alphas", "fold_up",
           "unfold_up", "unfold_alphas"]

ALPHA_RECORD_KEY = "aitk_alpha_in_weights"


class FoldedAlphaError(ValueError):
    """A damaged `aitk_alpha_in_weights` header entry; the message says what to do."""


def fold_up(up: torch.Tensor, alpha: float, rank: int) -> torch.Tensor:
    """up * alpha / rank in float32, back in up's dtype (unchanged when alpha == rank)."""
    if alpha == rank:
        return up
    return (up.float() * (alpha / rank)).to(up.dtype)


def unfold_up(up: torch.Tensor, alpha: float, rank: int) -> torch.Tensor:
    """Inverse of `fold_up`, in float32 (the network casts it to its own dtype)."""
    if alpha == rank:
        return up
    return up.float() / (alpha / rank)


def alpha_record_json(alphas: Mapping[str, float]) -> str:
    """The header value for {module: trained alpha}: the most common alpha and the exceptions."""
    common = collections.Counter(alphas.values()).most_common(1)[0][0] if alphas else 0.0
    others = {m: float(a) for m, a in sorted(alphas.items()) if a != common}
    return json.dumps({"alpha": float(common), "modules": others}, separators=(",", ":"))


def recorded_alphas(metadata: Mapping[str, str]) -> tuple[float, dict[str, float]] | None:
    """(the common trained alpha, {module: alpha} of the others) from the header; None without it."""
    raw = metadata.get(ALPHA_RECORD_KEY)
    if raw is None:
        return None
    try:
        entry = json.loads(raw)
        return float(entry["alpha"]), {str(m): float(a) for m, a in entry.get("modules", {}).items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise FoldedAlphaError(
            f"the header entry {ALPHA_RECORD_KEY} is damaged ({exc}); remove it to load the file at scale 1 "
            "(the weights already hold alpha / rank), or use the file the trainer wrote"
        ) from None


def alpha_record(metadata: Mapping[str, str], modules: list[str]) -> dict[str, float] | None:
    """None for a file without the record; else {module: trained alpha} for `modules` (those the
    file holds): a module the record lists keeps its own alpha, the others get the common one."""
    found = recorded_alphas(metadata)
    if found is None:
        return None
    common, listed = found
    return {m: listed.get(m, common) for m in modules}


def unfold_alphas(
    ups: dict[str, torch.Tensor], ranks: Mapping[str, int], file_alphas: Mapping[str, float],
    metadata: Mapping[str, str],
) -> dict[str, float]:
    """Apply the header's record in place: each module of `ups` (module -> up weight) whose alpha
    in the file equals its rank gets up / (alpha / rank) and its trained alpha; returns the alphas
    to put in effect (the file's own where there is no record or the module has an explicit one)."""
    record = alpha_record(metadata, list(ups))
    alphas = dict(file_alphas)
    if not record:
        return alphas
    for module, alpha in record.items():
        rank = int(ranks[module])
        if float(file_alphas.get(module, rank)) != float(rank):
            continue  # an explicit alpha in the file governs its weights as they are
        ups[module] = unfold_up(ups[module], alpha, rank)
        alphas[module] = alpha
    return alphas
