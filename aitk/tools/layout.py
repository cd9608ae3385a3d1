"""Reading a network file into one model-free form: module name -> its tensors.

The tools (`aitk convert`, `aitk merge`, `aitk lora info`) need to know which module each key
of a file belongs to without loading the base model (a FLUX or WAN checkpoint is tens of GB).
The file layouts (aitk/networks/export.py) name modules in two ways:

- comfyui / kohya: a key stem per module from the model adapter's `lora_key_stem`
  (`lora_unet_<path with "_">` for SD / SDXL, `transformer.<path>` for FLUX,
  `diffusion_model.<original WAN name>` for WAN), then lora_down / lora_up (or lora_A / lora_B),
  `.alpha`, `.dora_scale`, or the LyCORIS tensor names;
- diffusers (PEFT): `<diffusers_lora_prefix>.<module path>.lora_A.weight` / `.lora_B.weight` /
  `.lora_magnitude_vector`, alphas in the `lora_adapter_metadata` header entry.

Text-encoder LoRA (SD 1.x / 2.x, SDXL; aitk.networks.text_encoders) sits in the same file under
kohya's `lora_te_` / `lora_te1_` / `lora_te2_` stems or diffusers' `text_encoder.` /
`text_encoder_2.` keys; it is split off by key prefix and kept per encoder, its module paths in
kohya's form (`text_model.encoder.layers.0.self_attn.q_proj`), whichever form the file used
(transformers 5's CLIPTextModel has no `text_model` level; diffusers and ComfyUI accept both).

Fused q / k / v LoRAs (Lumina 2's `attention.qkv`, FLUX.2's `img_attn.qkv`: one LoRA on the
original fused weight, aitk.networks.fused_files) are split back into their layers first, by the
header's record or, in other tools' files, by the family's `lora_fused_weights`.

Stems are turned back into module paths here and every result is checked by mapping it forward
again with the adapter's own `lora_key_stem`, so the inverse can never disagree with what the
trainer writes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aitk.networks.export import (
    _unprefixed_config,
    config_alphas,
    load_lora_file,
    text_encoder_tensors,
)
from aitk.networks.merge import group_by_module
from aitk.networks.text_encoders import CLIP_ROOT, TextEncoderNaming, text_encoder_namings

__all__ = [
    "ToolError",
    "NetworkFile",
    "read_network_tensors",
    "naming_adapter",
    "split_text_encoder_tensors",
    "is_peft_keyed",
    "parse_network_file",
    "modules_to_kohya",
    "module_algo",
    "magnitude_to_dora_scale",
    "dora_scale_to_magnitude",
]


class ToolError(Exception):
    """A problem with the user's input: the message says what and how to fix it (no traceback)."""


def read_network_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of a .safetensors network file, or ToolError saying why not."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ToolError(f"{path}: no such file")
    if not p.is_file():
        raise ToolError(f"{path}: not a file (give a .safetensors LoRA file)")
    try:
        tensors, metadata = load_lora_file(p)
    except Exception as exc:  # safetensors raises its own error type for anything unreadable
        raise ToolError(f"{path}: not a readable .safetensors file ({exc})") from exc
    if not tensors:
        raise ToolError(f"{path}: the file holds no tensors")
    return tensors, metadata


def naming_adapter(arch: str) -> Any:
    """The model adapter of `arch`, constructed but not loaded: it only answers naming questions
    (`lora_key_stem`, `lora_prefix`, `diffusers_lora_prefix`, `lora_weight_names`)."""
    from aitk.config.schema import ModelConfig
    from aitk.models.archs import supported_archs
    from aitk.models.registry import UnknownArchitectureError, adapter_class

    try:
        cls = adapter_class(arch)
    except UnknownArchitectureError:
        raise ToolError(f"--arch {arch!r} is not supported; use one of {', '.join(supported_archs())}") from None
    return cls(ModelConfig(name_or_path="(naming only)", arch=arch), torch.device("cpu"), torch.float32)


