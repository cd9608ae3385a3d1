"""HiDream-I1: a double- then single-stream flow-matching DiT with mixture-of-experts feed-forwards,
conditioned by two CLIPs, T5 and Llama 3.1's per-layer hidden states.

adapter.py (the `hidream` arch: loading, objective, previews, LoRA names), tiny.py (random-init
tiny models). HiDream-E1 (editing) has no diffusers pipeline in this version: `hidream_e1` is
refused by `aitk validate` (aitk.models.archs.UNSUPPORTED_ARCH_LABELS).
"""

from aitk.models.hidream.adapter import (
    DEFAULT_LLAMA,
    DEFAULT_TEXT_LENGTH,
    TRAIN_SHIFT,
    HiDreamAdapter,
    HiDreamInputError,
    hidream_lora_candidates,
    is_hidream_lora,
    unpatchify_training_output,
)
from aitk.models.hidream.tiny import build_tiny_hidream

__all__ = [
    "DEFAULT_LLAMA",
    "DEFAULT_TEXT_LENGTH",
    "TRAIN_SHIFT",
    "HiDreamAdapter",
    "HiDreamInputError",
    "build_tiny_hidream",
    "hidream_lora_candidates",
    "is_hidream_lora",
    "unpatchify_training_output",
]
