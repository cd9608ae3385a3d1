"""`aitk lora info file.safetensors [--json]`: what a network file holds, read from the file alone.

Architecture (from the header's modelspec.architecture / ss_base_model_version when present,
else guessed from key names and shapes), key layout, network type (lora / locon / dora / lokr /
loha), ranks, alphas, module count, tensor dtypes, the header metadata, and whether the weight
hash in the header (sshs_model_hash) matches the file's tensors. Files with more than one part
(the denoiser and text encoders: kohya `lora_unet` / `lora_te` / `lora_te1` / `lora_te2`,
diffusers `unet` / `text_encoder` / `text_encoder_2`) get the same figures per part, and for a
text encoder its CLIP layers and the module kinds trained in them. Fused q / k / v LoRAs that
the header records (Lumina 2, FLUX.2: one LoRA on the original fused weight, which ComfyUI loads)
are counted as the layers aitk trained, and their number is shown. Files with alpha folded into
the up weights (aitk.networks.folded_alpha) show the trained alphas their header records.
"""

from __future__ import annotations

import collections
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from aitk.networks.export import _unprefixed_config, config_alphas
from aitk.networks.folded_alpha import ALPHA_RECORD_KEY, FoldedAlphaError, recorded_alphas
from aitk.networks.fused_files import FusedFileError, split_fused_lora
from aitk.networks.merge import group_by_module
from aitk.tools.layout import ToolError, is_peft_keyed, module_algo, read_network_tensors

__all__ = ["PartInfo", "LoraInfo", "lora_info", "format_info", "info_command"]

#: header values longer than this are shortened in the text report (--json prints them whole)
SHOWN_VALUE_CHARS = 160


@dataclass
class PartInfo:
    """One model part's modules in the file (the denoiser, a text encoder)."""

    part: str  # unet, transformer, te (SD 1.x / 2.x CLIP), te1 (SDXL CLIP-L), te2 (SDXL OpenCLIP-G)
    network_type: str
    modules: int
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, int] = field(default_factory=dict)
    #: text encoders: how many CLIP layers carry LoRA, and the module kinds (q_proj, fc1, ...)
    layers: int = 0
    targets: list[str] = field(default_factory=list)


@dataclass
class LoraInfo:
    path: str
    size_bytes: int
    architecture: str
    architecture_source: str
    layout: str
    network_type: str
    modules: int
    conv_modules: int
    ranks: dict[str, int] = field(default_factory=dict)  # rank (as text: "4", "full") -> modules
    alphas: dict[str, int] = field(default_factory=dict)  # alpha -> modules ("none" = scale 1)
    dtypes: dict[str, int] = field(default_factory=dict)  # weight dtype -> tensors
    #: modules per key prefix (lora_unet, lora_te1, transformer, ...), when there is more than one
    components: dict[str, int] = field(default_factory=dict)
    #: per key prefix, when there is more than one or a text encoder's: its figures
    parts: dict[str, PartInfo] = field(default_factory=dict)
    #: keys of no LoRA / LoKr / LoHa / DoRA kind (shown so a foreign file's extras are not hidden)
    other_keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    hash_check: str = ""
    #: fused q / k / v LoRAs in the file (each counted above as its split layers)
    fused_groups: int = 0
    #: LoRA / DoRA alpha folded into the up weights (the file applies scale 1); `alphas` are the
    #: trained ones the header records
    alpha_in_weights: bool = False


def _arch_from_metadata(metadata: dict[str, str]) -> tuple[str, str] | None:
    """(arch key, source) from the header, matched against each adapter's own values."""
    import importlib

    from aitk.models.archs import ADAPTERS

    spec = metadata.get("modelspec.architecture")
    version = metadata.get("ss_base_model_version")
    for arch, target in ADAPTERS.items():
        module_name, class_name = target.split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        v_names = getattr(cls, "v_prediction_names", ("", ""))
        specs = {getattr(cls, "modelspec_architecture", ""), getattr(cls, "schnell_architecture", ""), v_names[1]} - {""}
        if spec and spec in specs:
            return arch, f"header: modelspec.architecture = {spec}"
    for arch, target in ADAPTERS.items():
        module_name, class_name = target.split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        if version and version in (getattr(cls, "base_model_version", None), getattr(cls, "v_prediction_names", ("",))[0]):
            return arch, f"header: ss_base_model_version = {version}"
    return None