@dataclass
class NetworkFile:
    """One network file, by module. Parts use the kohya names: down, up, alpha (0-dim float32),
    dora_scale (output-axis, (out, 1[, 1, 1])), or the LyCORIS suffixes (lokr_w1, hada_w1_a, ...)."""

    layout: str  # "comfyui" (also kohya: the same file) or "diffusers"
    modules: dict[str, dict[str, torch.Tensor]]
    metadata: dict[str, str] = field(default_factory=dict)
    #: (down, up) weight names found in a comfyui-layout file, None for diffusers / LyCORIS files
    weight_names: tuple[str, str] | None = None
    #: text encoder attribute ("text_encoder", "text_encoder_2") -> its modules, as `modules`,
    #: by kohya-form path ("text_model.encoder.layers.0.self_attn.q_proj")
    text_encoders: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)
    #: stems of the fused q / k / v LoRAs the file held (split into `modules`), and of those the
    #: ones whose up was not block-diagonal (their parts share the fused down, at its rank)
    fused: list[str] = field(default_factory=list)
    fused_shared_down: list[str] = field(default_factory=list)

    @property
    def algos(self) -> set[str]:
        every = [*self.modules.values(), *(p for m in self.text_encoders.values() for p in m.values())]
        return {module_algo(parts) for parts in every}

    @property
    def text_encoder_module_count(self) -> int:
        return sum(len(m) for m in self.text_encoders.values())


def module_algo(parts: dict[str, Any]) -> str:
    """"lokr", "loha", "dora" or "lora" from one module's part names."""
    if any(k.startswith("lokr_") for k in parts):
        return "lokr"
    if any(k.startswith("hada_") for k in parts):
        return "loha"
    if "dora_scale" in parts or "magnitude" in parts:
        return "dora"
    return "lora"


def magnitude_to_dora_scale(magnitude: torch.Tensor) -> torch.Tensor:
    """peft's DoRA magnitude ((out,) linear, (1, out, 1, 1) conv) -> LyCORIS's (out, 1[, 1, 1]).

    A reshape: the bytes are unchanged, which keeps conversions lossless."""
    out = magnitude.numel()
    return magnitude.reshape(out, 1, 1, 1) if magnitude.dim() == 4 else magnitude.reshape(out, 1)


def dora_scale_to_magnitude(scale: torch.Tensor, key: str) -> torch.Tensor:
    """LyCORIS's output-axis dora_scale -> peft's magnitude vector; ToolError for the input-axis
    layout of older LyCORIS files (peft normalises per output channel only)."""
    if scale.shape[0] != scale.numel():
        raise ToolError(
            f"{key}: dora_scale of shape {tuple(scale.shape)} normalises per input channel (older "
            "LyCORIS files); peft / diffusers' DoRA normalises per output channel, so it has no "
            "diffusers layout (aitk merge still applies it)"
        )
    out = scale.numel()
    return scale.reshape(1, out, 1, 1) if scale.dim() == 4 else scale.reshape(out)


# --- key stem -> module path --------------------------------------------------------------------
@functools.cache
def _unet_vocabulary() -> frozenset[str]:
    """Every name component of a diffusers UNet2DConditionModel's Linear / Conv2d paths
    ("down_blocks", "transformer_blocks", "to_q", ...), read off a small UNet with every block
    kind SD 1.x / 2.x / SDXL use, built on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            norm_num_groups=16,
            cross_attention_dim=32,
            attention_head_dim=8,
            transformer_layers_per_block=2,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,
        )
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return frozenset(p for n in names for p in n.split(".") if not p.isdigit())


def _kohya_segmentations(body: str, vocabulary: frozenset[str]) -> list[str]:
    """Every way to read "down_blocks_0_attentions_0_..._to_q" as a dotted path whose components
    are vocabulary names or numbers (normally exactly one)."""
    parts = body.split("_")
    found: list[str] = []

    def walk(i: int, acc: list[str]) -> None:
        if i == len(parts):
            found.append(".".join(acc))
            return
        for j in range(i + 1, len(parts) + 1):
            piece = "_".join(parts[i:j])
            if (j == i + 1 and piece.isdigit()) or piece in vocabulary:
                walk(j, acc + [piece])

    walk(0, [])
    return found


@functools.cache
def _wan_originals() -> dict[str, str]:
    """WAN's original layer path (inside a block: "self_attn.q") -> diffusers path ("attn1.to_q")."""
    from aitk.models.wan import keys as wan_keys

    inner = {orig: diff for diff, orig in wan_keys._BLOCK_NAMES.items()}
    other = {orig: diff for diff, orig in wan_keys._OTHER_NAMES.items()}
    return {**{f"@block.{k}": v for k, v in inner.items()}, **other}


