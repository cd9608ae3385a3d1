"""`aitk convert in.safetensors --to diffusers|comfyui|kohya --arch ARCH [-o out.safetensors]`.

Rewrites a network file in another key layout of the same architecture (the layouts are
described in aitk/networks/export.py and docs/lora-formats.md). No model is loaded: key stems
are mapped to module paths by aitk.tools.layout, and back with the adapter's `lora_key_stem`.

Lossless: tensors keep their dtype and bytes (DoRA magnitudes are only reshaped between peft's
and LyCORIS's shapes), alphas move between `.alpha` tensors (float32) and the JSON of the
`lora_adapter_metadata` header entry, which holds every float32 exactly. So comfyui -> diffusers
-> comfyui gives back the same tensors. The header is carried over; `lora_adapter_metadata` is
written only in the diffusers layout (diffusers refuses it next to `.alpha` keys) and the weight
hashes are recomputed for the new tensors.

comfyui and kohya are the same file (as for save_format). Fused q / k / v LoRAs (Lumina 2, FLUX.2:
one LoRA on the original fused weight, aitk.networks.fused_files) are split for the diffusers
layout and fused again for comfyui, as the trainer writes them, bit for bit. LoKr / LoHa files have no diffusers
layout (diffusers' load_lora_weights reads neither), so `--to diffusers` refuses them.

Text-encoder LoRA (SD 1.x / 2.x, SDXL) converts with the rest: kohya `lora_te_` / `lora_te1_` /
`lora_te2_` stems <-> `text_encoder.` / `text_encoder_2.` PEFT keys, each encoder with its own
LoraConfig in the header (diffusers' layout for a pipeline's LoRA).

Families whose comfyui files hold alpha in the weights (the adapter's `lora_alpha_in_weights`,
aitk.networks.folded_alpha): such a file converts with its weights as they are (alpha = rank in
the diffusers config, scale 1) and keeps the header's record of the trained alphas, valid in both
layouts since it names module paths; so comfyui -> diffusers -> comfyui is bit for bit too. A
module whose alpha differs from its rank (a diffusers-layout file, an older file with `.alpha`)
is folded on the way to comfyui - up * alpha / rank in float32, rounded once to the file's dtype -
and added to the record.
"""

from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from aitk.networks.export import LORA_ADAPTER_METADATA_KEY, _group_pattern
from aitk.networks.folded_alpha import ALPHA_RECORD_KEY, FoldedAlphaError, alpha_record, alpha_record_json, fold_up
from aitk.networks.fused_files import FUSED_RECORD_KEY, fuse_lora_tensors
from aitk.networks.text_encoders import CLIP_ROOT, text_encoder_namings
from aitk.tools.layout import (
    NetworkFile,
    ToolError,
    dora_scale_to_magnitude,
    modules_to_kohya,
    naming_adapter,
    parse_network_file,
    read_network_tensors,
)

__all__ = ["TARGETS", "convert_file", "to_comfyui", "to_diffusers", "file_bytes", "convert_command"]

TARGETS = ("comfyui", "kohya", "diffusers")


def _rank(parts: dict[str, torch.Tensor]) -> int:
    return int(parts["down"].shape[0])


def _alpha(parts: dict[str, torch.Tensor]) -> float:
    """The module's alpha; a module without one has alpha = rank (scale 1), every loader's rule."""
    return float(parts["alpha"].item()) if "alpha" in parts else float(_rank(parts))


