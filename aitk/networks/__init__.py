"""Networks trained on top of a frozen model: LoRA / LoCon / DoRA and LoKr / LoHa (peft),
targeting, export formats, loading files back and merging them into a model.

Import the submodules directly (aitk.networks.lora, .lycoris, .build, .export, .lycoris_files,
.merge, .metadata, .targets, .text_encoders); this package
re-exports the main entry points lazily so `import aitk.networks` pulls in neither peft nor
safetensors.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "NetworkHandle": "aitk.networks.lora",
    "inject_network": "aitk.networks.lora",
    "LycorisHandle": "aitk.networks.lycoris",
    "inject_lycoris": "aitk.networks.lycoris",
    "build_network": "aitk.networks.build",
    "build_text_encoder_networks": "aitk.networks.text_encoders",
    "load_network_file": "aitk.networks.export",
    "merge_network_file": "aitk.networks.merge",
    "select_targets": "aitk.networks.lora",
    "unet_lora_candidates": "aitk.networks.targets",
    "network_to_kohya": "aitk.networks.export",
    "network_to_diffusers": "aitk.networks.export",
    "kohya_to_network_state": "aitk.networks.export",
    "diffusers_to_network_state": "aitk.networks.export",
    "save_lora": "aitk.networks.export",
    "load_lora_file": "aitk.networks.export",
    "lora_metadata": "aitk.networks.metadata",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'aitk.networks' has no attribute {name!r}")
