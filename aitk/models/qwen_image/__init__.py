"""Qwen-Image (and Qwen-Image-2512): QwenImageTransformer2DModel, the Qwen-Image VAE, Qwen2.5-VL as
a text-only encoder; flow matching.

adapter.py (the adapter), latents.py (2x2 patch tokens, VAE normalisation, training noise levels),
previews.py (the preview pipeline), tiny.py (random-init tiny models for tests and the demo).
"""

from aitk.models.qwen_image.adapter import (
    BLOCK_TARGETS,
    DEFAULT_MAX_SEQUENCE_LENGTH,
    DEFAULT_SCHEDULER,
    QwenImageAdapter,
    qwen_image_lora_candidates,
)
from aitk.models.qwen_image.latents import (
    QwenImageInputError,
    encode_latents,
    image_seq_shift,
    pack_latents,
    stretch_to_terminal,
    training_sigmas,
    unpack_latents,
)
from aitk.models.qwen_image.tiny import build_tiny_qwen_image

__all__ = [
    "BLOCK_TARGETS", "DEFAULT_MAX_SEQUENCE_LENGTH", "DEFAULT_SCHEDULER", "QwenImageAdapter", "QwenImageInputError",
    "build_tiny_qwen_image", "encode_latents", "image_seq_shift", "pack_latents", "qwen_image_lora_candidates",
    "stretch_to_terminal", "training_sigmas", "unpack_latents",
]
