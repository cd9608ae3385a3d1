"""What bench/gpu.py measures: the models, the memory settings, and the job of each case.

A case is one model at one memory setting. Its job file (a plain dict, validated as a JobFile)
starts from the model's preset in aitk/ui/presets.py, so the resolution and frame count are the
preset's, and changes only what the benchmark varies: LoRA rank 16, AdamW, bf16, batch 1,
latents and text embeddings cached (the step runs the denoiser only), and the memory settings.
The same job feeds the trainer's set-up code in the benchmark and `aitk.plan` for the estimate.
No torch import here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RANK = 16
QTYPE = "qfloat8"
#: tiny stand-ins (--tiny / --dry-run): pixels per side and frames of every case
TINY_RESOLUTION = 64
TINY_FRAMES = 5


@dataclass(frozen=True)
class BenchModel:
    key: str  # what --only names
    label: str
    preset: str  # key in aitk.ui.presets
    hub_id: str  # its public configs ship in aitk/plan/configs/
    arch: str
    tiny_builder: str  # "module:function" writing a tiny folder of the same family
    tiny_variant: str | None
    #: parameters of one denoiser (expert) of the real model, for the size check
    denoiser_parameters: float

    def build_tiny(self, folder: Path) -> Path:
        """Write the tiny random-init folder of this family (its package's tiny builder) to `folder`."""
        import importlib

        module_name, function = self.tiny_builder.split(":")
        build: Callable[..., Path] = getattr(importlib.import_module(module_name), function)
        return build(folder, self.tiny_variant) if self.tiny_variant else build(folder)


MODELS: tuple[BenchModel, ...] = (
    BenchModel("sd15", "SD 1.5", "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd1",
               "aitk.models.sd:build_tiny_sd15", None, 0.86e9),
    BenchModel("sdxl", "SDXL", "sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl",
               "aitk.models.sd:build_tiny_sdxl", None, 2.57e9),
    BenchModel("flux", "FLUX.1 dev", "flux_dev", "black-forest-labs/FLUX.1-dev", "flux",
               "aitk.models.flux:build_tiny_flux", "dev", 11.9e9),
    BenchModel("wan22", "WAN 2.2 T2V A14B", "wan22_t2v", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "wan22_14b",
               "aitk.models.wan:build_tiny_wan", "22_t2v", 14.3e9),
)


@dataclass(frozen=True)
class Setting:
    """One memory setting; each adds to the one before (as a user would try them)."""

    key: str
    quantize: bool = False
    gradient_checkpointing: bool = False
    offload_percent: float | None = None  # layer_offloading_transformer_percent
    low_vram: bool = False
    multi_expert_only: bool = False  # low_vram's expert swap: only models with two experts

    def applies_to(self, model: BenchModel) -> bool:
        return not self.multi_expert_only or model.arch.startswith("wan22")


SETTINGS: tuple[Setting, ...] = (
    Setting("bf16"),
    Setting(QTYPE, quantize=True),
    Setting(f"{QTYPE}+gc", quantize=True, gradient_checkpointing=True),
    Setting(f"{QTYPE}+gc+offload50%", quantize=True, gradient_checkpointing=True, offload_percent=0.5),
    Setting(f"{QTYPE}+gc+offload100%", quantize=True, gradient_checkpointing=True, offload_percent=1.0),
    Setting(f"{QTYPE}+gc+low_vram", quantize=True, gradient_checkpointing=True, low_vram=True, multi_expert_only=True),
)
#: --quick keeps these (plain, the 24 GB presets' own setting, full offload, low_vram)
QUICK_SETTINGS = ("bf16", f"{QTYPE}+gc", f"{QTYPE}+gc+offload100%", f"{QTYPE}+gc+low_vram")


@dataclass(frozen=True)
class Case:
    model: BenchModel
    setting: Setting

    @property
    def id(self) -> str:
        return f"{self.model.key}/{self.setting.key}"


def case_list(quick: bool = False, only: list[str] | None = None) -> list[Case]:
    """The cases to run, cheapest model first (a budget that runs out skips the largest).

    `only`: model keys ("flux") or case ids ("flux/bf16"); unknown names raise ValueError.
    """
    cases = [
        Case(model, setting)
        for model in MODELS
        for setting in SETTINGS
        if setting.applies_to(model) and (not quick or setting.key in QUICK_SETTINGS)
    ]
    if not only:
        return cases
    known = {m.key for m in MODELS} | {c.id for c in cases}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ValueError(
            f"--only: {', '.join(unknown)} not known; use model keys ({', '.join(m.key for m in MODELS)}) "
            f"or case ids such as {cases[0].id}"
        )
    return [c for c in cases if c.model.key in only or c.id in only]


def job_dict(case: Case, name_or_path: str, tiny: bool = False) -> dict[str, Any]:
    """The case's job file as a dict (see the module docstring)."""
    from aitk.ui.presets import preset

    found = preset(case.model.preset)
    if found is None:
        raise KeyError(f"preset {case.model.preset!r} is gone from aitk/ui/presets.py")
    job = found["job"]
    setting = case.setting
    job["config"]["name"] = "bench_" + case.id.replace("/", "_").replace("%", "pct").replace("+", "_")
    process = job["config"]["process"][0]
    process.pop("sample", None)  # no previews
    process["training_folder"] = "bench_output_not_written"
    process["network"] = {"type": "lora", "linear": RANK, "linear_alpha": RANK}
    dataset = process["datasets"][0]
    dataset.update(folder_path="bench_dataset_not_read", cache_latents_to_disk=True, cache_text_embeddings=True)
    if tiny:
        dataset["resolution"] = [TINY_RESOLUTION]
        if dataset.get("num_frames", 1) > 1:
            dataset.update(num_frames=TINY_FRAMES, max_pixels_per_frame=TINY_RESOLUTION**2)
    process["train"].update(
        optimizer="adamw", dtype="bf16", batch_size=1, gradient_accumulation=1,
        gradient_checkpointing=setting.gradient_checkpointing,
    )
    model = process["model"]
    model.update(name_or_path=name_or_path, arch=case.model.arch, quantize=setting.quantize, qtype=QTYPE,
                 low_vram=setting.low_vram, layer_offloading=setting.offload_percent is not None)
    model.pop("assistant_lora_path", None)
    if setting.offload_percent is not None:
        model["layer_offloading_transformer_percent"] = setting.offload_percent
    return job


def load_job(job: dict[str, Any]) -> Any:
    """The dict validated as the trainer validates job files (aitk.config.schema.JobFile)."""
    from aitk.config.schema import JobFile

    return JobFile.model_validate(job)