@functools.cache
def _clip_vocabulary() -> frozenset[str]:
    """Every name component of a CLIP text encoder's Linear paths ("text_model", "encoder",
    "layers", "self_attn", "q_proj", "mlp", "fc1", ...), read off a small
    CLIPTextModelWithProjection built on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                            projection_dim=8)
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return frozenset({CLIP_ROOT.rstrip(".")} | {p for n in names for p in n.split(".") if not p.isdigit()})


def _is_clip_path(path: str) -> bool:
    return all(part.isdigit() or part in _clip_vocabulary() for part in path.split("."))


def _clip_path_for_stem(naming: TextEncoderNaming, stem: str) -> str | None:
    """"lora_te1_text_model_encoder_layers_0_self_attn_q_proj" -> "text_model.encoder.layers.0.self_attn.q_proj"."""
    if not stem.startswith(naming.prefix + "_"):
        return None
    found = [
        path for path in _kohya_segmentations(stem[len(naming.prefix) + 1:], _clip_vocabulary())
        if path.startswith(CLIP_ROOT) and naming.key_stem(path) == stem
    ]
    if len(found) > 1:
        raise ToolError(f"key stem {stem!r} reads as more than one module ({found}); cannot convert it")
    return found[0] if found else None


def _candidates(adapter: Any, stem: str) -> list[str]:
    """Module paths that might give `stem` (checked against lora_key_stem by the caller)."""
    prefix: str = adapter.lora_prefix
    out: list[str] = []
    inverse = getattr(adapter, "lora_module_for_stem", None)  # a family's own naming (Lumina 2)
    if inverse is not None and (found := inverse(stem)):
        out.append(found)
    if prefix.endswith(".") and stem.startswith(prefix):
        rest = stem[len(prefix):]
        out.append(rest)  # FLUX: transformer.<path>
        table = _wan_originals() if prefix == "diffusion_model." else {}
        head, _, tail = rest.partition(".")
        number, _, inner = tail.partition(".")
        if head == "blocks" and number.isdigit() and f"@block.{inner}" in table:
            out.append(f"blocks.{number}.{table[f'@block.{inner}']}")
        elif rest in table:
            out.append(table[rest])
    elif not prefix.endswith(".") and stem.startswith(prefix + "_"):
        out.extend(_kohya_segmentations(stem[len(prefix) + 1:], _unet_vocabulary()))
    return out


def _module_for_stem(adapter: Any, stem: str) -> str | None:
    matches = []
    for name in dict.fromkeys(_candidates(adapter, stem)):
        try:
            if adapter.lora_key_stem(name) == stem:
                matches.append(name)
        except ValueError:  # a path the arch's naming cannot express (WAN)
            continue
    if len(matches) > 1:
        raise ToolError(f"key stem {stem!r} reads as more than one module ({matches}); cannot convert it")
    return matches[0] if matches else None


def _example_stem(adapter: Any) -> str:
    """A typical key stem of this arch's files, for error messages."""
    if adapter.lora_prefix == "diffusion_model.":
        example = "blocks.0.attn1.to_q"
    elif adapter.lora_prefix.endswith("."):
        example = "transformer_blocks.0.attn.to_q"
    else:
        example = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    example = getattr(adapter, "lora_example_module", example)
    return adapter.lora_key_stem(example)


def _mismatch(adapter: Any, arch: str, stems: list[str], unknown: list[str]) -> ToolError:
    parts = []
    if stems:
        parts.append(f"{len(stems)} module key(s) name no {arch} module (e.g. {stems[:3]})")
    if unknown:
        parts.append(f"{len(unknown)} key(s) are no LoRA / LoKr / LoHa / DoRA tensor (e.g. {unknown[:3]})")
    hint = (
        f"; {arch} files name modules like {_example_stem(adapter)!r} (comfyui / kohya) or "
        f"'{adapter.diffusers_lora_prefix}.<module path>.lora_A.weight' (diffusers)"
    )
    if any(s.startswith(("lora_te", "text_encoder")) for s in stems):
        namings = text_encoder_namings(adapter).values()
        if namings:
            kohya = " / ".join(f"{n.prefix}_text_model_..." for n in namings)
            peft = " / ".join(f"{n.encoder}.<module path>" for n in namings)
            hint += f", and its text encoders' modules {kohya} (comfyui / kohya) or {peft} (diffusers)"
        else:
            hint += f"; aitk has no text-encoder LoRA for {arch} (SD 1.x / 2.x and SDXL files carry one)"
    return ToolError(", ".join(parts) + hint + " - is --arch right?")


