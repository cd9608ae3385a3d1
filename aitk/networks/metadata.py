"""safetensors header metadata of a LoRA file: kohya ss_* keys, SAI modelspec.*, the job's meta block.

Every value is a str (safetensors headers hold only strings). Keys that describe the tensors
(network dim / alpha / module, steps, base model, architecture, training settings) always hold
the computed value; other keys from the job's `meta:` block (author, license, description,
modelspec.title ...) are copied as given, non-str values as JSON.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

__all__ = ["lora_metadata", "PROTECTED_KEYS"]

#: keys the meta block cannot override (they must describe the file truthfully)
PROTECTED_KEYS = frozenset(
    {
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_network_args",
        "ss_base_model_version",
        "ss_steps",
        "modelspec.sai_model_spec",
        "modelspec.architecture",
        "aitk_training_settings",
    }
)


def _num(x: float | int) -> str:
    """kohya writes dims as ints and alphas as floats ("8.0")."""
    return str(int(x)) if isinstance(x, int) and not isinstance(x, bool) else str(float(x))


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    try:
        return json.dumps(v, default=str)
    except (TypeError, ValueError):
        return str(v)


def _default_implementation(architecture: str) -> str:
    if architecture.startswith("stable-diffusion"):
        return "https://github.com/Stability-AI/generative-models"
    if architecture.startswith("flux"):
        return "https://github.com/black-forest-labs/flux"
    return "diffusers"


def lora_metadata(
    *,
    name: str,
    steps: int,
    network_dim: int,
    network_alpha: float,
    conv_dim: int | None,
    conv_alpha: float | None,
    base_model_version: str,
    architecture: str,
    resolution: tuple[int, int],
    training_settings: dict,
    meta: dict | None,
    trigger_word: str | None,
    tag_frequency: dict | None = None,
    implementation: str | None = None,
    date: _dt.datetime | None = None,
) -> dict[str, str]:
    """Header metadata for a LoRA file; all values str.

    `network_alpha` / `conv_alpha`: the alphas in effect when saving (not the configured start).
    `architecture`: modelspec architecture of the LoRA, e.g. "stable-diffusion-v1/lora".
    `resolution`: (width, height) -> modelspec.resolution "WxH".
    """
    width, height = (int(resolution[0]), int(resolution[1]))
    when = (date or _dt.datetime.now(_dt.timezone.utc)).replace(microsecond=0)
    net_args: dict[str, str] = {}
    if conv_dim is not None:
        net_args["conv_dim"] = str(int(conv_dim))
        net_args["conv_alpha"] = str(float(conv_alpha if conv_alpha is not None else conv_dim))
    out: dict[str, str] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _num(int(network_dim)),
        "ss_network_alpha": _num(float(network_alpha)),
        "ss_network_args": json.dumps(net_args),
        "ss_base_model_version": str(base_model_version),
        "ss_output_name": str(name),
        "ss_steps": _num(int(steps)),
        "ss_resolution": f"({width}, {height})",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": str(architecture),
        "modelspec.implementation": implementation or _default_implementation(str(architecture)),
        "modelspec.title": str(name),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": when.isoformat(),
        "aitk_training_settings": json.dumps(training_settings or {}, default=str, sort_keys=True),
    }
    if trigger_word:
        out["ss_training_comment"] = str(trigger_word)
        out["modelspec.trigger_phrase"] = str(trigger_word)
    if tag_frequency is not None:
        out["ss_tag_frequency"] = json.dumps(tag_frequency, default=str)
    for k, v in (meta or {}).items():
        k = str(k)
        if k in PROTECTED_KEYS:
            continue
        out[k] = _text(v)
    return out
