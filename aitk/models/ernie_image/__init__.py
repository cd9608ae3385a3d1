"""ERNIE-Image: a single-stream flow-matching DiT with FLUX.2's VAE and a Mistral 3 text encoder.

adapter.py (the `ernie_image` arch: loading, objective, previews, LoRA names), tiny.py (random-init
tiny models of the real classes).
"""

from aitk.models.ernie_image.adapter import (
    DEFAULT_SCHEDULER,
    DEFAULT_TEXT_LENGTH,
    TRAIN_SHIFT,
    ErnieImageAdapter,
    ErnieImageInputError,
)
from aitk.models.ernie_image.tiny import build_tiny_ernie_image

__all__ = [
    "DEFAULT_SCHEDULER",
    "DEFAULT_TEXT_LENGTH",
    "TRAIN_SHIFT",
    "ErnieImageAdapter",
    "ErnieImageInputError",
    "build_tiny_ernie_image",
]
