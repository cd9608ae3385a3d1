"""Qwen-Image previews: QwenImagePipeline with sample.guidance_scale as its true CFG scale.

Qwen-Image is not guidance-distilled: its pipeline's `guidance_scale` does nothing (it warns), and
classifier-free guidance is `true_cfg_scale` with a negative prompt. Previews take
sample.guidance_scale as true_cfg_scale, as ai-toolkit does, and the blank prompt as the negative
when the request has none (ai-toolkit always passes one), so a preview at guidance 4 is guided.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def preview_pipeline_class() -> type:
    """QwenImagePipeline whose `guidance_scale` is the true CFG scale (module docstring)."""
    from diffusers import QwenImagePipeline

    class QwenImagePreviewPipeline(QwenImagePipeline):
        def __call__(self, *args: Any, guidance_scale: float | None = None, **kwargs: Any) -> Any:
            if kwargs.get("true_cfg_scale") is None:
                kwargs["true_cfg_scale"] = 1.0 if guidance_scale is None else float(guidance_scale)
            guided = kwargs["true_cfg_scale"] > 1.0
            if guided and kwargs.get("negative_prompt") is None and kwargs.get("negative_prompt_embeds") is None:
                kwargs["negative_prompt"] = ""
            # a guidance-distilled transformer (none published yet) would take it as its input
            distilled = bool(self.transformer.config.guidance_embeds)
            return super().__call__(*args, guidance_scale=guidance_scale if distilled else None, **kwargs)

    return QwenImagePreviewPipeline
