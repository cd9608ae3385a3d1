"""Lumina-Image 2.0 (Alpha-VLLM): Lumina2Transformer2DModel, FLUX's 16-channel VAE, Gemma-2; flow matching.

adapter.py (the `lumina2` arch), keys.py (LoRA targets and ComfyUI's original key names),
tiny.py (random-init tiny models for tests and the demo).
"""

from aitk.models.lumina2.adapter import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    DEFAULT_SCHEDULER,
    FOLDER_PARTS,
    Lumina2Adapter,
    Lumina2InputError,
)
from aitk.models.lumina2.keys import (
    fused_qkv_file,
    is_block_target,
    is_lumina2_lora,
    lora_key_stem,
    lumina2_lora_candidates,
    module_for_stem,
    original_name,
)
from aitk.models.lumina2.tiny import SCHEDULER_SHIFT, build_tiny_lumina2

__all__ = [
    "DEFAULT_MAX_SEQUENCE_LENGTH", "DEFAULT_SCHEDULER", "FOLDER_PARTS", "Lumina2Adapter", "Lumina2InputError",
    "SCHEDULER_SHIFT", "build_tiny_lumina2", "fused_qkv_file", "is_block_target", "is_lumina2_lora",
    "lora_key_stem", "lumina2_lora_candidates", "module_for_stem", "original_name",
]
