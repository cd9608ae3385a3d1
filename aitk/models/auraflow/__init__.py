"""AuraFlow (fal/AuraFlow v0.1 - v0.3): an MMDiT with a UMT5 text encoder, trained by flow matching.

adapter.py (the `auraflow` arch: loading, objective, previews, LoRA targets and names), tiny.py
(a random-init tiny model for tests and the demo).
"""

from aitk.models.auraflow.adapter import (
    DEFAULT_SHIFT,
    AuraFlowAdapter,
    AuraFlowInputError,
    auraflow_lora_candidates,
    is_auraflow_lora,
)
from aitk.models.auraflow.tiny import TINY_T5_MAX_LENGTH, build_tiny_auraflow

__all__ = [
    "DEFAULT_SHIFT", "AuraFlowAdapter", "AuraFlowInputError", "TINY_T5_MAX_LENGTH", "auraflow_lora_candidates",
    "build_tiny_auraflow", "is_auraflow_lora",
]
