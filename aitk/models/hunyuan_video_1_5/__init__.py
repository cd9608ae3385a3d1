"""HunyuanVideo 1.5 (T2V, I2V): a flow-matching video transformer with Qwen2.5-VL and ByT5 prompts.

adapter.py (the `hunyuan_video_1_5` / `hunyuan_video_1_5_i2v` archs: loading, prompts, the
objective with its I2V conditioning), keys.py (ComfyUI's names, fused q / k / v), previews.py (the
pipelines with ai-toolkit's preview arguments), tiny.py (random-init tiny models).
"""

from aitk.models.hunyuan_video_1_5.adapter import (
    DEFAULT_SCHEDULER,
    DEFAULT_TEXT_LENGTH,
    HunyuanVideo15Adapter,
    HunyuanVideo15I2VAdapter,
    HunyuanVideo15InputError,
)
from aitk.models.hunyuan_video_1_5.keys import (
    FUSED_QKV,
    comfy_name,
    is_hunyuan_video_15_lora,
    lora_candidates,
    lora_key_stem,
    module_for_stem,
)
from aitk.models.hunyuan_video_1_5.tiny import build_tiny_hunyuan_video_15

__all__ = [
    "DEFAULT_SCHEDULER", "DEFAULT_TEXT_LENGTH", "FUSED_QKV", "HunyuanVideo15Adapter", "HunyuanVideo15I2VAdapter",
    "HunyuanVideo15InputError", "build_tiny_hunyuan_video_15", "comfy_name", "is_hunyuan_video_15_lora",
    "lora_candidates", "lora_key_stem", "module_for_stem",
]
