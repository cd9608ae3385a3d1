"""Preview images: prompts with inline flags (--w --h --seed --cfg --steps --n --m), written atomically."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from aitk.config.schema import SampleConfig
from aitk.trainer.checkpoint import atomic_write_bytes

_FLAG = re.compile(r"(?:^|\s)--(w|h|seed|cfg|steps|n|m|neg|width|height)\s+")
_FLAG_FIELDS = {
    "w": "width", "width": "width", "h": "height", "height": "height", "seed": "seed",
    "cfg": "guidance_scale", "steps": "steps", "n": "negative", "neg": "negative", "m": "multiplier",
}


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


def parse_prompt(text: str, defaults: PreviewRequest) -> PreviewRequest:
    """Split `text` into the prompt and its inline flags; flags override the sample defaults."""
    parts = _FLAG.split(text)
    values: dict[str, Any] = {"prompt": parts[0].strip()}
    for flag, raw in zip(parts[1::2], parts[2::2]):
        field = _FLAG_FIELDS[flag]
        raw = raw.strip()
        try:
            if field in {"width", "height", "seed", "steps"}:
                values[field] = int(raw)
            elif field in {"guidance_scale", "multiplier"}:
                values[field] = float(raw)
            else:
                values[field] = raw
        except ValueError:
            raise SamplePromptError(
                f"sample prompt {text!r}: --{flag} needs a number, got {raw!r}"
            ) from None
    return replace(defaults, **values)


def preview_requests(cfg: SampleConfig, trigger_word: str | None) -> list[PreviewRequest]:
    defaults = PreviewRequest(
        prompt="",
        width=cfg.width,
        height=cfg.height,
        seed=cfg.seed,
        guidance_scale=cfg.guidance_scale,
        steps=cfg.sample_steps,
        negative=cfg.neg,
        multiplier=cfg.network_multiplier,
    )
    requests = [parse_prompt(p, defaults) for p in cfg.prompts]
    for item in cfg.samples:
        request = parse_prompt(item.prompt, defaults)
        overrides = {
            "width": item.width, "height": item.height, "seed": item.seed,
            "guidance_scale": item.guidance_scale, "steps": item.sample_steps,
            "negative": item.neg, "multiplier": item.network_multiplier,
        }
        requests.append(replace(request, **{k: v for k, v in overrides.items() if v is not None}))
    if trigger_word:
        requests = [replace(r, prompt=r.prompt.replace("[trigger]", trigger_word)) for r in requests]
    if cfg.walk_seed:
        requests = [replace(r, seed=r.seed + i) for i, r in enumerate(requests)]
    return requests


def _snap(size: int, multiple: int = 8) -> int:
    return max(multiple, size // multiple * multiple)


def render_previews(
    pipeline: Any,
    requests: list[PreviewRequest],
    out_dir: Path,
    step: int,
    set_multiplier: Any = None,
) -> list[Path]:
    """Render each request with `pipeline` and write samples/<step:09d>_<i>.jpg atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline.set_progress_bar_config(disable=True)
    written = []
    for index, request in enumerate(requests):
        if set_multiplier is not None:
            set_multiplier(request.multiplier)
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        with torch.no_grad():
            image = pipeline(
                prompt=request.prompt,
                negative_prompt=request.negative or None,
                width=_snap(request.width),
                height=_snap(request.height),
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                generator=generator,
            ).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        path = out_dir / f"{step:09d}_{index}.jpg"
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    if set_multiplier is not None:
        set_multiplier(1.0)
    return written
