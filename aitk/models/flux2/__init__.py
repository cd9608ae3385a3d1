"""FLUX.2 dev and Klein base 4B / 9B: Flux2Transformer2DModel, the FLUX.2 VAE, Mistral 3 / Qwen3 text
encoders; flow matching.

adapter.py (the adapters), latents.py (VAE patch latents and their normalisation, tokens, ids),
keys.py (LoRA targets and original-layout key names), previews.py (the preview pipelines),
tiny.py (random-init tiny models for tests and the demo).
"""

from aitk.models.flux2.adapter import (
    DEFAULT_SCHEDULER,
    Flux2Adapter,
    Flux2InputError,
    Flux2Klein4BAdapter,
    Flux2Klein9BAdapter,
    Flux2KleinAdapter,
)
from aitk.models.flux2.keys import flux2_lora_candidates, is_flux2_lora, lora_key_stem, module_for_stem
from aitk.models.flux2.tiny import build_tiny_flux2

__all__ = [
    "DEFAULT_SCHEDULER", "Flux2Adapter", "Flux2InputError", "Flux2Klein4BAdapter", "Flux2Klein9BAdapter",
    "Flux2KleinAdapter", "build_tiny_flux2", "flux2_lora_candidates", "is_flux2_lora", "lora_key_stem",
    "module_for_stem",
]
