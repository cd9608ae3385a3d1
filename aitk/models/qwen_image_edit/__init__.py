"""Qwen-Image-Edit and Qwen-Image-Edit-2509 ("edit_plus"): Qwen-Image's transformer, VAE and
Qwen2.5-VL, with the control images both as extra image tokens of the transformer and inside the
prompt the vision-language encoder reads.

adapter.py (the adapters), vl_inputs.py (the VL encoder's image inputs without Qwen2VLProcessor),
pipelines.py (prompt encoding, preview pipelines), tiny.py (random-init tiny models).
"""

from aitk.models.qwen_image_edit.adapter import QwenImageEditAdapter, QwenImageEditPlusAdapter
from aitk.models.qwen_image_edit.pipelines import edit_prompt_embeds, preview_pipeline_class
from aitk.models.qwen_image_edit.tiny import build_tiny_qwen_image_edit
from aitk.models.qwen_image_edit.vl_inputs import QwenEditInputError, expand_image_pads, prompt_inputs

__all__ = [
    "QwenEditInputError", "QwenImageEditAdapter", "QwenImageEditPlusAdapter", "build_tiny_qwen_image_edit",
    "edit_prompt_embeds", "expand_image_pads", "preview_pipeline_class", "prompt_inputs",
]
