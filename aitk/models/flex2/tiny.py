"""A tiny random-init Flex.2 pipeline saved as a diffusers folder.

The tiny FLUX.1 dev pipeline (aitk.models.flux.tiny: CLIP + T5, 16-channel VAE, scheduler) with
its transformer replaced by a FluxTransformer2DModel of Flex.2's channel layout: in_channels
4 x (16 latent + 16 inpaint + 1 mask + 16 control) = 196, out_channels 64, as Flex.2-preview's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from aitk.models import tiny_common

TINY_FLEX2_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt


def build_tiny_flex2(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny Flex.2 pipeline to `folder` (kept when its marker is this version)."""
    marker = {"version": TINY_FLEX2_VERSION, "arch": "flex2"}
    return tiny_common.build_once(folder, seed, marker, _flex2_pipeline)


def _flex2_pipeline() -> Any:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from aitk.models.flex2.inputs import expected_in_channels
    from aitk.models.flux import build_tiny_flux

    with tempfile.TemporaryDirectory() as tmp:
        pipe = FluxPipeline.from_pretrained(build_tiny_flux(Path(tmp) / "flux", "dev"))
        config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
        latent = config["in_channels"] // 4
        config.update(in_channels=expected_in_channels(latent), out_channels=4 * latent)
        pipe.register_modules(transformer=FluxTransformer2DModel.from_config(config))
    return pipe
