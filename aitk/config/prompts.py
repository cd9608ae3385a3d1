"""What a `sample:` prompt may say: inline flags, and the preview sampler names.

Parsing lives in the config layer so `aitk validate` catches a bad flag before any training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

# ai-toolkit / kohya sampler spellings accepted in sample.sampler ("ddpm" previews with DDIM).
PREVIEW_SAMPLERS: tuple[str, ...] = (
    "ddim", "ddpm", "dpm", "dpm++", "dpm++_2m", "dpm++_2m_karras", "dpmsolver",
    "euler", "euler_a", "lms", "pndm", "unipc", "flowmatch",
)

_FLAG = re.compile(r"(?:^|\s)--(w|h|seed|cfg|steps|n|m|neg|width|height)\s+")
_FLAG_FIELDS = {
    "w": "width", "width": "width", "h": "height", "height": "height", "seed": "seed",
    "cfg": "guidance_scale", "steps": "steps", "n": "negative", "neg": "negative", "m": "multiplier",
}
_INT_FIELDS = {"width", "height", "seed", "steps"}
_FLOAT_FIELDS = {"guidance_scale", "multiplier"}


class SamplePromptError(ValueError):
    pass


@dataclass(frozen=True)
class PreviewRequest:
    prompt: str
    width: int
    height: int
    seed: int
    guidance_scale: float
    steps: int
    negative: str
    multiplier: float
    num_frames: int = 1  # video models: frames of the preview
    fps: int = 16  # video models: frame rate of the written file
    ctrl_img: str | None = None  # I2V / Kontext: path of the conditioning image


def parse_prompt(text: str, defaults: PreviewRequest) -> PreviewRequest:
    """Split `text` into the prompt and its inline flags; flags override the sample defaults."""
    parts = _FLAG.split(text)
    values: dict[str, Any] = {"prompt": parts[0].strip()}
    for flag, raw in zip(parts[1::2], parts[2::2]):
        field = _FLAG_FIELDS[flag]
        raw = raw.strip()
        try:
            if field in _INT_FIELDS:
                values[field] = int(raw)
            elif field in _FLOAT_FIELDS:
                values[field] = float(raw)
            else:
                values[field] = raw
        except ValueError:
            raise SamplePromptError(f"sample prompt {text!r}: --{flag} needs a number, got {raw!r}") from None
    return replace(defaults, **values)
