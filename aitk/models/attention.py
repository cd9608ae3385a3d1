"""train.attention_backend: which attention kernel the denoiser runs.

Names are diffusers' attention-dispatcher backends (AttentionBackendName; ai-toolkit passes the
value to ModelMixin.set_attention_backend as it is): native (PyTorch scaled-dot-product attention,
the default), flash (flash-attn 2), sage (sageattention), xformers, flex (PyTorch flex_attention),
_flash_3, the *_hub kernels and the _native_* SDPA variants; "sdpa" is read as native. ai-toolkit's
older `train.xformers: true` asks for xformers when attention_backend is unset.

FLUX and WAN transformers' attention processors go through the dispatcher, so the backend is set on
each of them. SD 1.x / 2.x and SDXL UNets' processors call PyTorch SDPA directly: only xformers can
replace them (enable_xformers_memory_efficient_attention). Where the chosen backend cannot run
(library missing, no CUDA device, an fp16 / bf16 kernel and fp32 training, a denoiser it cannot
reach) the run logs one line saying why, and PyTorch SDPA runs.

Nothing heavy is imported at module level: the schema reads BACKEND_NAMES for `aitk validate`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

#: diffusers 0.42's AttentionBackendName values (tests/test_attention_backends.py checks them)
BACKEND_NAMES: tuple[str, ...] = (
    "native", "flash", "sage", "xformers", "flex",
    "flash_hub", "flash_varlen", "flash_varlen_hub", "flash_4_hub", "_flash_3", "_flash_varlen_3", "_flash_3_hub",
    "_flash_3_varlen_hub", "aiter_fa2_hub",
    "_native_cudnn", "_native_efficient", "_native_flash", "_native_math", "_native_npu", "_native_xla",
    "sage_hub", "sage_blackwell_hub", "sage_varlen", "_sage_qk_int8_pv_fp8_cuda", "_sage_qk_int8_pv_fp8_cuda_sm90",
    "_sage_qk_int8_pv_fp16_cuda", "_sage_qk_int8_pv_fp16_triton",
)
ALIASES = {"sdpa": "native"}
DEFAULT = "native"
FALLBACK = "PyTorch SDPA runs instead"

#: backends that train on any device; the others need CUDA (or their own device: npu, xla)
_ANY_DEVICE = frozenset({"native", "_native_math"})
_OWN_DEVICE = {"_native_npu": "npu", "_native_xla": "xla"}
_DEVICE_WORDS = {"cuda": "a CUDA GPU", "npu": "an Ascend NPU", "xla": "an XLA device"}
#: kernels that take fp16 / bf16 inputs only
_HALF_ONLY_PREFIXES = ("flash", "_flash", "aiter", "sage", "_sage", "_native_flash", "_native_cudnn")


def accepted_names() -> tuple[str, ...]:
    """What train.attention_backend may say: native, its alias sdpa, then the rest."""
    return (BACKEND_NAMES[0], *ALIASES, *BACKEND_NAMES[1:])


def normalise(name: str) -> str:
    """The diffusers backend of a job value (case-insensitive, aliases resolved)."""
    lowered = name.strip().lower()
    return ALIASES.get(lowered, lowered)


#: dispatcher backends that honour an attention mask (models that mask padding need one of these)
MASKED_BACKENDS = ("native", "_native_math", "_native_efficient", "_native_cudnn", "xformers")


def requested(train_cfg: Any) -> tuple[str, str] | None:
    """(backend, the job key that asked for it) or None when the job leaves attention alone."""
    if train_cfg.attention_backend:
        return normalise(train_cfg.attention_backend), f"train.attention_backend {train_cfg.attention_backend}"
    if getattr(train_cfg, "xformers", False):
        return "xformers", "train.xformers: true"
    return None


def _package(backend: str) -> tuple[str, str] | None:
    """(import name, what to install) of the library a backend needs; None for PyTorch's own."""
    if backend.endswith("_hub"):
        return "kernels", "pip install kernels"
    if backend in ("flash", "flash_varlen"):
        return "flash_attn", "pip install flash-attn"
    if backend in ("_flash_3", "_flash_varlen_3"):
        return "flash_attn_interface", "build flash-attention 3 from its hopper/ sources"
    if backend.startswith(("sage", "_sage")):
        return "sageattention", "pip install sageattention"
    if backend == "xformers":
        return "xformers", "pip install xformers"
    if backend in ("_native_npu", "_native_xla"):
        name = "torch_npu" if backend == "_native_npu" else "torch_xla"
        return name, f"pip install {name.replace('_', '-')}"
    return None


