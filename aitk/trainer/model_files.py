"""Full fine-tunes: each trained model is saved as a diffusers folder (`save_pretrained`), written
to a temporary folder and renamed, and on request (`save.single_file`) also as one safetensors
file of its weights in diffusers naming."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from aitk.fsutil import fsync_dir
from aitk.trainer.session import torch_dtype


def _replace_folder(tmp: Path, target: Path) -> None:
    old = target.with_name(target.name + ".old")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _write_gathered(module: Any, state: dict[str, Any], folder: Path, dtype: Any) -> None:
    """What `save_pretrained` writes (config.json, diffusion_pytorch_model*.safetensors, sharded
    above 10 GB with its index) from weights gathered off FSDP shards, in `dtype`."""
    from huggingface_hub import save_torch_state_dict

    folder.mkdir(parents=True)
    module.save_config(str(folder))
    converted = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_torch_state_dict(
        converted, str(folder), filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB"
    )


def write_model_folders(
    targets: list[Path], network: Any, save_cfg: Any, *, states: list[dict[str, Any]] | None = None
) -> list[Path]:
    """Write each handle's model to its target folder; returns the folders. `states`: each
    model's full weights when its live parameters are FSDP shards."""
    import safetensors.torch

    dtype = torch_dtype(save_cfg.dtype)
    for index, ((_, handle), target) in enumerate(zip(network.items(), targets)):
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        state = states[index] if states is not None else None
        if state is not None:
            _write_gathered(handle.module, state, tmp, dtype)
            original = dtype
        else:
            original = next(handle.module.parameters()).dtype
            handle.module.save_pretrained(str(tmp), safe_serialization=True)
        if dtype != original:
            # save_pretrained writes the live dtype; convert the saved weights to save.dtype
            for file in tmp.glob("*.safetensors"):
                tensors = safetensors.torch.load_file(str(file))
                converted = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
                safetensors.torch.save_file(converted, str(file), metadata={"format": "pt"})
        _replace_folder(tmp, target)
        if getattr(save_cfg, "single_file", False):
            weights = state if state is not None else handle.module.state_dict()
            single = {k: v.detach().to("cpu", dtype).contiguous() for k, v in weights.items()}
            from aitk.fsutil import atomic_write_bytes

            atomic_write_bytes(target.with_suffix(".safetensors"), safetensors.torch.save(single, metadata={"format": "pt"}))
    return targets


def copy_model_folder(source: Path, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    _replace_folder(tmp, target)
    if source.with_suffix(".safetensors").is_file():
        shutil.copyfile(source.with_suffix(".safetensors"), target.with_suffix(".safetensors"))
