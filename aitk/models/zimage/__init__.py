"""Z-Image (Turbo, base, De-Turbo): a single-stream flow-matching DiT with a Qwen3 text encoder.

adapter.py (the `zimage` arch: loading, objective, previews, LoRA names), tiny.py (random-init
tiny models). The assistant (training adapter) LoRA is the shared aitk.models.assistant.
"""

from aitk.models.zimage.adapter import (
    DEFAULT_TEXT_LENGTH,
    TRAIN_SHIFT,
    ZImageAdapter,
    ZImageInputError,
    padded_prompts,
    prompt_list,
    zimage_lora_candidates,
)
from aitk.models.zimage.tiny import build_tiny_zimage

__all__ = [
    "DEFAULT_TEXT_LENGTH",
    "TRAIN_SHIFT",
    "ZImageAdapter",
    "ZImageInputError",
    "build_tiny_zimage",
    "padded_prompts",
    "prompt_list",
    "zimage_lora_candidates",
]
