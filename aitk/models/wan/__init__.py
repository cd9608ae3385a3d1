"""WAN 2.1 (T2V, I2V), WAN 2.2 14B (two experts) and WAN 2.2 TI2V 5B: flow-matching video transformers.

adapter.py (the 2.1 / 2.2 14B archs), ti2v.py (the 5B: text- and image-to-video in one model), flow.py (training timesteps, confined to an expert's range), keys.py
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
from aitk.models.wan.ti2v import FIRST_FRAME_MASK, TI2V_FLOW_SHIFT, TI2VPreviewPipeline, Wan22TI2VAdapter
from aitk.models.wan.tiny import BOUNDARY_RATIOS, build_tiny_wan

__all__ = [
    "BOUNDARY_RATIOS", "DEFAULT_FLOW_SHIFT", "FIRST_FRAME_MASK", "TI2V_FLOW_SHIFT", "TI2VPreviewPipeline",
    "Wan22TI2VAdapter", "DEFAULT_SCHEDULER_CLASS", "DEFAULT_TEXT_LENGTH", "FlowTimesteps",
    "HIGH_NOISE", "LOW_NOISE", "MAIN", "NUM_TRAIN_TIMESTEPS", "PREFIX", "TIMESTEP_TYPES", "Wan21Adapter",
    "Wan21I2VAdapter", "Wan22Adapter", "Wan22I2VAdapter", "WanPreviews", "build_tiny_wan", "is_block_target",
    "lora_key_stem", "original_name", "to_pil",
]