def to_comfyui(nf: NetworkFile, adapter: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The comfyui / kohya tensors of `nf` under the adapter's key stems and weight names (text
    encoders: kohya's lora_te_ / lora_te1_ / lora_te2_ stems), q / k / v fused where the family
    fuses them (with the header entry that records it); alpha folded into the weights where the
    family's files hold it there."""
    header: dict[str, str] = {}
    modules = nf.modules
    fold = bool(getattr(adapter, "lora_alpha_in_weights", False))
    if fold:
        modules, trained = _folded(nf)
        if trained:
            header[ALPHA_RECORD_KEY] = alpha_record_json(trained)
    out = modules_to_kohya(modules, adapter.lora_key_stem, adapter.lora_weight_names, explicit_alpha=not fold)
    spec = getattr(adapter, "lora_fused_weights", None)
    if spec is not None and nf.algos <= {"lora", "dora"}:
        out, record, _ = fuse_lora_tensors(out, spec)
        if record:
            header[FUSED_RECORD_KEY] = json.dumps(record, separators=(",", ":"))
        if fold:  # the fused groups of folded parts: alpha R over rank R, written as none (scale 1)
            out = {k: v for k, v in out.items() if not (k.endswith(".alpha") and k[: -len(".alpha")] in record)}
    namings = text_encoder_namings(adapter)
    for name, modules in nf.text_encoders.items():
        out.update(modules_to_kohya(modules, namings[name].key_stem, adapter.lora_weight_names))
    return out, header


def _folded(nf: NetworkFile) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """(the denoiser's modules with every LoRA / DoRA alpha folded into up and dropped, {module:
    trained alpha}): the file's record for modules already folded (alpha = rank in the file),
    the module's own alpha for those folded here. LoKr / LoHa modules are kept as they are."""
    try:
        recorded = alpha_record(nf.metadata, list(nf.modules)) or {}
    except FoldedAlphaError as exc:
        raise ToolError(str(exc)) from None
    out: dict[str, dict[str, torch.Tensor]] = {}
    trained: dict[str, float] = {}
    for name, parts in nf.modules.items():
        if "down" not in parts:
            out[name] = parts
            continue
        parts, rank, alpha = dict(parts), _rank(parts), _alpha(parts)
        parts.pop("alpha", None)
        if alpha == rank:
            trained[name] = recorded.get(name, alpha)
        else:
            parts["up"] = fold_up(parts["up"], alpha, rank)
            trained[name] = alpha
        out[name] = parts
    return out, trained


def _rooted(regex: str, root: str) -> str:
    """"^(?:a|b)..." -> "^(?:<root>)?(?:a|b)...": the names match with or without `root`."""
    return f"^(?:{re.escape(root)})?{regex[1:]}" if root else regex


def _peft_part(
    modules: dict[str, dict[str, torch.Tensor]], prefix: str, root: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """One component's PEFT tensors "<prefix>.<path>.lora_A.weight" ... and its LoraConfig, keys
    "<prefix>.r" ... (what export.network_to_diffusers writes for a live network). `root`: a path
    level the loading model may lack ("text_model."): the config's patterns match names with and
    without it, so peft finds the modules in either CLIP class."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, parts in modules.items():
        tensors[f"{prefix}.{name}.lora_A.weight"] = parts["down"]
        tensors[f"{prefix}.{name}.lora_B.weight"] = parts["up"]
        if "dora_scale" in parts:
            tensors[f"{prefix}.{name}.lora_magnitude_vector"] = dora_scale_to_magnitude(
                parts["dora_scale"], f"{name}.dora_scale"
            )
        short = name.removeprefix(root) if root else name
        ranks[short] = _rank(parts)
        alphas[short] = _alpha(parts)
    dora = {n for n, p in modules.items() if "dora_scale" in p}
    if dora and len(dora) != len(modules):
        raise ToolError(
            f"only some {prefix} modules carry DoRA scales; peft's config has one use_dora for all modules"
        )
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "r": int(r),
        "lora_alpha": float(alpha),
        "rank_pattern": {_rooted(k, root): v for k, v in _group_pattern(ranks, r).items()},
        "alpha_pattern": {_rooted(k, root): v for k, v in _group_pattern(alphas, alpha).items()},
        "target_modules": _rooted(_anchored(list(ranks)), root),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": bool(dora),
        "use_rslora": False,
        "init_lora_weights": True,
    }
    return tensors, {f"{prefix}.{k}": v for k, v in config.items()}


def _anchored(names: list[str]) -> str:
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def to_diffusers(nf: NetworkFile, adapter: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT keys under the adapter's `diffusers_lora_prefix` (text encoders: under `text_encoder.` /
    `text_encoder_2.`, paths with `text_model.` as diffusers has always named them) and the
    `lora_adapter_metadata` config that makes diffusers apply each module's alpha."""
    lycoris = nf.algos & {"lokr", "loha"}
    if lycoris:
        raise ToolError(
            f"{'/'.join(sorted(lycoris))} files have no diffusers layout: diffusers' load_lora_weights reads "
            "neither LoKr nor LoHa. Keep the comfyui layout (ComfyUI, Forge, LyCORIS and aitk read it), "
            "or bake it into the model with aitk merge"
        )
    parts = [(nf.modules, adapter.diffusers_lora_prefix, "")] if nf.modules else []
    parts += [(modules, name, CLIP_ROOT) for name, modules in nf.text_encoders.items()]
    tensors: dict[str, torch.Tensor] = {}
    header: dict[str, object] = {}
    for modules, prefix, root in parts:
        part_tensors, config = _peft_part(modules, prefix, root)
        tensors.update(part_tensors)
        header.update(config)
    return tensors, {LORA_ADAPTER_METADATA_KEY: json.dumps(header, indent=2, sort_keys=True)}


def file_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The .safetensors bytes, with the weight hashes (sshs_model_hash ...) of these tensors when
    aitk.networks.metadata provides them; stale hash keys are dropped otherwise."""
    import safetensors.torch

    from aitk.networks import metadata as md

    hash_keys = getattr(md, "HASH_KEYS", ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"))
    header = {k: v for k, v in metadata.items() if k not in hash_keys}
    with_hashes = getattr(md, "safetensors_bytes_with_hashes", None)
    if with_hashes is not None:
        return with_hashes(tensors, header)
    return safetensors.torch.save(tensors, metadata=header)


def convert_file(source: str | Path, to: str, arch: str, output: str | Path) -> tuple[Path, NetworkFile]:
    """Convert `source` to layout `to` at `output`; returns (output path, the parsed input)."""
    from aitk.fsutil import atomic_write_bytes

    target = str(to).lower()
    if target not in TARGETS:
        raise ToolError(f"--to {to!r}: use one of {', '.join(TARGETS)}")
    tensors, metadata = read_network_tensors(source)
    adapter = naming_adapter(arch)
    nf = parse_network_file(tensors, metadata, adapter, arch)
    header = {k: v for k, v in metadata.items()
              if k not in (LORA_ADAPTER_METADATA_KEY, FUSED_RECORD_KEY, ALPHA_RECORD_KEY)}
    if target == "diffusers" and ALPHA_RECORD_KEY in metadata:
        header[ALPHA_RECORD_KEY] = metadata[ALPHA_RECORD_KEY]  # weights unchanged: the record still holds
    header.setdefault("format", "pt")
    if target == "diffusers":
        out_tensors, extra = to_diffusers(nf, adapter)
    else:
        out_tensors, extra = to_comfyui(nf, adapter)
    header.update(extra)
    path = Path(output).expanduser()
    if path.resolve() == Path(source).expanduser().resolve():
        raise ToolError(f"-o {output}: the output would overwrite the input; give another file name")
    return atomic_write_bytes(path, file_bytes(out_tensors, header)), nf


def default_output(source: str | Path, to: str) -> Path:
    src = Path(source)
    return src.with_name(f"{src.stem}_{str(to).lower()}{src.suffix or '.safetensors'}")


def convert_command(
    source: str, to: str, arch: str, output: str | None = None, force: bool = False,
    out: TextIO | None = None, err: TextIO | None = None,
) -> int:
    """The CLI entry: 0 on success, 1 with a message (no traceback) on bad input."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        path = Path(output) if output else default_output(source, to)
        if path.suffix.lower() != ".safetensors":
            raise ToolError(f"-o {path}: the output must be a .safetensors file")
        if path.exists() and not force:
            raise ToolError(f"{path} exists; pass --force to replace it or -o another file")
        written, nf = convert_file(source, to, arch, path)
    except ToolError as exc:
        print(f"error: {exc}", file=err)
        return 1
    kinds = "/".join(sorted(nf.algos))
    encoders = f" + {nf.text_encoder_module_count} text-encoder" if nf.text_encoders else ""
    print(f"wrote {written} ({to} layout, {len(nf.modules)}{encoders} {kinds} modules, from the {nf.layout} layout)",
          file=out)
    if nf.fused_shared_down:
        print(f"note: {len(nf.fused_shared_down)} fused q / k / v LoRA(s) of the input are not block-diagonal "
              "(trained on the fused weight): q, k and v each got the fused rank, sharing its down (exact)", file=out)
    return 0
