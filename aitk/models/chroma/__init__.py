"""Chroma: FLUX.1-derived ChromaTransformer2DModel, FLUX's 16-channel VAE, T5 only; flow matching.

adapter.py (the adapter), masking.py (the T5 padding mask in training, checkpointing and previews),
sources.py (diffusers folders, single-file checkpoints and ai-toolkit's hub shortcuts), tiny.py
(a random-init tiny model for tests and the demo). Latent packing, ids, the time shift and the
LoRA targets are FLUX's (aitk.models.flux).
"""

from aitk.models.chroma.adapter import MASK_KEY, ChromaAdapter
from aitk.models.chroma.masking import joint_mask, masked_checkpointing, preview_pipeline_class
from aitk.models.chroma.sources import DEFAULT_EXTRAS, UPSTREAM_REPO, ChromaSource, resolve
from aitk.models.chroma.tiny import TINY_T5_MAX_LENGTH, build_tiny_chroma

__all__ = [
    "DEFAULT_EXTRAS", "MASK_KEY", "TINY_T5_MAX_LENGTH", "UPSTREAM_REPO", "ChromaAdapter", "ChromaSource",
    "build_tiny_chroma", "joint_mask", "masked_checkpointing", "preview_pipeline_class", "resolve",
]
