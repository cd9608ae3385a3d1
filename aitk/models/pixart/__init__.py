"""PixArt-alpha and PixArt-Sigma: a DiT with cross-attention to T5, trained as DDPM models.

adapter.py (the `pixart` and `pixart_sigma` archs: loading, objective with learned sigma and size
conditioning, previews), keys.py (LoRA targets and ComfyUI's key names), tiny.py (random-init
tiny models for tests and the demo).
"""

from aitk.models.pixart.adapter import (
    PixArtAlphaAdapter,
    PixArtInputError,
    PixArtSigmaAdapter,
    binned_size,
)
from aitk.models.pixart.keys import is_pixart_lora, pixart_lora_candidates
from aitk.models.pixart.tiny import TINY_T5_MAX_LENGTH, build_tiny_pixart

__all__ = [
    "PixArtAlphaAdapter", "PixArtInputError", "PixArtSigmaAdapter", "TINY_T5_MAX_LENGTH", "binned_size",
    "build_tiny_pixart", "is_pixart_lora", "pixart_lora_candidates",
]