def unusable_reason(backend: str, device_type: str, dtype: Any) -> str | None:
    """Why `backend` cannot run for this process (None: it can)."""
    import torch

    package = _package(backend)
    if package is not None and importlib.util.find_spec(package[0]) is None:
        label = {"flash_attn": "flash-attn", "flash_attn_interface": "flash-attn 3"}.get(package[0], package[0])
        return f"{label} is not installed ({package[1]})"
    try:  # diffusers' own check: versions too old, imports that fail
        from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

        _check_attention_backend_requirements(AttentionBackendName(backend))
    except ImportError:
        pass  # a diffusers without the check: set_attention_backend reports what it finds
    except RuntimeError as exc:
        return str(exc)
    if backend == "flex" and device_type != "cuda":  # its forward runs anywhere, its backward does not
        return f"PyTorch's flex_attention has no backward pass on {device_type} (it trains on a CUDA GPU)"
    wanted_device = _OWN_DEVICE.get(backend, None if backend in _ANY_DEVICE else "cuda")
    if wanted_device is not None and device_type != wanted_device:
        return f"it runs on {_DEVICE_WORDS[wanted_device]} only and this run is on {device_type}"
    if backend.startswith(_HALF_ONLY_PREFIXES) and dtype == torch.float32:
        return "its kernels take fp16 / bf16 only and this run trains in fp32 (set train.dtype: bf16)"
    return None


def _uses_dispatcher(module: Any) -> bool:
    """Whether the module's attention processors read a dispatcher backend (FLUX, WAN: yes; the
    SD UNets' AttnProcessor2_0: no)."""
    return any(hasattr(getattr(m, "processor", None), "_attention_backend") for m in module.modules())


def _set_dispatcher_backend(module: Any, backend: str) -> None:
    """set_attention_backend on the module's processors, leaving diffusers' process-wide default
    (which set_attention_backend also changes) as it was, so other models keep theirs."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    try:
        module.set_attention_backend(backend)
    finally:
        _AttentionBackendRegistry._active_backend = before


def apply_attention_backend(adapter: Any, train_cfg: Any, log: Callable[[str], None]) -> str:
    """Set the job's attention backend on the adapter's denoiser(s); returns the backend that runs
    ("native" when it falls back, or when the job asks for none). Logs one line."""
    wanted = requested(train_cfg)
    if wanted is None:
        return DEFAULT
    backend, key = wanted
    if backend not in BACKEND_NAMES:  # the schema refuses these; a guard for direct callers
        raise ValueError(f"{key}: unknown attention backend; use one of {', '.join(accepted_names())}")
    denoisers = list(adapter.experts().values())
    label = type(denoisers[0]).__name__
    dispatched = all(_uses_dispatcher(m) for m in denoisers)
    if backend == DEFAULT:
        for module in denoisers if dispatched else []:
            _set_dispatcher_backend(module, backend)
        log(f"attention: PyTorch SDPA (native) in {label}")
        return DEFAULT
    unet_xformers = backend == "xformers" and all(
        hasattr(m, "enable_xformers_memory_efficient_attention") for m in denoisers
    )
    if not dispatched and not unet_xformers:
        reason = (
            f"{label}'s attention processors call PyTorch SDPA directly, not diffusers' attention "
            "dispatcher (only xformers can replace them)"
        )
    else:
        reason = unusable_reason(backend, adapter.device.type, adapter.dtype)
    if reason is None:
        try:
            for module in denoisers:
                if dispatched:
                    _set_dispatcher_backend(module, backend)
                else:
                    module.enable_xformers_memory_efficient_attention()
        except Exception as exc:  # noqa: BLE001 - e.g. a hub kernel that cannot be downloaded
            for module in denoisers:
                if dispatched:
                    module.reset_attention_backend()
                else:
                    module.disable_xformers_memory_efficient_attention()
            reason = f"{type(exc).__name__}: {exc}"
    if reason is not None:
        log(f"{key}: {reason}; {FALLBACK}")
        return DEFAULT
    log(f"attention: {backend} ({key}) in {label}")
    return backend
