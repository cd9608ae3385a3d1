"""LoRA on the text encoders (train.train_text_encoder): SD 1.x / 2.x (one CLIP) and SDXL (two).

Each encoder the adapter names in `text_encoder_lora_prefixes` gets its own peft LoRA, with the
job's network type, linear rank / alpha and dropout, on CLIP's attention and MLP linears
(aitk.networks.targets.text_encoder_lora_candidates). Files name its modules as kohya does:
`<prefix>_text_model_<path with "_">` (lora_te_ for SD 1.x / 2.x, lora_te1_ / lora_te2_ for SDXL),
and as diffusers does in its own layout: `<encoder attribute>.<module path>`.

transformers 5 dropped the `text_model.` level of CLIPTextModel (not of
CLIPTextModelWithProjection); kohya names always carry it, because ComfyUI matches on it.

`network_kwargs.only_if_contains` / `ignore_if_contains` apply to text-encoder modules too, as in
kohya and ai-toolkit, matched against the module path, `<encoder>.<path>` and the kohya key stem.
The alpha schedule does not act on these networks: they keep network.linear_alpha.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from aitk.networks.lora import NetworkHandle

__all__ = [
    "TEXT_ENCODER_NETWORK_TYPES",
    "TextEncoderNaming",
    "clip_lora_key_stem",
    "text_encoder_namings",
    "build_text_encoder_networks",
]

#: network types a text-encoder LoRA can be (peft LoRA; LoKr / LoHa and full fine-tunes cannot)
TEXT_ENCODER_NETWORK_TYPES = ("lora", "locon", "dora")
#: the module level kohya's and ComfyUI's CLIP LoRA names carry
CLIP_ROOT = "text_model."


def clip_lora_key_stem(prefix: str, module_name: str) -> str:
    """"lora_te1" + "encoder.layers.0.self_attn.q_proj" -> "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"."""
    path = module_name if module_name.startswith(CLIP_ROOT) else CLIP_ROOT + module_name
    return f"{prefix}_{path.replace('.', '_')}"


@dataclass(frozen=True)
class TextEncoderNaming:
    """How one text encoder's LoRA is written: `encoder` is the adapter attribute (and the
    diffusers key prefix), `prefix` the kohya one."""

    encoder: str
    prefix: str

    def key_stem(self, module_name: str) -> str:
        return clip_lora_key_stem(self.prefix, module_name)

    def name_forms(self, module_name: str) -> tuple[str, str, str]:
        return module_name, f"{self.encoder}.{module_name}", self.key_stem(module_name)


def text_encoder_namings(adapter: Any) -> dict[str, TextEncoderNaming]:
    """The adapter's trainable text encoders, by attribute name."""
    prefixes: Mapping[str, str] = getattr(adapter, "text_encoder_lora_prefixes", {}) or {}
    return {name: TextEncoderNaming(name, prefix) for name, prefix in prefixes.items()}


def _filtered(pool: list[str], naming: TextEncoderNaming, only: list[str] | None, ignore: list[str] | None) -> list[str]:
    """The names of `pool` the network_kwargs filters keep (entries that match no text-encoder
    module are the denoiser's business: the denoiser's network reports those)."""

    def hit(entries: list[str], name: str) -> bool:
        return any(entry in form for entry in entries for form in naming.name_forms(name))

    kept = [n for n in pool if hit(only, n)] if only else list(pool)
    return [n for n in kept if not hit(ignore, n)] if ignore else kept


def build_text_encoder_networks(
    adapter: Any, net_cfg: Any, *, seed: int, dtype: Any = None,
) -> dict[str, NetworkHandle]:
    """A LoRA on each of the adapter's text encoders (`text_encoder_lora_prefixes`), in place.

    ValueError (a job error) when the family has none, the network type cannot be one, or the
    network_kwargs filters leave an encoder without modules. Each encoder's initial weights come
    from its own seed (seed + 1, + 2 ...), so the denoiser's network starts as without them.
    """
    from aitk.networks.build import build_network, network_algo
    from aitk.networks.targets import text_encoder_lora_candidates

    namings = text_encoder_namings(adapter)
    if not namings:
        raise ValueError(
            "train.train_text_encoder: this model family trains no text-encoder LoRA (SD 1.x / 2.x and SDXL "
            "do); set train_text_encoder: false"
        )
    kind = str(net_cfg.type).lower()
    if kind not in TEXT_ENCODER_NETWORK_TYPES:
        raise ValueError(
            f"train.train_text_encoder: network type {kind} cannot train the text encoder here; use "
            f"type {', '.join(TEXT_ENCODER_NETWORK_TYPES)}, or set train_text_encoder: false"
        )
    algo = network_algo(kind, net_cfg.dora)
    encoders = adapter.text_encoders()
    only = net_cfg.network_kwargs.only_if_contains
    ignore = net_cfg.network_kwargs.ignore_if_contains
    networks: dict[str, NetworkHandle] = {}
    for index, (name, naming) in enumerate(namings.items(), start=1):
        module: nn.Module | None = encoders.get(name)
        if module is None:
            raise ValueError(
                f"train.train_text_encoder: the text encoder {name} is not loaded (released after "
                "cache_text_embeddings?); text-encoder training needs it for every step"
            )
        pool = text_encoder_lora_candidates(module)
        candidates = _filtered(pool, naming, only, ignore)
        if not candidates:
            raise ValueError(
                f"train.train_text_encoder: network.network_kwargs (only_if_contains {only!r}, ignore_if_contains "
                f"{ignore!r}) leave no module of {name} to train, e.g. {naming.key_stem(pool[0])}; add a "
                "text-encoder name (such as 'self_attn' or 'mlp') to only_if_contains, or set "
                "train_text_encoder: false"
            )
        networks[name] = build_network(
            module,
            network_type=kind,
            dora=algo == "dora",
            linear_rank=net_cfg.linear_rank,
            linear_alpha=net_cfg.linear_alpha_value,
            dropout=net_cfg.dropout,
            candidates=candidates,
            seed=seed + index,
            dtype=dtype,
        )
    return networks

