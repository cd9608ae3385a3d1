"""The assistant (training adapter) LoRA of `model.assistant_lora_path`, for any family whose
diffusers pipeline has a LoRA loader.

ai-toolkit trains step-distilled models (FLUX.1 schnell, Z-Image Turbo) with a LoRA that undoes
the distillation while training, so the trained LoRA learns the subject rather than breaking the
distillation, and takes it out again for previews, so they show the trained LoRA on the plain
distilled model. Here the file is read by the family's diffusers pipeline (`lora_state_dict`,
whatever key layout it converts: kohya, ComfyUI's `diffusion_model.` names, PEFT) and loaded
into the denoiser as its own frozen peft adapter named "assistant":
- training: active next to the trained network (which wraps the same layers as a second adapter,
  aitk.networks.lora), never trained, never part of a saved file or checkpoint;
- previews: switched off inside `assistant_off` (an adapter's `preview_context`).
ai-toolkit merges the LoRA into the weights and previews with it subtracted; the outputs are the
same, but here the quantized base (model.quantize) keeps the assistant in full precision.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from aitk.models.base import ModelLoadError

ASSISTANT_ADAPTER = "assistant"
KEY = "model.assistant_lora_path"


def read_assistant(pipeline_cls: type, source: str, prefix: str = "transformer.") -> tuple[dict, dict, Any, str]:
    """(state under `prefix`, network alphas under `prefix`, metadata, local path) of the LoRA
    `source` names (a local file, owner/repo/file.safetensors or a repo with one LoRA file),
    read by `pipeline_cls.lora_state_dict`. Raises ModelLoadError naming the key."""
    from aitk.hub_files import HubFileError, resolve_lora_file

    try:
        path = resolve_lora_file(source, key=KEY)
    except HubFileError as exc:
        raise ModelLoadError(str(exc)) from exc
    reader = pipeline_cls.lora_state_dict
    kwargs: dict[str, Any] = {"return_lora_metadata": True}
    if "return_alphas" in inspect.signature(reader).parameters:
        kwargs["return_alphas"] = True  # FLUX keeps kohya alphas apart; other readers fold them in
    try:
        found = reader(str(path), **kwargs)
    except Exception as exc:  # foreign key layouts make the converters raise anything
        raise ModelLoadError(f"{KEY}: {path} could not be read as a LoRA for {pipeline_cls.__name__}: {exc}") from exc
    state, alphas, metadata = (found[0], found[1], found[2]) if len(found) == 3 else (found[0], None, found[1])
    state = {k: v for k, v in state.items() if k.startswith(prefix)}
    alphas = {k: v for k, v in (alphas or {}).items() if k.startswith(prefix)}
    return state, alphas, metadata, str(path)


def attach_assistant(
    denoiser: torch.nn.Module, pipeline_cls: type, source: str, model_label: str, prefix: str = "transformer."
) -> None:
    """Load the assistant LoRA into `denoiser` as the frozen, active peft adapter "assistant"."""
    state, alphas, metadata, path = read_assistant(pipeline_cls, source, prefix)
    modules = {k[len(prefix):].split(".lora_")[0] for k in state if ".lora_" in k}
    known = {name for name, _ in denoiser.named_modules()}
    unknown = sorted(modules - known)
    if not modules or unknown:
        detail = f"e.g. {unknown[:3]}" if unknown else "no LoRA weights for it in the file"
        raise ModelLoadError(
            f"{KEY}: {path} does not match this {model_label} {prefix.rstrip('.')} ({detail}); give a LoRA "
            "trained for this model"
        )
    load = pipeline_cls.load_lora_into_transformer
    kwargs: dict[str, Any] = {"adapter_name": ASSISTANT_ADAPTER, "metadata": metadata}
    if "network_alphas" in inspect.signature(load).parameters:
        kwargs["network_alphas"] = alphas or None
    try:
        load(state, transformer=denoiser, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"{KEY}: {path} could not be applied to the {model_label} denoiser: {exc}") from exc
    denoiser.requires_grad_(False)


def has_assistant(denoiser: torch.nn.Module) -> bool:
    """Whether `denoiser` carries the assistant adapter."""
    return bool(_assistant_layers(denoiser))


def _assistant_layers(denoiser: torch.nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [
        m for m in denoiser.modules()
        if isinstance(m, BaseTunerLayer) and ASSISTANT_ADAPTER in getattr(m, "lora_A", {})
    ]


@contextmanager
def assistant_off(denoiser: torch.nn.Module) -> Iterator[None]:
    """While open, the assistant adapter is switched off (the other adapters stay as they were);
    peft's set_adapter also changes requires_grad, so that is restored afterwards."""
    layers = _assistant_layers(denoiser)
    active = {id(m): list(m.active_adapters) for m in layers}
    grads = [(p, p.requires_grad) for p in denoiser.parameters()]
    try:
        for m in layers:
            m.set_adapter([a for a in active[id(m)] if a != ASSISTANT_ADAPTER])
        yield
    finally:
        for m in layers:
            m.set_adapter(active[id(m)])
        for p, flag in grads:
            p.requires_grad_(flag)
