"""FLUX.2 previews: the diffusers pipelines with what the trainer's preview call passes.

- Sizes are floored to the 16 px the pipelines work in (they would warn and floor anyway).
- FLUX.2 dev is guidance-distilled: sample.guidance_scale is its embedded guidance and there is
  no negative prompt (ai-toolkit passes none); a request's negative is dropped.
- Klein (base) is not distilled: guidance_scale > 1 is classifier-free guidance, and the
  request's negative prompt (text, or cached embeddings) is the unconditional branch, as
  ai-toolkit does; without one the pipeline uses the blank prompt.
"""

from __future__ import annotations

import functools
from typing import Any


def _floored(size: int | None) -> int | None:
    return max(16, size // 16 * 16) if size else None


@functools.cache
def dev_pipeline_class() -> type:
    from diffusers import Flux2Pipeline

    class Flux2PreviewPipeline(Flux2Pipeline):
        def __call__(self, *args: Any, negative_prompt: Any = None, negative_prompt_embeds: Any = None,
                     height: int | None = None, width: int | None = None, **kwargs: Any) -> Any:
            return super().__call__(*args, height=_floored(height), width=_floored(width), **kwargs)

    return Flux2PreviewPipeline


@functools.cache
def klein_pipeline_class() -> type:
    from diffusers import Flux2KleinPipeline

    class Flux2KleinPreviewPipeline(Flux2KleinPipeline):
        def __call__(self, *args: Any, negative_prompt: str | None = None, negative_prompt_embeds: Any = None,
                     height: int | None = None, width: int | None = None, **kwargs: Any) -> Any:
            guided = float(kwargs.get("guidance_scale", 4.0)) > 1.0 and not self.config.is_distilled
            if guided and negative_prompt_embeds is None and negative_prompt:
                negative_prompt_embeds, _ = self.encode_prompt(
                    prompt=[negative_prompt], device=self._execution_device,
                    max_sequence_length=kwargs.get("max_sequence_length", 512),
                )
            return super().__call__(*args, negative_prompt_embeds=negative_prompt_embeds, height=_floored(height),
                                    width=_floored(width), **kwargs)

    return Flux2KleinPreviewPipeline
