"""LoRA files: kohya / ComfyUI layout and diffusers (PEFT) layout, atomic safetensors writes.

kohya / ComfyUI (save_format "comfyui" or "kohya"), per wrapped module:
    <prefix>_<module path, "." -> "_">.lora_down.weight   (= peft lora_A)
    <prefix>_<module path, "." -> "_">.lora_up.weight     (= peft lora_B)
    <prefix>_<module path, "." -> "_">.alpha              (0-dim float32: the alpha in effect now)
A prefix ending in "." keeps the dotted module path instead ("diffusion_model." + path).
Models whose files need the PEFT weight names with `.alpha` (FLUX: diffusers reads `.alpha` only
next to lora_A / lora_B, ComfyUI reads both) write `<stem>.lora_A.weight` / `<stem>.lora_B.weight`
instead of lora_down / lora_up (`weight_names=PEFT_WEIGHT_NAMES`; the trainer passes the model
adapter's `lora_weight_names`).

DoRA adds, in the kohya / ComfyUI layout, `<stem>.dora_scale` = the magnitude vector shaped
(out, 1) for linear layers and (out, 1, 1, 1) for convs (LyCORIS's output-axis layout, the axis
peft's DoRA normalises over).

diffusers (save_format "diffusers"):
    <prefix>.<module path>.lora_A.weight / .lora_B.weight (DoRA: + .lora_magnitude_vector, peft's
    shape), and metadata["lora_adapter_metadata"] = JSON of the peft LoraConfig (r, lora_alpha,
    rank_pattern, alpha_pattern with the alphas in effect now, target_modules, use_dora), keys
    prefixed "<prefix>." as diffusers writes them; diffusers' load_lora_weights builds its
    LoraConfig from it, so the scale is exact.

Families whose original checkpoint fuses layers diffusers splits (q / k / v of Lumina 2, FLUX.2:
the adapter's `lora_fused_weights`) get, in the kohya / ComfyUI layout, one LoRA per fused weight
for each such group and a header record of the split (aitk.networks.fused_files);
`load_network_file` splits it back.

LoKr / LoHa are written in the LyCORIS key layout (aitk.networks.lycoris_files) for every
save_format: diffusers' load_lora_weights loads neither, so there is no diffusers layout for them.
`load_network_file` reads any of these files back into a network of the same configuration.

Families whose adapter sets `lora_alpha_in_weights` (diffusers' loaders refuse `.alpha`) get, in
the kohya / ComfyUI layout, alpha / rank folded into each LoRA / DoRA up weight and no `.alpha`
keys; the header records the trained alphas (aitk.networks.folded_alpha), which
`load_network_file` restores. Folding comes before fusing q / k / v: every part then has scale 1,
so any group fuses (alpha R over rank R), and the product is rounded to the file's dtype once.

Text-encoder networks (`save_lora(..., text_encoders=...)`, aitk.networks.text_encoders) go into
the same file: kohya stems `lora_te_text_model_...` (SD 1.x / 2.x) or `lora_te1_` / `lora_te2_`
(SDXL) with the same weight names and `.alpha`; in the diffusers layout `text_encoder.<path>` /
`text_encoder_2.<path>` keys, their LoRA configs in the same metadata entry under those prefixes
(diffusers' own layout for a pipeline's LoRA).
"""

from __future__ import annotations

import collections
import json
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from aitk.fsutil import atomic_write_bytes
from aitk.networks.folded_alpha import ALPHA_RECORD_KEY, alpha_record_json, fold_up, unfold_alphas
from aitk.networks.fused_files import FUSED_RECORD_KEY, FusedWeights, fuse_lora_tensors, split_fused_lora
from aitk.networks.lora import NetworkHandle
from aitk.networks.text_encoders import TextEncoderNaming

#: a text-encoder network and how its keys are named, for `save_lora`
TextEncoderPart = tuple[NetworkHandle, TextEncoderNaming]

