"""safetensors header metadata of a LoRA file: kohya ss_* keys, SAI modelspec.*, the job's meta block,
and the weight hashes UIs show (sshs_model_hash, sshs_legacy_hash, modelspec.hash_sha256).

Every value is a str (safetensors headers hold only strings). Keys that describe the tensors
(network dim / alpha / module, steps, base model, architecture, training settings, hashes) always
hold the computed value; other keys from the job's `meta:` block (author, license, description,
modelspec.title ...) are copied as given, non-str values as JSON.

Hashes (filled at write time by `safetensors_bytes_with_hashes`, checked by `verify_file_hashes`):
- sshs_model_hash: sha256 (hex) of the file's tensor data, i.e. every byte after the 8-byte length
  and the JSON header. The header is left out because it holds the hash itself and because
  safetensors writes the metadata keys in no fixed order; the tensor bytes do not depend on either.
  This is the "addnet" hash kohya's sd-scripts write and AUTOMATIC1111 computes for .safetensors.
- sshs_legacy_hash: the first 8 hex digits of sha256 of the 64 KiB at offset 0x100000 of the file
  as it is serialised with only its ss_* metadata (kohya's rule: user metadata edits must not change
  it). Empty window (file under 1 MiB) -> the sha256 of no bytes, as kohya gets.
- modelspec.hash_sha256: "0x" + the same tensor-data sha256 (SAI model spec: all tensor content,
  header excluded, 0x prefix).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import torch

__all__ = [
    "lora_metadata",
    "PROTECTED_KEYS",
    "HASH_KEYS",
    "weight_hashes",
    "safetensors_bytes_with_hashes",
    "tensor_data_sha256",
    "legacy_window_hash",
    "verify_file_hashes",
    "HashCheck",
]

MODEL_HASH_KEY = "sshs_model_hash"
LEGACY_HASH_KEY = "sshs_legacy_hash"
SPEC_HASH_KEY = "modelspec.hash_sha256"
HASH_KEYS: tuple[str, ...] = (MODEL_HASH_KEY, LEGACY_HASH_KEY, SPEC_HASH_KEY)

#: keys the meta block cannot override (they must describe the file truthfully)
PROTECTED_KEYS = frozenset(
    {
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_network_args",
        "ss_base_model_version",
        "ss_v2",
        "ss_steps",
        "modelspec.sai_model_spec",
        "modelspec.architecture",
        "aitk_training_settings",
        *HASH_KEYS,
    }
)

#: meta-block keys that also fill the SAI modelspec field of the same meaning
_MODELSPEC_FROM_META = {
    "author": "modelspec.author",
    "description": "modelspec.description",
    "license": "modelspec.license",
    "tags": "modelspec.tags",
    "usage_hint": "modelspec.usage_hint",
}

_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000
_CHUNK = 1 << 20


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


def _mixed_precision(dtype: Any) -> str:
    """kohya's ss_mixed_precision vocabulary: fp16 / bf16 / no."""
    d = str(dtype).lower()
    if d in ("fp16", "float16"):
        return "fp16"
    if d in ("bf16", "bfloat16"):
        return "bf16"
    return "no"


def _optimizer_text(name: Any, params: Any) -> str:
    """"adamw" or "adamw(weight_decay=0.01,betas=[0.9, 0.99])", the shape kohya writes."""
    if isinstance(params, Mapping) and params:
        args = ",".join(f"{k}={_text(v)}" for k, v in params.items())
        return f"{name}({args})"
    return str(name)


