"""Keys the schema does not know: one line each, with a did-you-mean (typo, alias from another
trainer, or the section the key belongs to)."""

from __future__ import annotations

import difflib

from pydantic import BaseModel

from aitk.config.schema import (
    DatasetConfig,
    JobFile,
    ModelConfig,
    NetworkConfig,
    ProcessConfig,
    SampleConfig,
    SaveConfig,
    TrainConfig,
)
from aitk.config.support import is_known_extra, render_path, walk_sections

# Common spellings from other trainers and typos: alias -> the field it means (when the section has it).
ALIASES: dict[str, tuple[str, ...]] = {
    "learning_rate": ("lr",), "learningrate": ("lr",), "lr_rate": ("lr",), "base_lr": ("lr",),
    "max_steps": ("steps",), "num_steps": ("steps",), "max_train_steps": ("steps",),
    "train_steps": ("steps",), "total_steps": ("steps",), "step": ("steps",), "iterations": ("steps",),
    "train_batch_size": ("batch_size",), "batchsize": ("batch_size",), "bs": ("batch_size",),
    "network_dim": ("linear",), "dim": ("linear",), "lora_rank": ("linear",), "lora_dim": ("linear",),
    "network_alpha": ("linear_alpha",), "lora_alpha": ("linear_alpha",),
    "conv_dim": ("conv",), "conv_rank": ("conv",), "network_type": ("type",),
    "caption_extension": ("caption_ext",), "caption_ext_name": ("caption_ext",),
    "image_dir": ("folder_path",), "images": ("folder_path",), "folder": ("folder_path",),
    "data_dir": ("folder_path",), "train_data_dir": ("folder_path",), "dataset_path": ("folder_path",),
    "path": ("folder_path", "name_or_path"), "dir": ("folder_path",),
    "pretrained_model_name_or_path": ("name_or_path",), "model_path": ("name_or_path",),
    "model_name": ("name_or_path",), "model_id": ("name_or_path",), "base_model": ("name_or_path",),
    "resolutions": ("resolution",), "res": ("resolution",), "size": ("resolution",),
    "sample_prompts": ("prompts",), "prompt": ("prompts",), "negative_prompt": ("neg",),
    "negative": ("neg",), "cfg": ("guidance_scale",), "cfg_scale": ("guidance_scale",),
    "guidance": ("guidance_scale",), "num_inference_steps": ("sample_steps",), "steps_sample": ("sample_steps",),
    "save_steps": ("save_every",), "save_every_n_steps": ("save_every",), "checkpointing_steps": ("save_every",),
    "sample_every_n_steps": ("sample_every",), "sample_steps_every": ("sample_every",),
    "mixed_precision": ("dtype",), "precision": ("dtype",), "save_precision": ("dtype",),
    "optimizer_type": ("optimizer",), "optim": ("optimizer",), "optimizer_args": ("optimizer_params",),
    "optimizer_kwargs": ("optimizer_params",), "scheduler": ("lr_scheduler",),
    "lr_scheduler_type": ("lr_scheduler",), "scheduler_params": ("lr_scheduler_params",),
    "warmup_steps": ("lr_warmup_steps",), "lr_warmup": ("lr_warmup_steps",),
    "grad_accum": ("gradient_accumulation",), "gradient_accumulate": ("gradient_accumulation",),
    "clip_grad_norm": ("max_grad_norm",), "max_norm": ("max_grad_norm",), "grad_clip": ("max_grad_norm",),
    "output_dir": ("training_folder",), "output_folder": ("training_folder",),
    "output_path": ("training_folder",), "dataset": ("datasets",), "data": ("datasets",),
    "seed": ("training_seed",), "trigger": ("trigger_word",), "instance_prompt": ("trigger_word",),
    "repeats": ("num_repeats",), "num_repeat": ("num_repeats",), "caption_dropout": ("caption_dropout_rate",),
    "flip": ("flip_x",), "random_flip": ("flip_x",), "hflip": ("flip_x",), "ema": ("ema_config",),
    "use_ema": ("ema_config",), "samples_every": ("sample_every",), "every": ("save_every", "sample_every"),
    "keep": ("max_step_saves_to_keep",), "max_saves": ("max_step_saves_to_keep",),
    "type_": ("type",), "network_args": ("network_kwargs",), "networks": ("network",),
}

# Sections whose keys a misplaced key may belong to.
_SECTIONS: dict[str, type[BaseModel]] = {
    "network": NetworkConfig,
    "save": SaveConfig,
    "datasets[i]": DatasetConfig,
    "train": TrainConfig,
    "model": ModelConfig,
    "sample": SampleConfig,
    "process[i]": ProcessConfig,
}


def suggest(key: str, section: type[BaseModel]) -> str:
    fields = list(section.model_fields)
    lowered = key.strip().lower().replace("-", "_").replace(" ", "_")
    if lowered in fields and lowered != key:
        return f"did you mean {lowered!r}?"
    for target in ALIASES.get(lowered, ()):
        if target in fields:
            return f"did you mean {target!r}?"
    close = difflib.get_close_matches(lowered, fields, n=1, cutoff=0.75)
    if close:
        return f"did you mean {close[0]!r}?"
    homes = [name for name, cls in _SECTIONS.items() if cls is not section and lowered in cls.model_fields]
    if homes:
        return f"it belongs under `{homes[0].removesuffix('[i]')}:`, not here"
    close = difflib.get_close_matches(lowered, fields, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return ""


def unknown_keys(job: JobFile, *, strict: bool = False) -> list[str]:
    """One line per key the schema does not know (free-form dicts excluded), with a did-you-mean."""
    out: list[str] = []
    for path, section in walk_sections(job):
        for key in section.model_extra or {}:
            if is_known_extra(type(section), str(key)):
                continue
            hint = suggest(str(key), type(section))
            where = render_path(path + (str(key),))
            if strict:
                out.append(f"{where}: unknown key; " + (f"{hint} " if hint else "") + "(remove it or fix the spelling)")
            else:
                out.append(f"{where}: unknown key; " + (hint if hint else "it is ignored"))
    return out