__all__ = [
    "SAVE_FORMATS",
    "KOHYA_WEIGHT_NAMES",
    "PEFT_WEIGHT_NAMES",
    "network_to_kohya",
    "network_to_diffusers",
    "kohya_to_network_state",
    "diffusers_to_network_state",
    "save_lora",
    "load_lora_file",
    "kohya_module_key",
    "diffusers_kohya_alpha_conflicts",
    "network_lora_config",
    "load_network_file",
    "config_alphas",
    "text_encoder_tensors",
]

SAVE_FORMATS = ("comfyui", "kohya", "diffusers")
#: (down, up) weight names of kohya-layout files: kohya's own, and PEFT's (lora_A = down)
KOHYA_WEIGHT_NAMES: tuple[str, str] = ("lora_down", "lora_up")
PEFT_WEIGHT_NAMES: tuple[str, str] = ("lora_A", "lora_B")
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # what diffusers reads (loaders/lora_base.py)


def kohya_module_key(prefix: str, module_name: str) -> str:
    """File key stem of one module: "lora_unet" + "down_blocks.0..." -> "lora_unet_down_blocks_0_..."."""
    if prefix.endswith("."):
        return prefix + module_name
    return f"{prefix}_{module_name.replace('.', '_')}" if prefix else module_name.replace(".", "_")


KeyFor = Callable[[str], str]  # wrapped module name -> key stem in the file


def _kohya_names(handle: NetworkHandle, prefix: str, key_for: KeyFor | None = None) -> dict[str, str]:
    """module name -> kohya key stem; refuses two modules that flatten to the same key.

    `key_for` (the model adapter's `lora_key_stem`) overrides the default `prefix` naming.
    """
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in handle.wrapped_module_names():
        key = key_for(name) if key_for is not None else kohya_module_key(prefix, name)
        if key in seen:
            raise ValueError(f"modules {seen[key]!r} and {name!r} both map to the key {key!r}")
        seen[key] = name
        out[name] = key
    return out


def _to_file(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=dtype).contiguous()


#: module-name endings whose kohya `.alpha` diffusers' converter files under a wrong name
#: (".../attn1.processor.to_q_lora.down.weight"), so diffusers gives them the file's most common alpha
_DIFFUSERS_ALPHA_BLIND = (".to_q", ".to_k", ".to_v", ".to_out.0")


def diffusers_kohya_alpha_conflicts(handle: NetworkHandle) -> list[str]:
    """Wrapped modules whose alpha diffusers would misread from a kohya SD / SDXL UNet file.

    diffusers 0.42 (lora_conversion_utils._get_alpha_name) loses the `.alpha` of attention
    to_q / to_k / to_v / to_out.0 and applies the most common alpha in the file instead. That is
    exact while those modules share the most common alpha (all linear modules share one alpha and
    outnumber the convs: always so with the default SD 1.5 targets). ComfyUI is not affected.
    """
    alphas = handle.module_alphas()
    counts = collections.Counter(alphas.values()).most_common()
    if len(counts) <= 1:
        return []
    top, n_top = counts[0]
    tie = len(counts) > 1 and counts[1][1] == n_top
    return [
        n for n, a in alphas.items() if n.endswith(_DIFFUSERS_ALPHA_BLIND) and (a != top or tie)
    ]


