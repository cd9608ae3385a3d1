"""FLUX.1 dev / schnell / Kontext: FluxTransformer2DModel, 16-channel VAE, CLIP-L + T5; flow matching.

adapter.py (FLUX.1), kontext.py (the edit model), latents.py (patch tokens, ids, time shift),
keys.py (LoRA targets), tiny.py (random-init tiny models for tests and the demo). Families built on
FLUX's transformer import these names from the package.
"""

from aitk.models.flux.adapter import (
    ASSISTANT_ADAPTER,
    FOLDER_PARTS,
    SINGLE_FILE_SUFFIXES,
    FluxAdapter,
    guidance_embedding_bypassed,
)
from aitk.models.flux.keys import DOUBLE_BLOCK_TARGETS, SINGLE_BLOCK_TARGETS, flux_lora_candidates
from aitk.models.flux.kontext import FluxKontextAdapter
from aitk.models.flux.latents import (
    FluxInputError,
    encode_flux_latents,
    image_ids,
    image_seq_shift,
    pack_latents,
    unpack_latents,
)
from aitk.models.flux.tiny import TINY_T5_MAX_LENGTH, build_tiny_flux

__all__ = [
    "ASSISTANT_ADAPTER", "DOUBLE_BLOCK_TARGETS", "FOLDER_PARTS", "FluxAdapter", "FluxInputError",
    "FluxKontextAdapter", "SINGLE_BLOCK_TARGETS", "SINGLE_FILE_SUFFIXES", "TINY_T5_MAX_LENGTH",
    "build_tiny_flux", "encode_flux_latents", "flux_lora_candidates", "guidance_embedding_bypassed",
    "image_ids", "image_seq_shift", "pack_latents", "unpack_latents",
]
