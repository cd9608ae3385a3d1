"""Preview sampler names (ai-toolkit / kohya spellings) -> diffusers scheduler classes."""

from __future__ import annotations

from typing import Any

from aitk.config.prompts import PREVIEW_SAMPLERS

_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm": ("DPMSolverMultistepScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    # flow-matching models (FLUX, WAN) preview with their own flow-match Euler scheduler whatever
    # sample.sampler says; for SD "flowmatch" means Euler over the DDPM schedule.
    "flowmatch": ("EulerDiscreteScheduler", {}),
}


def sampler_names() -> list[str]:
    return sorted(_SCHEDULERS)


# The job schema validates sample.sampler against PREVIEW_SAMPLERS; this table serves each name.
assert set(_SCHEDULERS) == set(PREVIEW_SAMPLERS), "models/samplers.py and config/prompts.py disagree"


def preview_scheduler(name: str | None, base_config: Any) -> Any:
    """A fresh scheduler for previews; "ddpm" (ai-toolkit's default) previews with DDIM, which
    gives usable images in few steps from the same noise schedule."""
    import diffusers

    key = (name or "ddim").lower()
    if key == "ddpm":
        key = "ddim"
    if key not in _SCHEDULERS:
        raise ValueError(f"sample.sampler: {name!r} is not known; use one of {', '.join(sampler_names())}")
    class_name, extra = _SCHEDULERS[key]
    return getattr(diffusers, class_name).from_config(base_config, **extra)