def _settings_keys(settings: Mapping[str, Any]) -> dict[str, str]:
    """The kohya ss_* training keys that can be read off the job's train settings.

    Only keys whose source setting is present are written: callers (and tests) may pass a partial
    dict, and a missing key is better than a made-up one.
    """
    out: dict[str, str] = {}

    def put(key: str, value: Any) -> None:
        if value is not None:
            out[key] = _text(value) if not isinstance(value, (int, float)) else str(value)

    lr = settings.get("lr")
    put("ss_learning_rate", lr)
    if "lr" in settings or "unet_lr" in settings:
        put("ss_unet_lr", settings.get("unet_lr") if settings.get("unet_lr") is not None else lr)
    if settings.get("train_text_encoder"):
        te = settings.get("text_encoder_lr")
        put("ss_text_encoder_lr", te if te is not None else lr)
    if "train_text_encoder" in settings:  # kohya's flag: the file holds no text-encoder LoRA
        out["ss_network_train_unet_only"] = str(not settings["train_text_encoder"])
    if "optimizer" in settings:
        out["ss_optimizer"] = _optimizer_text(settings["optimizer"], settings.get("optimizer_params"))
    put("ss_lr_scheduler", settings.get("lr_scheduler"))
    put("ss_lr_warmup_steps", settings.get("lr_warmup_steps"))
    put("ss_max_train_steps", settings.get("steps"))
    put("ss_batch_size_per_device", settings.get("batch_size"))
    accumulation = settings.get("gradient_accumulation_steps") or settings.get("gradient_accumulation")
    put("ss_gradient_accumulation_steps", accumulation)
    if "dtype" in settings:
        out["ss_mixed_precision"] = _mixed_precision(settings["dtype"])
    put("ss_noise_offset", settings.get("noise_offset"))
    put("ss_min_snr_gamma", settings.get("min_snr_gamma"))
    put("ss_max_grad_norm", settings.get("max_grad_norm"))
    if "gradient_checkpointing" in settings:
        out["ss_gradient_checkpointing"] = str(bool(settings["gradient_checkpointing"]))
    network = settings.get("network")
    if isinstance(network, Mapping) and network.get("dropout"):
        out["ss_network_dropout"] = str(float(network["dropout"]))
    return out


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
    base_model_name: str | None = None,
    seed: int | None = None,
    num_train_images: int | None = None,
    started_at: _dt.datetime | None = None,
    algo: str | None = None,
) -> dict[str, str]:
    """Header metadata for a LoRA file; all values str.

    `network_alpha` / `conv_alpha`: the alphas in effect when saving (not the configured start).
    `architecture`: modelspec architecture of the LoRA, e.g. "stable-diffusion-v1/lora".
    `resolution`: (width, height) -> modelspec.resolution "WxH".
    `base_model_name` (ss_sd_model_name, the model's hub id or path), `seed` (ss_seed),
    `num_train_images`, `started_at` (ss_training_started_at): written when given.
    `algo` (the handle's algo: lora, lokr, loha, dora): LyCORIS files say `lycoris.kohya` and
    {"algo": ...} in ss_network_args as LyCORIS writes them; DoRA adds "dora_wd": "True".
    The hash keys are not here: they depend on the tensors, see `safetensors_bytes_with_hashes`.
    """
    width, height = (int(resolution[0]), int(resolution[1]))
    when = (date or _dt.datetime.now(_dt.timezone.utc)).replace(microsecond=0)
    net_args: dict[str, str] = {}
    if conv_dim is not None:
        net_args["conv_dim"] = str(int(conv_dim))
        net_args["conv_alpha"] = str(float(conv_alpha if conv_alpha is not None else conv_dim))
    algo = (algo or "lora").lower()
    module = "networks.lora"
    if algo in ("lokr", "loha"):
        module = "lycoris.kohya"
        net_args["algo"] = algo
    elif algo == "dora":
        net_args["dora_wd"] = "True"
    out: dict[str, str] = {
        "ss_network_module": module,
        "ss_network_dim": _num(int(network_dim)),
        "ss_network_alpha": _num(float(network_alpha)),
        "ss_network_args": json.dumps(net_args),
        "ss_base_model_version": str(base_model_version),
        # kohya writes it for every model: "True" only for SD 2.x (sd_v2 / sd_v2_v)
        "ss_v2": str(str(base_model_version).startswith("sd_v2")),
        "ss_output_name": str(name),
        "ss_steps": _num(int(steps)),
        "ss_resolution": f"({width}, {height})",
        # kohya's "training finished" stamp is epoch seconds; UIs show it as a date
        "ss_training_finished_at": str(when.timestamp()),
        **_settings_keys(training_settings or {}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": str(architecture),
        "modelspec.implementation": implementation or "diffusers",
        "modelspec.title": str(name),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": when.isoformat(),
        "aitk_training_settings": json.dumps(training_settings or {}, default=str, sort_keys=True),
    }
    if base_model_name:
        out["ss_sd_model_name"] = str(base_model_name)
    if seed is not None:
        out["ss_seed"] = str(int(seed))
    if num_train_images is not None:
        out["ss_num_train_images"] = str(int(num_train_images))
    if started_at is not None:
        out["ss_training_started_at"] = str(started_at.replace(microsecond=0).timestamp())
    if trigger_word:
        out["ss_training_comment"] = str(trigger_word)
        out["modelspec.trigger_phrase"] = str(trigger_word)
    if tag_frequency is not None:
        out["ss_tag_frequency"] = json.dumps(tag_frequency, default=str)
    meta = dict(meta or {})
    for short, spec_key in _MODELSPEC_FROM_META.items():
        # an explicit modelspec.* key in the meta block wins (copied below, after this)
        if short in meta and spec_key not in meta:
            v = meta[short]
            out[spec_key] = ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else _text(v)
    for k, v in meta.items():
        k = str(k)
        if k in PROTECTED_KEYS:
            continue
        out[k] = _text(v)
    return out


# --------------------------------------------------------------------------------------- hashes
def _header_length(data: bytes | memoryview) -> int:
    if len(data) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    n = int.from_bytes(bytes(data[:8]), "little")
    if 8 + n > len(data):
        raise ValueError(f"not a safetensors file: header length {n} runs past the end ({len(data)} bytes)")
    return n


def tensor_data_sha256(data: bytes | memoryview) -> str:
    """sha256 hex of a serialised safetensors file's tensor data (everything after the header)."""
    view = memoryview(data)
    return hashlib.sha256(view[8 + _header_length(view):]).hexdigest()


def legacy_window_hash(data: bytes | memoryview) -> str:
    """First 8 hex of sha256 of bytes [0x100000, 0x110000) (the old A1111 / additional-networks hash)."""
    view = memoryview(data)
    return hashlib.sha256(view[_LEGACY_OFFSET:_LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]


def _ss_only(metadata: Mapping[str, str]) -> dict[str, str]:
    # "sshs_*" does not start with "ss_", so the hashes never feed themselves
    return {k: v for k, v in metadata.items() if k.startswith("ss_")}


def _hashes_from_ss_bytes(ss_bytes: bytes) -> dict[str, str]:
    model = tensor_data_sha256(ss_bytes)
    return {MODEL_HASH_KEY: model, LEGACY_HASH_KEY: legacy_window_hash(ss_bytes), SPEC_HASH_KEY: "0x" + model}


def weight_hashes(tensors: Mapping[str, "torch.Tensor"], metadata: Mapping[str, str]) -> dict[str, str]:
    """{sshs_model_hash, sshs_legacy_hash, modelspec.hash_sha256} of `tensors` saved with `metadata`."""
    import safetensors.torch

    return _hashes_from_ss_bytes(safetensors.torch.save(dict(tensors), metadata=_ss_only(metadata)))


def safetensors_bytes_with_hashes(tensors: Mapping[str, "torch.Tensor"], metadata: Mapping[str, str]) -> bytes:
    """The bytes of a .safetensors file of `tensors` with `metadata` plus the three hash keys.

    Any hash keys already in `metadata` are replaced (they would describe other tensors).
    Raises TypeError on a non-str metadata value, as safetensors' own error is obscure.
    """
    import safetensors.torch

    header: dict[str, str] = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata {k!r}: keys and values must be str, got {type(v).__name__}")
        if k not in HASH_KEYS:
            header[k] = v
    tensors = dict(tensors)
    ss_bytes = safetensors.torch.save(tensors, metadata=_ss_only(header))
    hashes = _hashes_from_ss_bytes(ss_bytes)
    data = safetensors.torch.save(tensors, metadata={**header, **hashes})
    # The hash was taken over the ss-only serialisation; the tensor data must be the same bytes in
    # the file we return (a byte compare, not a second hash). A safetensors change breaking this
    # would silently write wrong hashes, so check it.
    if memoryview(data)[8 + _header_length(data):] != memoryview(ss_bytes)[8 + _header_length(ss_bytes):]:
        raise RuntimeError("safetensors wrote different tensor data for the same tensors; hashes not written")
    return data


@dataclass(frozen=True)
class HashCheck:
    """Stored vs recomputed hashes of one file. `ok`: every hash key present and matching."""

    path: Path
    stored: dict[str, str | None]
    computed: dict[str, str]
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatched and not self.missing


def _stream_sha256(handle: BinaryIO, start: int) -> str:
    handle.seek(start)
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def verify_file_hashes(path: str | Path) -> HashCheck:
    """Recompute the three hashes of a written file and compare them with its header.

    The model hash streams the tensor data (no full read). The legacy hash needs the file as it
    would be serialised with only its ss_* metadata, so the tensors are loaded and re-serialised.
    """
    import safetensors.torch

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file (bad header length)")
        header = json.loads(handle.read(n))
        model = _stream_sha256(handle, 8 + n)
    metadata = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
    ss_bytes = safetensors.torch.save(safetensors.torch.load_file(str(path)), metadata=_ss_only(metadata))
    computed = {MODEL_HASH_KEY: model, LEGACY_HASH_KEY: legacy_window_hash(ss_bytes), SPEC_HASH_KEY: "0x" + model}
    stored = {k: metadata.get(k) for k in HASH_KEYS}
    missing = [k for k in HASH_KEYS if stored[k] is None]
    mismatched = [k for k in HASH_KEYS if stored[k] is not None and stored[k].lower() != computed[k]]
    return HashCheck(path, stored, computed, mismatched, missing)
