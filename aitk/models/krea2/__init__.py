"""Krea 2 (raw, turbo): a single-stream flow-matching MMDiT over a stack of Qwen3-VL layers.

adapter.py (the `krea2` arch: loading, objective, previews), keys.py (LoRA names: diffusers module
paths <-> the original names ai-toolkit and ComfyUI use), tiny.py (random-init tiny models). The
turbo training adapter is the shared aitk.models.assistant.
"""

from aitk.models.krea2.adapter import (
    DEFAULT_SCHEDULER,
    DEFAULT_TEXT_LENGTH,
    Krea2Adapter,
    Krea2InputError,
    real_tokens,
)
from aitk.models.krea2.keys import is_krea2_lora, lora_key_stem, module_for_stem, original_name
from aitk.models.krea2.tiny import build_tiny_krea2

__all__ = [
    "DEFAULT_SCHEDULER",
    "DEFAULT_TEXT_LENGTH",
    "Krea2Adapter",
    "Krea2InputError",
    "build_tiny_krea2",
    "is_krea2_lora",
    "lora_key_stem",
    "module_for_stem",
    "original_name",
    "real_tokens",
]
