"""Writing the run's LoRA files: one per network (per expert for WAN 2.2), with metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aitk.config.schema import JobFile, ProcessConfig
from aitk.models.base import ModelAdapter
from aitk.networks.group import NetworkGroup
from aitk.networks.lora import NetworkHandle
from aitk.trainer.session import RunPaths, torch_dtype


def lora_path(paths: RunPaths, step: int | None, expert: str | None) -> Path:
    """<name>[_<expert>][_<step:09d>].safetensors; `expert` None for single-model runs."""
    base = paths.lora_file(step)
    if expert is None:
        return base
    stem = paths.name + f"_{expert}" + ("" if step is None else f"_{step:09d}")
    return base.with_name(stem + base.suffix)


def lora_paths(paths: RunPaths, step: int | None, network: NetworkGroup) -> list[Path]:
    """The files (full fine-tune: model folders) a save at `step` writes, in network order."""
    experts: list[str | None] = [None] if network.is_single else list(network)
    found = [lora_path(paths, step, expert) for expert in experts]
    if network.is_full_model:
        return [p.with_suffix("") for p in found]  # <name>[_expert][_step]/ diffusers folders
    return found


def lora_metadata(
    job: JobFile, process: ProcessConfig, adapter: ModelAdapter, handle: NetworkHandle, step: int,
    expert: str | None,
) -> dict[str, str]:
    from aitk.networks.metadata import lora_metadata as build

    net_cfg = process.network
    resolution = process.datasets[0].resolutions[0]
    meta: dict[str, Any] = dict(job.meta or {})
    if expert is not None:
        meta["expert"] = expert
    return build(
        name=job.config.name,
        steps=step,
        network_dim=handle.linear_rank,
        network_alpha=handle.linear_alpha,
        conv_dim=handle.conv_rank,
        conv_alpha=handle.conv_alpha,
        base_model_version=adapter.base_model_version,
        architecture=adapter.modelspec_architecture,
        implementation=adapter.modelspec_implementation,
        resolution=(resolution, resolution),
        training_settings=process.train.model_dump(mode="json")
        | {"network": net_cfg.model_dump(mode="json") if net_cfg else None},
        meta=meta,
        trigger_word=process.trigger_word,
        base_model_name=process.model.name_or_path,
        seed=process.training_seed,
        algo=getattr(handle, "algo", "lora"),
    )


def write_lora_files(
    paths: RunPaths,
    step: int | None,
    shown_step: int,
    network: NetworkGroup,
    job: JobFile,
    process: ProcessConfig,
    adapter: ModelAdapter,
) -> list[Path]:
    """Write every network's file (atomically); returns the paths in network order."""
    from aitk.networks.export import save_lora

    save_cfg = process.save
    if network.is_full_model:
        from aitk.trainer.model_files import write_model_folders

        return write_model_folders(lora_paths(paths, step, network), network, save_cfg)
    text_encoders: list = []
    if network.text_encoders:  # SD / SDXL train_text_encoder: in the (only) denoiser network's file
        from aitk.networks.text_encoders import text_encoder_namings

        namings = text_encoder_namings(adapter)
        text_encoders = [(te, namings[name]) for name, te in network.text_encoders.items()]
    written = []
    for (expert, handle), path in zip(network.items(), lora_paths(paths, step, network)):
        shown_expert = None if network.is_single else expert
        save_lora(
            path,
            handle,
            save_format=save_cfg.save_format,
            prefix=adapter.lora_prefix,
            key_for=adapter.lora_key_stem,
            weight_names=adapter.lora_weight_names,
            diffusers_prefix=adapter.diffusers_lora_prefix,
            dtype=torch_dtype(save_cfg.dtype),
            metadata=lora_metadata(job, process, adapter, handle, shown_step, shown_expert),
            text_encoders=text_encoders,
            fused=getattr(adapter, "lora_fused_weights", None),  # ComfyUI's fused q / k / v
            alpha_in_weights=adapter.lora_alpha_in_weights,  # comfyui layout: no .alpha (diffusers reads it)
        )
        written.append(path)
    return written
