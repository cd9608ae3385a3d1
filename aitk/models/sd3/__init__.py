"""Stable Diffusion 3 / 3.5 (medium, large): SD3Transformer2DModel, 16-channel VAE, CLIP-L +
CLIP-G + T5; flow matching with SD 3's fixed time shift.

adapter.py (the adapter), keys.py (LoRA targets and ComfyUI's key names), tiny.py (random-init tiny
models, large-like and medium-like, for tests and the demo).
"""

from aitk.models.sd3.adapter import (
    DEFAULT_SHIFT,
    SD3Adapter,
    SD3InputError,
    encode_sd3_latents,
    sd3_architecture,
)
from aitk.models.sd3.keys import BLOCK_TARGETS, is_sd3_lora, sd3_lora_candidates
from aitk.models.sd3.tiny import TINY_T5_MAX_LENGTH, build_tiny_sd3

__all__ = [
    "BLOCK_TARGETS", "DEFAULT_SHIFT", "SD3Adapter", "SD3InputError", "TINY_T5_MAX_LENGTH",
    "build_tiny_sd3", "encode_sd3_latents", "is_sd3_lora", "sd3_architecture", "sd3_lora_candidates",
]