def _key_sharers(tensors: dict[str, torch.Tensor]) -> str:
    """For a guess: the architectures whose files carry the guessed one's key names (told apart by
    the header alone: ModelAdapter.lora_keys_shared_with), as a note; "" when none."""
    from aitk.models.archs import ADAPTERS
    from aitk.models.registry import adapter_class

    guessed = _guess_arch(tensors)
    sharers = [arch for arch in ADAPTERS if adapter_class(arch).lora_keys_shared_with == guessed]
    return f"; {' / '.join(sharers)} files have these keys too" if sharers else ""


def _guess_arch(tensors: dict[str, torch.Tensor]) -> str:
    """The architectures whose adapter recognises the file's key names and shapes
    (ModelAdapter.matches_lora_keys), "unknown" when none does."""
    from aitk.models.archs import ADAPTERS
    from aitk.models.registry import adapter_class

    matches: list[str] = []
    seen: set[type] = set()
    for arch in ADAPTERS:  # an adapter serving several names (aliases) is named once, by its first
        cls = adapter_class(arch)
        if cls not in seen:
            seen.add(cls)
            if cls.matches_lora_keys(tensors):
                matches.append(arch)
    if len(matches) > 1:
        return f"{' / '.join(matches)} (their files share one naming)"
    return matches[0] if matches else "unknown"


def _rank(parts: dict[str, torch.Tensor]) -> str:
    if "down" in parts:
        return str(int(parts["down"].shape[0]))
    for key in ("lokr_w2_b", "lokr_w1_b", "hada_w1_b"):
        if key in parts:
            return str(int(parts[key].shape[0]))
    return "full"  # LoKr with both factors full: no rank, alpha has no effect


def _is_conv(parts: dict[str, torch.Tensor]) -> bool:
    """A kxk conv module (LoCon); 1x1 convs count as linear, as in training."""
    for key in ("down", "lokr_w2", "lokr_t2", "hada_t1"):
        t = parts.get(key)
        if t is not None and t.dim() == 4 and tuple(t.shape[2:]) != (1, 1):
            return True
    b = parts.get("lokr_w2_b")
    return b is not None and b.dim() == 4 and tuple(b.shape[2:]) != (1, 1)


def _component(stem: str) -> str:
    """The model part a key stem belongs to: "lora_unet", "lora_te1", "transformer", ..."""
    if stem.startswith("lora_"):
        return "_".join(stem.split("_", 2)[:2])
    return stem.split(".", 1)[0]


#: key prefix -> part name ("text_encoder" is te1 beside a text_encoder_2, else te)
_PART_NAMES = {
    "lora_unet": "unet", "unet": "unet", "transformer": "transformer", "diffusion_model": "transformer",
    "lora_te": "te", "lora_te1": "te1", "lora_te2": "te2", "text_encoder_2": "te2",
}
#: a CLIP module in a kohya stem or a diffusers path: its layer and kind (q_proj, fc1, ...)
_CLIP_MODULE = re.compile(r"layers[._](\d+)[._](?:self_attn|mlp)[._](\w+)$")
_CLIP_ORDER = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _clip_order(kind: str) -> tuple[int, str]:
    return (_CLIP_ORDER.index(kind) if kind in _CLIP_ORDER else len(_CLIP_ORDER), kind)


def _network_type(groups: list[dict[str, torch.Tensor]]) -> str:
    algos = {module_algo(parts) for parts in groups}
    if algos == {"lora"} and any(_is_conv(parts) for parts in groups):
        return "locon"
    return "+".join(sorted(algos)) or "none"


def _count(values: list[str]) -> dict[str, int]:
    return dict(collections.Counter(values).most_common())


def _parts(weighted: dict[str, dict[str, torch.Tensor]], alphas: dict[str, float]) -> dict[str, PartInfo]:
    by_component: dict[str, list[str]] = {}
    for stem in weighted:
        by_component.setdefault(_component(stem), []).append(stem)
    out: dict[str, PartInfo] = {}
    for component, stems in by_component.items():
        part = _PART_NAMES.get(component, component)
        if component == "text_encoder":
            part = "te1" if "text_encoder_2" in by_component else "te"
        layers: set[str] = set()
        targets: dict[str, None] = {}
        if part.startswith("te"):
            for stem in stems:
                found = _CLIP_MODULE.search(stem)
                if found:
                    layers.add(found.group(1))
                    targets[found.group(2)] = None
        out[component] = PartInfo(
            part=part,
            network_type=_network_type([weighted[s] for s in stems]),
            modules=len(stems),
            ranks=_count([_rank(weighted[s]) for s in stems]),
            alphas=_count([f"{alphas[s]:g}" if s in alphas else "none" for s in stems]),
            layers=len(layers),
            targets=sorted(targets, key=_clip_order),
        )
    # the denoiser first, then te / te1 / te2
    return dict(sorted(out.items(), key=lambda item: (item[1].part.startswith("te"), item[1].part)))


