"""Stable Diffusion 1.x / 2.x and SDXL: UNet, VAE and CLIP text encoders, DDPM objective.

adapter.py (SD 1.x / 2.x), sdxl.py (SDXL), timesteps.py (their training timesteps), tiny.py and
tiny_sdxl.py (random-init tiny models for tests and the demo).
"""

from aitk.models.base import ModelLoadError
from aitk.models.sd.adapter import (
    CLIP_TOKENS,
    DEFAULT_CONFIG_REPO,
    DEFAULT_NOISE_SCHEDULE,
    SINGLE_FILE_SUFFIXES,
    SD2Adapter,
    SD15Adapter,
)
from aitk.models.sd.sdxl import POOLED, SDXL_CONFIG_REPO, TIME_IDS, SDXLAdapter, sdxl_time_ids
from aitk.models.sd.timesteps import DDPMTimestepError, draw_timesteps
from aitk.models.sd.tiny import SD2_TE_WIDTH, SD2_VARIANTS, build_tiny_sd2, build_tiny_sd15
from aitk.models.sd.tiny_sdxl import TE1_WIDTH, TE2_WIDTH, build_tiny_sdxl

__all__ = [
    "CLIP_TOKENS", "DEFAULT_CONFIG_REPO", "DEFAULT_NOISE_SCHEDULE", "DDPMTimestepError", "ModelLoadError",
    "POOLED", "SD2Adapter", "SD2_TE_WIDTH", "SD2_VARIANTS", "SD15Adapter", "SDXLAdapter", "SDXL_CONFIG_REPO",
    "SINGLE_FILE_SUFFIXES", "TE1_WIDTH", "TE2_WIDTH", "TIME_IDS", "build_tiny_sd2", "build_tiny_sd15",
    "build_tiny_sdxl", "draw_timesteps", "sdxl_time_ids",
]