def network_to_kohya(
    handle: NetworkHandle,
    prefix: str = "lora_unet",
    dtype: torch.dtype = torch.float16,
    key_for: KeyFor | None = None,
    weight_names: tuple[str, str] = KOHYA_WEIGHT_NAMES,
    fold_alpha: bool = False,
) -> dict[str, torch.Tensor]:
    """kohya / ComfyUI tensors: lora_down / lora_up in `dtype`, `.alpha` (float32) = alpha now.

    `weight_names` = (down, up) suffix names; PEFT_WEIGHT_NAMES writes lora_A / lora_B.
    `fold_alpha`: LoRA / DoRA up = up * alpha / rank (float32, then `dtype`) and no `.alpha`.
    LoKr / LoHa networks give the LyCORIS layout (weight_names do not apply); DoRA adds
    `.dora_scale`.
    """
    if handle.algo in ("lokr", "loha"):
        from aitk.networks.lycoris_files import network_to_lycoris

        return network_to_lycoris(handle, _kohya_names(handle, prefix, key_for), dtype)  # type: ignore[arg-type]
    down, up = weight_names
    a = handle.adapter_name
    layers = handle.lora_layers()
    out: dict[str, torch.Tensor] = {}
    for name, key in _kohya_names(handle, prefix, key_for).items():
        layer = layers[name]
        out[f"{key}.{down}.weight"] = _to_file(layer.lora_A[a].weight, dtype)
        alpha, rank = handle.module_alpha(name), int(layer.lora_A[a].weight.shape[0])
        if fold_alpha:
            out[f"{key}.{up}.weight"] = _to_file(fold_up(layer.lora_B[a].weight.float(), alpha, rank), dtype)
        else:
            out[f"{key}.{up}.weight"] = _to_file(layer.lora_B[a].weight, dtype)
            out[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if handle.uses_dora:
            ndim = layer.get_base_layer().weight.dim()
            magnitude = layer.lora_magnitude_vector[a].weight
            out[f"{key}.dora_scale"] = _to_file(magnitude.reshape(-1, *([1] * (ndim - 1))), dtype)
    return out


def _group_pattern(values: dict[str, float | int], default: float | int) -> dict[str, float | int]:
    """{regex: value} for modules whose value differs from `default`, one key per value."""
    groups: dict[float | int, list[str]] = collections.defaultdict(list)
    for name, v in values.items():
        if v != default:
            groups[v].append(name)
    # peft matches a key with re.match(r"(.*\.)?(KEY)$", name): "^" pins it to the full name
    return {"^(?:" + "|".join(re.escape(n) for n in names) + ")": v for v, names in groups.items()}


def network_lora_config(handle: NetworkHandle) -> dict:
    """peft LoraConfig kwargs describing the network as it is now (current alphas)."""
    ranks = handle.module_ranks()
    alphas = handle.module_alphas()
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    names = handle.wrapped_module_names()
    return {
        "r": int(r),
        "lora_alpha": float(alpha),
        "rank_pattern": _group_pattern(ranks, r),
        "alpha_pattern": _group_pattern(alphas, alpha),
        "target_modules": "^(?:" + "|".join(re.escape(n) for n in names) + ")$",
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": handle.uses_dora,
        "use_rslora": False,
        "init_lora_weights": True,
    }


def network_to_diffusers(
    handle: NetworkHandle, prefix: str = "unet", dtype: torch.dtype = torch.float16
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT keys "<prefix>.<path>.lora_A.weight" / lora_B (DoRA: + lora_magnitude_vector) and
    metadata with the LoRA config. LoKr / LoHa raise ValueError (no diffusers layout)."""
    tensors, cfg = _diffusers_part(handle, prefix, dtype)
    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(cfg, indent=2, sort_keys=True)}
    return tensors, metadata


def _diffusers_part(
    handle: NetworkHandle, prefix: str, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """One network's PEFT tensors and LoRA config, both keyed "<prefix>.<name>"."""
    if handle.algo not in ("lora", "dora"):
        raise ValueError(f"{handle.algo} networks have no diffusers (PEFT) layout; write the LyCORIS layout")
    tensors = {f"{prefix}.{k}": _to_file(t, dtype) for k, t in handle.named_trainable_parameters().items()}
    cfg = {f"{prefix}.{k}": v for k, v in network_lora_config(handle).items()}
    return tensors, cfg


def kohya_to_network_state(
    handle: NetworkHandle,
    tensors: dict[str, torch.Tensor],
    prefix: str = "lora_unet",
    key_for: KeyFor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Inverse of `network_to_kohya`: (state in the handle's peft names, {module name: alpha}).

    Reads either weight naming (lora_down / lora_up or lora_A / lora_B), DoRA's `.dora_scale`
    (output-axis layout) and, for LoKr / LoHa networks, the LyCORIS layout.

    A module without `.alpha` gets alpha = its rank (what every loader assumes). Keys that name no
    wrapped module, and wrapped modules missing from the file, raise KeyError; an input-axis
    `dora_scale` (older LyCORIS files) raises ValueError (peft's DoRA normalises per output channel).
    """
    names = _kohya_names(handle, prefix, key_for)
    if handle.algo in ("lokr", "loha"):
        from aitk.networks.lycoris_files import lycoris_to_network_state

        return lycoris_to_network_state(handle, tensors, names)  # type: ignore[arg-type]
    params = handle.named_trainable_parameters()
    by_key = {v: k for k, v in names.items()}
    state: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    unexpected: list[str] = []
    for key, t in tensors.items():
        # stems may contain dots ("diffusion_model.blocks.0..."): split off the known suffix
        stem, kind = key, ""
        for suffix in ("lora_down.weight", "lora_up.weight", "lora_A.weight", "lora_B.weight", "alpha", "dora_scale"):
            if key.endswith("." + suffix):
                stem, kind = key[: -len(suffix) - 1], suffix
                break
        module = by_key.get(stem)
        if module is None:
            unexpected.append(key)
        elif kind in ("lora_down.weight", "lora_A.weight"):
            state[f"{module}.lora_A.weight"] = t
        elif kind in ("lora_up.weight", "lora_B.weight"):
            state[f"{module}.lora_B.weight"] = t
        elif kind == "alpha":
            alphas[module] = float(t.item())
        elif kind == "dora_scale" and handle.uses_dora:
            state[f"{module}.lora_magnitude_vector"] = _magnitude_from_file(
                t, params[f"{module}.lora_magnitude_vector"].shape, key
            )
        else:
            unexpected.append(key)
    expected = set(params)
    missing = sorted(expected - set(state))
    if unexpected or missing:
        raise KeyError(
            f"LoRA file does not match the network (prefix {prefix!r}): {len(missing)} missing "
            f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}"
        )
    for name in names:
        alphas.setdefault(name, float(handle.module_rank(name)))
    alphas = {n: alphas[n] for n in names}
    return state, alphas


def _magnitude_from_file(t: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
    """A `dora_scale` (out, 1[, 1, 1]) as peft's magnitude vector of `shape`."""
    out = max(shape)  # peft: (out,) for linear layers, (1, out, 1, 1) for convs
    if t.shape[0] != out or t.numel() != out:
        raise ValueError(
            f"{key}: dora_scale of shape {tuple(t.shape)} is not the output-axis layout (out={out}, 1, ...); "
            "files that normalise per input channel cannot be loaded into peft's DoRA"
        )
    return t.reshape(shape)


def diffusers_to_network_state(
    handle: NetworkHandle, tensors: dict[str, torch.Tensor], prefix: str = "unet"
) -> dict[str, torch.Tensor]:
    """Inverse of `network_to_diffusers`'s tensors: strip "<prefix>." (alphas live in metadata)."""
    p = prefix + "."
    state = {k[len(p):] if k.startswith(p) else k: v for k, v in tensors.items()}
    expected = set(handle.named_trainable_parameters())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(
            f"LoRA file does not match the network (prefix {prefix!r}): {len(missing)} missing "
            f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}"
        )
    return state



class NonFiniteWeightsError(ValueError):
    """The weights to be saved hold NaN or inf (a diverged run, or values beyond the save dtype)."""


def save_lora(
    path: str | Path,
    handle: NetworkHandle,
    *,
    save_format: str = "comfyui",
    prefix: str = "lora_unet",
    dtype: torch.dtype = torch.float16,
    metadata: dict[str, str] | None = None,
    diffusers_prefix: str = "unet",
    key_for: KeyFor | None = None,
    weight_names: tuple[str, str] | None = None,
    text_encoders: Sequence[TextEncoderPart] = (),
    fused: FusedWeights | None = None,
    alpha_in_weights: bool = False,
) -> Path:
    """Write the network to a .safetensors file (atomically) and return its path.

    save_format "comfyui" / "kohya": kohya layout with `prefix` (same file for both), key stems
    from `key_for` when given, weight names `weight_names` (None: lora_down / lora_up; the
    trainer passes the model adapter's `lora_weight_names`);
    "diffusers": PEFT keys under `diffusers_prefix` plus the LoRA config in the metadata.
    `text_encoders`: text-encoder networks written beside the denoiser's (module docstring).
    `fused`: the model's fused weights (the adapter's `lora_fused_weights`): in the comfyui / kohya
    layout their split LoRA / DoRA parts are written as one LoRA each (aitk.networks.fused_files).
    `alpha_in_weights` (the adapter's `lora_alpha_in_weights`): in the comfyui / kohya layout the
    denoiser's LoRA / DoRA modules get alpha / rank folded into up, no `.alpha`, and the header
    record of the trained alphas (aitk.networks.folded_alpha).
    `metadata` (all values str) is added to the file's header.
    """
    fmt = str(save_format).lower()
    if fmt not in SAVE_FORMATS:
        raise ValueError(f"save_format {save_format!r} is not supported; use one of {', '.join(SAVE_FORMATS)}")
    if fmt == "diffusers" and handle.algo in ("lokr", "loha"):
        warnings.warn(
            f"{Path(path).name}: diffusers' load_lora_weights cannot load {handle.algo}; written in the "
            "LyCORIS key layout (ComfyUI, Forge, LyCORIS, aitk) instead of the diffusers layout",
            stacklevel=2,
        )
        fmt = "comfyui"
    if fmt in ("comfyui", "kohya"):
        if weight_names is None:
            weight_names = KOHYA_WEIGHT_NAMES
        fold = alpha_in_weights and handle.algo in ("lora", "dora")
        tensors = network_to_kohya(handle, prefix=prefix, dtype=dtype, key_for=key_for, weight_names=weight_names,
                                   fold_alpha=fold)
        for te_handle, naming in text_encoders:
            _add_distinct(
                tensors, network_to_kohya(te_handle, dtype=dtype, key_for=naming.key_stem, weight_names=weight_names)
            )
        header: dict[str, str] = {"format": "pt"}
        if fold:
            header[ALPHA_RECORD_KEY] = alpha_record_json(handle.module_alphas())
        if fused is not None:
            tensors = _fused_for_comfyui(tensors, header, fused, handle.algo)
            if fold:  # fused groups of folded parts: alpha R over rank R, scale 1 like the rest
                tensors = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
        # only plain LoRA files load in diffusers' kohya converter (it drops dora_scale, skips LyCORIS)
        kohya_lora = prefix.startswith("lora_unet") and handle.algo == "lora"
        conflicts = diffusers_kohya_alpha_conflicts(handle) if kohya_lora else []
        if conflicts:
            warnings.warn(
                f"{Path(path).name}: diffusers' kohya loader will apply the file's most common alpha to "
                f"{len(conflicts)} attention module(s) (e.g. {conflicts[0]}) instead of their own; ComfyUI "
                "reads them right. Give linear and conv modules the same alpha, or save_format: diffusers, "
                "for an exact diffusers load.",
                stacklevel=2,
            )
    else:
        tensors, cfg = _diffusers_part(handle, diffusers_prefix, dtype)
        for te_handle, naming in text_encoders:
            te_tensors, te_cfg = _diffusers_part(te_handle, naming.encoder, dtype)
            _add_distinct(tensors, te_tensors)
            cfg.update(te_cfg)
        header = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(cfg, indent=2, sort_keys=True)}
    for k, v in (metadata or {}).items():
        if not isinstance(v, str):
            raise TypeError(f"metadata value of {k!r} must be str, got {type(v).__name__}")
        if k in (LORA_ADAPTER_METADATA_KEY, FUSED_RECORD_KEY, ALPHA_RECORD_KEY) and k in header:
            continue  # the config / fused record describing these tensors wins
        header[k] = v
    bad = [key for key, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:  # a file that would break every image made with it is never written
        raise NonFiniteWeightsError(
            f"{Path(path).name} is not written: {len(bad)} of its tensors hold NaN or inf values "
            f"(e.g. {', '.join(bad[:3])}) in save dtype {str(dtype).removeprefix('torch.')}"
        )
    from aitk.networks.metadata import safetensors_bytes_with_hashes

    data = safetensors_bytes_with_hashes(tensors, header)  # + sshs_model_hash, sshs_legacy_hash, modelspec.hash_sha256
    return atomic_write_bytes(path, data)


def _fused_for_comfyui(
    tensors: dict[str, torch.Tensor], header: dict[str, str], fused: FusedWeights, algo: str
) -> dict[str, torch.Tensor]:
    """The denoiser's tensors with split q / k / v groups fused (their record added to `header`);
    a warning names the groups ComfyUI will skip (LoKr / LoHa, or parts that cannot fuse)."""
    if algo in ("lokr", "loha"):
        if any(fused.fused_stem(k.rsplit(".", 1)[0]) for k in tensors):
            warnings.warn(
                f"{algo} keeps q / k / v under split names, which ComfyUI skips (its model holds one fused "
                "qkv weight): train LoRA or DoRA, or exclude the attention q / k / v, to use the file fully there",
                stacklevel=3,
            )
        return tensors
    out, record, left = fuse_lora_tensors(tensors, fused)
    if record:
        header[FUSED_RECORD_KEY] = json.dumps(record, separators=(",", ":"))
    if left:
        stem, why = next(iter(left.items()))
        warnings.warn(
            f"{len(left)} q / k / v group(s) keep split names, which ComfyUI skips (e.g. {stem}: {why}); "
            "give q, k and v the same rank and alpha to write them fused",
            stacklevel=3,
        )
    return out


def text_encoder_tensors(tensors: dict[str, torch.Tensor], naming: TextEncoderNaming) -> dict[str, torch.Tensor]:
    """One text encoder's keys in a LoRA file: kohya `<prefix>_...` or diffusers `<encoder>....`."""
    starts = (naming.prefix + "_", naming.encoder + ".")
    return {k: v for k, v in tensors.items() if k.startswith(starts)}


def _add_distinct(tensors: dict[str, torch.Tensor], more: dict[str, torch.Tensor]) -> None:
    """Add `more` to `tensors`; a key both hold would lose one network's weights."""
    clash = sorted(set(tensors) & set(more))
    if clash:
        raise ValueError(f"two networks write the same LoRA keys, e.g. {clash[:3]}")
    tensors.update(more)


def load_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (on CPU) and header metadata of a .safetensors LoRA file."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, metadata


def config_alphas(config: dict, names: list[str]) -> dict[str, float]:
    """Each module's alpha under a peft LoraConfig dict (lora_alpha + alpha_pattern, keys without
    the "<prefix>." diffusers adds), matched the way peft matches pattern keys."""
    default = float(config.get("lora_alpha", config.get("r", 1)))
    pattern: dict[str, float] = config.get("alpha_pattern") or {}
    out: dict[str, float] = {}
    for name in names:
        alpha = default
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", name):
                alpha = float(value)
                break
        out[name] = alpha
    return out


def _unprefixed_config(metadata: dict[str, str], prefix: str) -> dict | None:
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    cfg = json.loads(raw)
    p = prefix + "."
    return {k[len(p):] if k.startswith(p) else k: v for k, v in cfg.items()}


def is_diffusers_layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str], diffusers_prefix: str) -> bool:
    """A PEFT-keyed file (our save_format diffusers): no `.alpha` tensors, keys under "<prefix>."
    with lora_A / lora_B. FLUX's comfyui files also use lora_A / lora_B but always carry `.alpha`;
    folded comfyui files (no `.alpha`) carry DoRA as `.dora_scale` and the alpha record without a
    LoRA config."""
    if any(k.endswith((".alpha", ".dora_scale")) for k in tensors):
        return False
    if ALPHA_RECORD_KEY in metadata and LORA_ADAPTER_METADATA_KEY not in metadata:
        return False
    p = diffusers_prefix + "."
    return all(k.startswith(p) for k in tensors) and any(".lora_A." in k for k in tensors)


def load_network_file(
    handle: NetworkHandle,
    source: str | Path | tuple[dict[str, torch.Tensor], dict[str, str]],
    *,
    prefix: str = "lora_unet",
    key_for: KeyFor | None = None,
    diffusers_prefix: str = "unet",
    fused: FusedWeights | None = None,
) -> dict[str, float]:
    """Load a file we wrote (any save_format, any network type) into a network of the same
    configuration: weights copied in, and the file's alphas put in effect. Returns {module: alpha}.
    Fused q / k / v LoRAs are split back first (by the header's record, or by `fused` in files
    without one; aitk.networks.fused_files).

    `source`: a path, or (tensors, metadata) already read. Naming arguments as for `save_lora`
    (the trainer passes the model adapter's `lora_prefix`, `lora_key_stem`, `diffusers_lora_prefix`).
    Alphas: one per kind (linear / conv) through `set_alphas` when the file's modules share it,
    otherwise per module (`set_module_alphas`). LoKr modules without a rank-decomposed factor
    have no alpha to load (their scale is 1). Files with alpha folded into the up weights get
    their trained alphas back from the header's record (aitk.networks.folded_alpha).
    """
    tensors, metadata = load_lora_file(source) if isinstance(source, (str, Path)) else source
    if handle.algo in ("lora", "dora") and is_diffusers_layout(tensors, metadata, diffusers_prefix):
        state = diffusers_to_network_state(handle, tensors, prefix=diffusers_prefix)
        cfg = _unprefixed_config(metadata, diffusers_prefix)
        names = handle.wrapped_module_names()
        # no config: diffusers' convention, alpha = rank (scale 1)
        alphas = config_alphas(cfg, names) if cfg else {n: float(handle.module_rank(n)) for n in names}
    else:
        if handle.algo in ("lora", "dora"):
            tensors = _split_fused(handle, tensors, metadata, prefix, key_for, fused)
        state, alphas = kohya_to_network_state(handle, tensors, prefix=prefix, key_for=key_for)
    if handle.algo in ("lora", "dora") and ALPHA_RECORD_KEY in metadata:
        ups = {n: state[f"{n}.lora_B.weight"] for n in handle.wrapped_module_names()}
        ranks = {n: int(state[f"{n}.lora_A.weight"].shape[0]) for n in ups}
        alphas = unfold_alphas(ups, ranks, alphas, metadata)
        state.update({f"{n}.lora_B.weight": t for n, t in ups.items()})
    handle.load_network_state_dict(state)
    if alphas:
        conv = {n: a for n, a in alphas.items() if handle.is_conv_module(n)}
        linear = {n: a for n, a in alphas.items() if n not in conv}

        def common(values: dict[str, float]) -> float | None:
            return collections.Counter(values.values()).most_common(1)[0][0] if values else None

        lin, cv = common(linear), common(conv)
        handle.set_alphas(lin if lin is not None else handle.linear_alpha, cv)
        odd = {n: a for n, a in alphas.items() if a != (cv if n in conv else lin)}
        if odd:
            handle.set_module_alphas(odd)
    return alphas


def _split_fused(
    handle: NetworkHandle, tensors: dict[str, torch.Tensor], metadata: dict[str, str], prefix: str,
    key_for: KeyFor | None, fused: FusedWeights | None,
) -> dict[str, torch.Tensor]:
    """The file's fused q / k / v LoRAs as the network's split modules; ValueError saying what to do
    for a fused LoRA the network cannot take (no record of its split, or not block-diagonal)."""
    split, _, shared = split_fused_lora(tensors, metadata, fused)
    if shared:
        raise ValueError(
            f"{shared[0]} (and {len(shared) - 1} more) hold a fused q / k / v LoRA whose up is not block-diagonal "
            "(trained on the fused weight, by another tool): it is no set of separate rank-r q / k / v LoRAs, so "
            "this network cannot continue it. For inference convert it (aitk convert --to diffusers: exact, "
            "q / k / v get the fused rank each) or bake it in (aitk merge)"
        )
    wrapped = set(_kohya_names(handle, prefix, key_for).values())
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in split}
    for stem in sorted(stems - wrapped):
        parts = sorted(w for w in wrapped if w.startswith(stem + "."))
        if parts:
            raise ValueError(
                f"{stem} holds one LoRA for a fused weight that this network trains as {len(parts)} layers "
                f"({', '.join(p[len(stem) + 1:] for p in parts)}), and the file does not record how it splits "
                "(no aitk_fused_lora header: another tool's file). Read it with aitk convert --to diffusers "
                "--arch <arch>, which knows the model's sizes, or bake it in with aitk merge"
            )
    return split
