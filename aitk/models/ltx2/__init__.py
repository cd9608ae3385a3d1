"""LTX-2: an audio-video DiT (video branch trained) with a Gemma 3 text encoder.

adapter.py (the `ltx2` arch: loading, objective, I2V conditioning, LoRA names), prompts.py (real
tokens kept, the pipeline's padding restored), previews.py (pipelines, decoding), tiny.py
(random-init tiny models).
"""

from aitk.models.ltx2.adapter import (
    DEFAULT_TEXT_LENGTH,
    LTX2Adapter,
    LTX2InputError,
    ltx2_lora_candidates,
)
from aitk.models.ltx2.tiny import build_tiny_ltx2

__all__ = ["DEFAULT_TEXT_LENGTH", "LTX2Adapter", "LTX2InputError", "build_tiny_ltx2", "ltx2_lora_candidates"]