def _hash_line(path: Path) -> str:
    from aitk.networks import metadata as md

    verify = getattr(md, "verify_file_hashes", None)
    if verify is None:
        return "not checked (this version has no hash verifier)"
    check = verify(path)
    key = "sshs_model_hash"
    stored = check.stored.get(key)
    if stored is None:
        return f"{key} is not in the header"
    if key in check.mismatched:
        return f"{key} does NOT match the file (header {stored[:12]}..., tensors {check.computed[key][:12]}...)"
    others = [k for k in check.mismatched if k != key]
    tail = f"; {', '.join(others)} do not" if others else ""
    return f"{key} matches the file ({stored[:12]}...){tail}"


def lora_info(path: str | Path) -> LoraInfo:
    tensors, metadata = read_network_tensors(path)
    p = Path(path).expanduser()
    fused: list[str] = []
    if not is_peft_keyed(tensors, metadata):
        try:
            tensors, fused, _ = split_fused_lora(tensors, metadata)
        except FusedFileError as exc:
            raise ToolError(f"{path}: {exc}") from None
    groups, unknown = group_by_module(tensors)
    if unknown and not groups:
        raise ToolError(f"{path}: no LoRA / LoKr / LoHa / DoRA tensors in the file (e.g. keys {unknown[:3]})")
    alphas: dict[str, float] = {}
    if is_peft_keyed(tensors, metadata):
        prefixes = sorted(dict.fromkeys(s.split(".", 1)[0] for s in groups), key=lambda p: p.startswith("text_encoder"))
        layout = f"diffusers / PEFT ({' / '.join(prefixes)}.<module>.lora_A / lora_B, alphas in lora_adapter_metadata)"
        for prefix in prefixes:
            try:
                cfg = _unprefixed_config(metadata, prefix)
            except ValueError:
                cfg = None
            if cfg:
                names = [s[len(prefix) + 1:] for s in groups if s.startswith(prefix + ".")]
                alphas.update({f"{prefix}.{n}": a for n, a in config_alphas(cfg, names).items()})
    else:
        kinds = sorted({module_algo(parts) for parts in groups.values()})
        tensor_names = "LyCORIS tensor names" if set(kinds) & {"lokr", "loha"} else (
            "lora_A / lora_B" if any(".lora_A." in k for k in tensors) else "lora_down / lora_up")
        where = "alpha folded into the up weights" if ALPHA_RECORD_KEY in metadata else ".alpha per module"
        layout = f"comfyui / kohya ({tensor_names}, {where})"
        alphas = {s: float(parts["alpha"].item()) for s, parts in groups.items() if "alpha" in parts}
    weighted = {s: parts for s, parts in groups.items() if set(parts) - {"alpha"}}
    folded = _folded_alphas(weighted, alphas, metadata, path)
    alphas.update(folded)
    conv = sum(_is_conv(parts) for parts in weighted.values())
    network_type = _network_type(list(weighted.values()))
    found = _arch_from_metadata(metadata)
    arch, source = found if found else (_guess_arch(tensors), "guessed from key names" + _key_sharers(tensors))
    components = collections.Counter(_component(s) for s in weighted)
    parts = _parts(weighted, alphas)
    dtypes = collections.Counter(
        str(t.dtype).removeprefix("torch.") for k, t in tensors.items() if not k.endswith(".alpha")
    )
    return LoraInfo(
        path=str(p),
        size_bytes=p.stat().st_size,
        architecture=arch,
        architecture_source=source,
        layout=layout,
        network_type=network_type,
        modules=len(weighted),
        conv_modules=conv,
        ranks=_count([_rank(p) for p in weighted.values()]),
        alphas=_count([f"{alphas[s]:g}" if s in alphas else "none" for s in weighted]),
        dtypes=dict(dtypes.most_common()),
        components=dict(components.most_common()) if len(components) > 1 else {},
        parts=parts if len(parts) > 1 or any(p.part.startswith("te") for p in parts.values()) else {},
        other_keys=sorted(unknown),
        metadata=dict(sorted(metadata.items())),
        hash_check=_hash_line(p),
        fused_groups=len(fused),
        alpha_in_weights=bool(folded),
    )