def split_text_encoder_tensors(
    tensors: dict[str, torch.Tensor], adapter: Any
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(the denoiser's tensors, {text encoder attribute: its tensors}), by key prefix: kohya
    `lora_te_` / `lora_te1_` / `lora_te2_`, diffusers `text_encoder.` / `text_encoder_2.` (the
    adapter's `text_encoder_lora_prefixes`; none for models without text-encoder LoRA)."""
    encoders: dict[str, dict[str, torch.Tensor]] = {}
    for name, naming in text_encoder_namings(adapter).items():
        found = text_encoder_tensors(tensors, naming)
        if found:
            encoders[name] = found
    taken = {k for part in encoders.values() for k in part}
    return {k: v for k, v in tensors.items() if k not in taken}, encoders


def _adapter_config(metadata: dict[str, str], prefix: str) -> dict | None:
    try:
        return _unprefixed_config(metadata, prefix)
    except ValueError as exc:  # json.JSONDecodeError
        raise ToolError(f"the file's lora_adapter_metadata is not valid JSON ({exc})") from exc


def _with_dora_scale(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    parts = dict(parts)
    if "magnitude" in parts:
        parts["dora_scale"] = magnitude_to_dora_scale(parts.pop("magnitude"))
    return parts


def _diffusers_modules(
    groups: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str], prefix: str
) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT-keyed modules "<prefix>.<path>" -> {path: parts}, alphas from the file's config."""
    cfg = _adapter_config(metadata, prefix)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for stem, parts in groups.items():
        name = stem[len(prefix) + 1:]
        parts = _with_dora_scale(parts)
        if cfg:
            parts["alpha"] = torch.tensor(config_alphas(cfg, [name])[name], dtype=torch.float32)
        modules[name] = parts
    return modules


def _text_encoder_modules(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], naming: TextEncoderNaming, diffusers: bool
) -> tuple[dict[str, dict[str, torch.Tensor]], list[str], list[str]]:
    """One text encoder's (modules by kohya-form path, stems naming no CLIP module, unknown keys)."""
    groups, unknown = group_by_module(tensors)
    if diffusers:
        found = _diffusers_modules(groups, metadata, naming.encoder)
        unmatched = [f"{naming.encoder}.{p}" for p in found if not _is_clip_path(p)]
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for path, parts in found.items():
            name = path if path.startswith(CLIP_ROOT) else CLIP_ROOT + path
            if name in modules:
                raise ToolError(f"{naming.encoder}: module {path!r} appears with and without {CLIP_ROOT!r}")
            modules[name] = parts
        return modules, unmatched, unknown
    modules, unmatched = {}, []
    for stem, parts in groups.items():
        name = _clip_path_for_stem(naming, stem)
        if name is None:
            unmatched.append(stem)
        else:
            modules[name] = _with_dora_scale(parts)
    return modules, unmatched, unknown


def _check_modules(modules: dict[str, dict[str, torch.Tensor]], where: str = "") -> None:
    for name, parts in modules.items():
        has_lora = "down" in parts and "up" in parts
        has_lycoris = any(k.startswith(("lokr_", "hada_")) for k in parts)
        if not (has_lora or has_lycoris):
            raise ToolError(
                f"module {where}{name!r} has only {sorted(parts)} in the file: no weights (a damaged file?)"
            )
        if has_lora and has_lycoris:
            raise ToolError(f"module {where}{name!r} has both LoRA and LoKr / LoHa tensors: {sorted(parts)}")


def is_peft_keyed(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bool:
    """The diffusers (PEFT) layout: lora_A / lora_B under "<component>.", alphas in the header,
    no kohya `lora_...` stems (FLUX's comfyui files also use lora_A / lora_B but carry `.alpha`).
    comfyui files with alpha folded into the weights (aitk.networks.folded_alpha) have no `.alpha`
    either: they are told apart by ComfyUI's `diffusion_model.` names, DoRA's `.dora_scale`, or
    the header's alpha record without a LoRA config (AuraFlow's `transformer.` names are both)."""
    from aitk.networks.export import LORA_ADAPTER_METADATA_KEY
    from aitk.networks.folded_alpha import ALPHA_RECORD_KEY

    meta = metadata or {}
    if ALPHA_RECORD_KEY in meta and LORA_ADAPTER_METADATA_KEY not in meta:
        return False
    return (
        any(".lora_A." in k for k in tensors)
        and not any(k.endswith((".alpha", ".dora_scale")) for k in tensors)
        and not any(k.startswith(("lora_", "diffusion_model.")) for k in tensors)
    )


def parse_network_file(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], adapter: Any, arch: str
) -> NetworkFile:
    """Group a file's tensors by module of `arch`'s denoiser and text encoders; ToolError for keys
    that name no module in the arch's naming, for tensors of no known kind and for incomplete modules."""
    layout = "diffusers" if is_peft_keyed(tensors, metadata) else "comfyui"
    fused: list[str] = []
    shared: list[str] = []
    if layout == "comfyui":
        tensors, fused, shared = split_fused_tensors(tensors, metadata, adapter)
    denoiser, encoder_tensors = split_text_encoder_tensors(tensors, adapter)
    groups, unknown = group_by_module(denoiser)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unmatched: list[str] = []
    names_used: set[tuple[str, str]] = set()
    if layout == "diffusers":
        p = adapter.diffusers_lora_prefix + "."
        unmatched = [stem for stem in groups if not stem.startswith(p)]
        ours = {stem: parts for stem, parts in groups.items() if stem.startswith(p)}
        modules = _diffusers_modules(ours, metadata, adapter.diffusers_lora_prefix)
    else:
        for stem, parts in groups.items():
            name = _module_for_stem(adapter, stem)
            if name is None:
                unmatched.append(stem)
                continue
            modules[name] = _with_dora_scale(parts)
        for key in tensors:
            for pair in (("lora_down", "lora_up"), ("lora_A", "lora_B")):
                if key.endswith(f".{pair[0]}.weight"):
                    names_used.add(pair)
    namings = text_encoder_namings(adapter)
    text_encoders: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for name, part in encoder_tensors.items():
        found, bad, odd = _text_encoder_modules(part, metadata, namings[name], layout == "diffusers")
        text_encoders[name] = found
        unmatched += bad
        unknown += odd
    if unmatched or unknown:
        raise _mismatch(adapter, arch, unmatched, unknown)
    _check_modules(modules)
    for name, found in text_encoders.items():
        _check_modules(found, f"{name}.")
    if len(names_used) > 1:
        raise ToolError("the file mixes lora_down / lora_up and lora_A / lora_B names; cannot tell its layout")
    return NetworkFile(layout, modules, dict(metadata), next(iter(names_used), None), text_encoders, fused, shared)


def split_fused_tensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], adapter: Any
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(the tensors with fused q / k / v LoRAs split into their layers, the fused stems, those whose
    up was not block-diagonal); ToolError for a fused LoRA that cannot be split."""
    from aitk.networks.fused_files import FusedFileError, split_fused_lora

    try:
        return split_fused_lora(tensors, metadata, getattr(adapter, "lora_fused_weights", None))
    except FusedFileError as exc:
        raise ToolError(str(exc)) from None


def modules_to_kohya(
    modules: dict[str, dict[str, torch.Tensor]], stem_for: Callable[[str], str], weight_names: tuple[str, str],
    explicit_alpha: bool = True,
) -> dict[str, torch.Tensor]:
    """comfyui / kohya tensors of parsed modules: `stem_for(module path)` + the part's file name.
    `explicit_alpha`: a LoRA module without alpha gets `.alpha` = rank (False: left without, for
    files whose alpha is folded into the weights)."""
    down, up = weight_names
    out: dict[str, torch.Tensor] = {}
    for name, parts in modules.items():
        try:
            stem = stem_for(name)
        except ValueError as exc:
            raise ToolError(str(exc)) from None
        for part, t in parts.items():
            if part == "down":
                out[f"{stem}.{down}.weight"] = t
            elif part == "up":
                out[f"{stem}.{up}.weight"] = t
            elif part == "alpha":
                out[f"{stem}.alpha"] = t.to(torch.float32).reshape(())
            else:  # dora_scale and the LyCORIS names are written as they are named
                out[f"{stem}.{part}"] = t
        if explicit_alpha and "down" in parts and "alpha" not in parts:
            # ComfyUI reads no header: an explicit alpha (= rank, scale 1, what a file without
            # one means everywhere) keeps the strength the same in every loader
            out[f"{stem}.alpha"] = torch.tensor(float(parts["down"].shape[0]), dtype=torch.float32)
    return out
