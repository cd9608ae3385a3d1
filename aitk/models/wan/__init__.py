"""WAN 2.1 (T2V, I2V) and WAN 2.2 14B (two experts): flow-matching video transformers.

adapter.py (the four archs), flow.py (training timesteps, confined to an expert's range), keys.py
(ComfyUI's original key names), previews.py (preview pipelines), tiny.py (random-init tiny models).
"""

from aitk.models.wan.adapter import (
    DEFAULT_SCHEDULER_CLASS,
    DEFAULT_TEXT_LENGTH,
    Wan21Adapter,
    Wan21I2VAdapter,
    Wan22Adapter,
    Wan22I2VAdapter,
)
from aitk.models.wan.flow import DEFAULT_FLOW_SHIFT, NUM_TRAIN_TIMESTEPS, TIMESTEP_TYPES, FlowTimesteps
from aitk.models.wan.keys import PREFIX, is_block_target, lora_key_stem, original_name
from aitk.models.wan.previews import HIGH_NOISE, LOW_NOISE, MAIN, WanPreviews, to_pil
from aitk.models.wan.tiny import BOUNDARY_RATIOS, build_tiny_wan

__all__ = [
    "BOUNDARY_RATIOS", "DEFAULT_FLOW_SHIFT", "DEFAULT_SCHEDULER_CLASS", "DEFAULT_TEXT_LENGTH", "FlowTimesteps",
    "HIGH_NOISE", "LOW_NOISE", "MAIN", "NUM_TRAIN_TIMESTEPS", "PREFIX", "TIMESTEP_TYPES", "Wan21Adapter",
    "Wan21I2VAdapter", "Wan22Adapter", "Wan22I2VAdapter", "WanPreviews", "build_tiny_wan", "is_block_target",
    "lora_key_stem", "original_name", "to_pil",
]
