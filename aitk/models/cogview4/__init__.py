"""CogView4: a joint-attention flow-matching DiT with SDXL-style size conditioning and GLM-4.

adapter.py (the `cogview4` arch: loading, objective, previews, LoRA names), tiny.py (random-init
tiny models of the real classes).
"""

from aitk.models.cogview4.adapter import (
    DEFAULT_SCHEDULER,
    DEFAULT_TEXT_LENGTH,
    CogView4Adapter,
    CogView4InputError,
    cogview4_shift,
)
from aitk.models.cogview4.tiny import build_tiny_cogview4

__all__ = [
    "DEFAULT_SCHEDULER",
    "DEFAULT_TEXT_LENGTH",
    "CogView4Adapter",
    "CogView4InputError",
    "build_tiny_cogview4",
    "cogview4_shift",
]