def _folded_alphas(
    weighted: dict[str, dict[str, torch.Tensor]], alphas: dict[str, float], metadata: dict[str, str],
    path: str | Path,
) -> dict[str, float]:
    """{stem: trained alpha} of the LoRA / DoRA modules whose alpha the header says is folded into
    their up weights (those without an alpha of their own other than rank). Stems are the file's, the
    record names module paths: a stem takes a listed alpha when it ends with that module's path."""
    try:
        found = recorded_alphas(metadata)
    except FoldedAlphaError as exc:
        raise ToolError(f"{path}: {exc}") from None
    if found is None:
        return {}
    common, listed = found
    out: dict[str, float] = {}
    for stem, parts in weighted.items():
        if "down" not in parts or alphas.get(stem, float(parts["down"].shape[0])) != float(parts["down"].shape[0]):
            continue
        own = [a for m, a in listed.items() if stem == m or stem.endswith("." + m)]
        out[stem] = own[0] if len(own) == 1 else common
    return out


def _counts(values: dict[str, int], what: str) -> str:
    if len(values) == 1:
        return next(iter(values))
    return ", ".join(f"{v} ({n} {what if n != 1 else what.rstrip('s')})" for v, n in values.items())


def _part_lines(parts: dict[str, PartInfo]) -> list[str]:
    """"  lora_te1 (te1): 12 lora modules in 2 CLIP layers (q_proj, ..., fc2), rank 4, alpha 2"."""
    lines = ["parts:"] if parts else []
    for component, p in parts.items():
        where = f" in {p.layers} CLIP layer{'s' if p.layers != 1 else ''} ({', '.join(p.targets)})" if p.layers else ""
        alpha = _counts(p.alphas, "modules")
        lines.append(f"  {component} ({p.part}): {p.modules} {p.network_type} modules{where}, "
                     f"rank {_counts(p.ranks, 'modules')}, alpha {'none (scale 1)' if alpha == 'none' else alpha}")
    return lines


def format_info(info: LoraInfo) -> list[str]:
    size = f"{info.size_bytes / 2**20:.1f} MiB" if info.size_bytes >= 2**20 else f"{info.size_bytes} bytes"
    alpha = _counts(info.alphas, "modules")
    if alpha == "none":
        alpha = "none in the file (alpha = rank, scale 1)"
    elif info.alpha_in_weights:
        alpha += " (trained; folded into the up weights: every loader applies scale 1)"
    lines = [
        f"file:          {info.path} ({size})",
        f"architecture:  {info.architecture} ({info.architecture_source})",
        f"layout:        {info.layout}",
        f"network type:  {info.network_type}",
        f"modules:       {info.modules}" + (f" ({info.conv_modules} kxk conv)" if info.conv_modules else "")
        + (f"; by part: {_counts(info.components, 'modules')}" if info.components and not info.parts else ""),
        f"rank:          {_counts(info.ranks, 'modules')}",
        f"alpha:         {alpha}",
        *([f"fused:         {info.fused_groups} q / k / v groups stored as one LoRA on the fused weight "
           "(ComfyUI's layout), counted as their split layers"] if info.fused_groups else []),
        *_part_lines(info.parts),
        f"dtype:         {_counts(info.dtypes, 'tensors')}",
        f"hash:          {info.hash_check}",
        *([f"other keys:    {len(info.other_keys)} of no network kind (e.g. {info.other_keys[:3]})"]
          if info.other_keys else []),
        f"metadata:      {len(info.metadata)} keys" + (":" if info.metadata else ""),
    ]
    for key, value in info.metadata.items():
        shown = value if len(value) <= SHOWN_VALUE_CHARS else value[:SHOWN_VALUE_CHARS] + f"... ({len(value)} chars)"
        lines.append(f"  {key}: {shown}".replace("\n", " "))
    return lines


def info_command(path: str, as_json: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The CLI entry: 0 on success, 1 with a message (no traceback) on bad input."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        info = lora_info(path)
    except (ToolError, ValueError) as exc:  # ValueError: the hash verifier on a damaged file
        print(f"error: {exc}", file=err)
        return 1
    if as_json:
        print(json.dumps(asdict(info), indent=2), file=out)
    else:
        for line in format_info(info):
            print(line, file=out)
    return 0
