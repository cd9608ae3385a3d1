"""Build the optimizer (train.optimizer / train.optimizer_params) and the learning-rate
scheduler (train.lr_scheduler / train.lr_scheduler_params).

Each optimizer's library (bitsandbytes, transformers, prodigyopt, lion_pytorch) and diffusers are
imported only when they are needed, so importing this module stays cheap.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
from typing import Any, Callable, get_args

import torch

from aitk.config.schema import LrScheduler

logger = logging.getLogger(__name__)


class OptimizerConfigError(ValueError):
    """A train.optimizer* or train.lr_scheduler* setting that cannot be used; the message names
    the key and says what would be valid."""


# ----------------------------------------------------------------------------------------------
# optimizers
# ----------------------------------------------------------------------------------------------

def _torch_adamw():
    return torch.optim.AdamW


def _torch_adam():
    return torch.optim.Adam


def _torch_sgd():
    return torch.optim.SGD


def _bnb_adamw8bit():
    from aitk.extras import import_extra

    try:
        optim = import_extra("bitsandbytes.optim", needed_for="adamw8bit", pip_spec="bitsandbytes")
        AdamW8bit = optim.AdamW8bit
    except Exception as e:  # ImportError, or a broken native library
        raise OptimizerConfigError(
            f"train.optimizer: adamw8bit needs bitsandbytes, which cannot be imported ({e}). "
            "Fix: pip install bitsandbytes, or set train.optimizer: adamw"
        ) from e
    return AdamW8bit


def _adafactor():
    try:
        from transformers.optimization import Adafactor
    except Exception as e:
        raise OptimizerConfigError(
            f"train.optimizer: adafactor needs transformers, which cannot be imported ({e}). "
            "Fix: pip install transformers, or set train.optimizer: adamw"
        ) from e
    return Adafactor


def _prodigy():
    try:
        from prodigyopt import Prodigy
    except Exception as e:
        raise OptimizerConfigError(
            f"train.optimizer: prodigy needs prodigyopt, which cannot be imported ({e}). "
            "Fix: pip install prodigyopt, or set train.optimizer: adamw"
        ) from e
    return Prodigy


def _automagic():
    from aitk.optim.automagic import Automagic

    return Automagic


def _lion():
    try:
        from lion_pytorch import Lion
    except Exception as e:
        raise OptimizerConfigError(
            f"train.optimizer: lion needs lion-pytorch, which cannot be imported ({e}). "
            "Fix: pip install lion-pytorch, or set train.optimizer: adamw"
        ) from e
    return Lion


# name -> (class loader, dotted name for messages, defaults applied unless the user sets them).
# eps=1e-6 for the Adam family and Prodigy matches ostris/ai-toolkit, so its job files train alike.
_OPTIMIZERS: dict[str, tuple[Callable[[], type], str, dict[str, Any]]] = {
    "adamw": (_torch_adamw, "torch.optim.AdamW", {"eps": 1e-6}),
    "adam": (_torch_adam, "torch.optim.Adam", {"eps": 1e-6}),
    "adamw8bit": (_bnb_adamw8bit, "bitsandbytes.optim.AdamW8bit", {"eps": 1e-6}),
    "adafactor": (
        _adafactor,
        "transformers.optimization.Adafactor",
        {"relative_step": False, "scale_parameter": False, "warmup_init": False},
    ),
    "prodigy": (_prodigy, "prodigyopt.Prodigy", {"eps": 1e-6}),
    "lion": (_lion, "lion_pytorch.Lion", {}),
    "automagic": (_automagic, "aitk.optim.automagic.Automagic", {}),
    "sgd": (_torch_sgd, "torch.optim.SGD", {}),
}
_NOT_SUPPORTED_YET: set[str] = set()
OPTIMIZER_NAMES: tuple[str, ...] = tuple(_OPTIMIZERS)

# Keys of the fork that live in train.optimizer_params but are not constructor arguments.
# high_noise_lr / low_noise_lr: per-expert learning rates (the trainer puts them on the param
# groups). The *_lr_bump / *_min_lr / *_max_lr keys only mean something to automagic: they become
# the bounds of the param group whose "expert" entry names that expert.
EXPERT_OPTIMIZER_KEYS: frozenset[str] = frozenset(
    f"{expert}_noise_{key}"
    for expert in ("high", "low")
    for key in ("lr", "lr_bump", "min_lr", "max_lr")
)
# Automagic group options that a per-expert key `<expert>_<option>` sets for that expert alone
_AUTOMAGIC_EXPERT_OPTIONS = ("lr_bump", "min_lr", "max_lr")


def split_optimizer_params(optimizer_params: dict | None) -> tuple[dict, dict]:
    """Split train.optimizer_params into (constructor kwargs, per-expert keys of the fork)."""
    ctor, expert = {}, {}
    for k, v in (optimizer_params or {}).items():
        (expert if k in EXPERT_OPTIMIZER_KEYS else ctor)[k] = v
    return ctor, expert


def _normalize_name(name: str, key: str, valid: tuple[str, ...]) -> str:
    if not isinstance(name, str) or not name.strip():
        raise OptimizerConfigError(f"{key}: {name!r} is not a name. Valid: {', '.join(valid)}")
    return name.strip().lower()


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, default: Any) -> Any:
    """YAML 1.1 reads `1e-4` as a string; turn numeric strings and lists into what the
    constructor expects (guided by its default)."""
    if isinstance(value, str) and not isinstance(default, str):
        low = value.strip().lower()
        if isinstance(default, bool):
            if low in ("true", "yes", "on", "1"):
                return True
            if low in ("false", "no", "off", "0"):
                return False
            return value
        try:
            f = float(low)
        except ValueError:
            return value
        if isinstance(default, int) and not isinstance(default, bool) and f.is_integer():
            return int(f)
        return f
    if isinstance(value, list):
        inner_default = default[0] if isinstance(default, (tuple, list)) and default else None
        return tuple(_coerce(v, inner_default) for v in value)
    return value


def _accepted_params(cls: type) -> dict[str, Any]:
    """Keyword arguments of cls.__init__ (name -> default), without self/params/lr/*args/**kw."""
    sig = inspect.signature(cls.__init__)
    out = {}
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in ("self", "params", "lr"):
            continue
        out[p.name] = None if p.default is p.empty else p.default
    return out


def _resolve(name: str) -> tuple[str, type, str, dict[str, Any]]:
    key = _normalize_name(name, "train.optimizer", OPTIMIZER_NAMES)
    if key in _NOT_SUPPORTED_YET:
        raise OptimizerConfigError(
            f"train.optimizer: {key!r} is not supported yet. "
            f"Use one of: {', '.join(OPTIMIZER_NAMES)} (adamw is the closest general choice)"
        )
    if key not in _OPTIMIZERS:
        raise OptimizerConfigError(
            f"train.optimizer: unknown optimizer {name!r}{_did_you_mean(key, OPTIMIZER_NAMES)}. "
            f"Valid: {', '.join(OPTIMIZER_NAMES)}"
        )
    loader, dotted, defaults = _OPTIMIZERS[key]
    return key, loader(), dotted, defaults


def check_optimizer_params(name: str, optimizer_params: dict | None) -> dict[str, Any]:
    """Validate train.optimizer / train.optimizer_params without building anything.

    Returns the constructor keyword arguments (defaults of this project applied, YAML strings
    coerced, the fork's per-expert keys removed). Raises OptimizerConfigError.
    Imports the chosen optimizer's library (its signature is what decides the valid keys).
    """
    key, cls, dotted, defaults = _resolve(name)
    if optimizer_params is not None and not isinstance(optimizer_params, dict):
        raise OptimizerConfigError(
            f"train.optimizer_params: must be a mapping of keyword arguments, got {optimizer_params!r}"
        )
    ctor, expert = split_optimizer_params(optimizer_params)
    accepted = _accepted_params(cls)
    kwargs = {k: v for k, v in defaults.items() if k in accepted}
    for k, v in ctor.items():
        if k == "lr":
            raise OptimizerConfigError(
                "train.optimizer_params.lr: the learning rate is not an optimizer parameter here. "
                "Fix: set train.lr (or unet_lr / text_encoder_lr) instead"
            )
        if k not in accepted:
            raise OptimizerConfigError(
                f"train.optimizer_params.{k}: unknown parameter for {key} ({dotted})"
                f"{_did_you_mean(k, accepted)}. Accepted: {', '.join(sorted(accepted))}. "
                "Fix: remove or rename it"
            )
        kwargs[k] = _coerce(v, accepted[k])
    for k in sorted(expert):
        if k.endswith("_noise_lr"):
            continue
        if key == "automagic":
            _expert_number(k, expert[k])  # fail at start, not when the groups are built
        else:
            logger.warning(
                "train.optimizer_params.%s only applies to the automagic optimizer; "
                "it has no effect with %s", k, key,
            )
    return kwargs


def _expert_number(key: str, value: Any) -> float:
    try:
        out = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        out = math.nan
    if not math.isfinite(out) or out < 0:
        raise OptimizerConfigError(
            f"train.optimizer_params.{key}: {value!r} is not a number >= 0"
        )
    return out


def _apply_expert_bounds(groups: list[dict], optimizer_params: dict | None) -> None:
    """Automagic: put each `<expert>_lr_bump` / `_min_lr` / `_max_lr` key on the param group
    whose "expert" entry is that expert. Each key applies on its own (the fork only read them when
    the plain min_lr / max_lr / lr_bump was set too); a key also set on the group itself loses to
    the per-expert key, which is the more specific setting."""
    _, expert_keys = split_optimizer_params(optimizer_params)
    bound_keys = {k: v for k, v in expert_keys.items() if not k.endswith("_noise_lr")}
    if not bound_keys:
        return
    experts = {g.get("expert") for g in groups} - {None}
    if not experts:
        logger.warning(
            "train.optimizer_params: %s only apply to multi-expert models (e.g. WAN 2.2) and no "
            "param group names an expert; ignored (the plain min_lr / max_lr / lr_bump apply)",
            ", ".join(sorted(bound_keys)),
        )
        return
    for group in groups:
        name = group.get("expert")
        if name is None:
            continue
        for option in _AUTOMAGIC_EXPERT_OPTIONS:
            k = f"{name}_{option}"
            if k in bound_keys:
                group[option] = _expert_number(k, bound_keys[k])


def build_optimizer(
    name: str,
    param_groups: list[dict],
    *,
    lr: float,
    optimizer_params: dict | None,
) -> torch.optim.Optimizer:
    """Build the optimizer named by train.optimizer.

    param_groups: list of {"params": [...], optional "lr": ..., any other group option}; groups
    without "lr" get `lr`. A plain iterable of tensors is also accepted (one group).
    The fork's per-expert keys (EXPERT_OPTIMIZER_KEYS) in optimizer_params are not passed to the
    constructor: the trainer applies high_noise_lr / low_noise_lr itself; for automagic the
    *_lr_bump / *_min_lr / *_max_lr keys become options of the group whose "expert" entry is
    "high_noise" / "low_noise".
    """
    kwargs = check_optimizer_params(name, optimizer_params)
    key, cls, dotted, _ = _resolve(name)
    try:
        lr = float(lr)
    except (TypeError, ValueError) as e:
        raise OptimizerConfigError(f"train.lr: {lr!r} is not a number") from e

    groups: list[dict] = []
    items = list(param_groups)
    if items and not isinstance(items[0], dict):
        items = [{"params": items}]
    for i, g in enumerate(items):
        if not isinstance(g, dict) or "params" not in g:
            raise TypeError(f"param_groups[{i}] must be a dict with a 'params' entry")
        g = dict(g)
        g["params"] = list(g["params"]) if not isinstance(g["params"], torch.Tensor) else [g["params"]]
        g["lr"] = float(g["lr"]) if g.get("lr") is not None else lr
        groups.append(g)
    if key == "automagic":
        _apply_expert_bounds(groups, optimizer_params)

    if key == "prodigy" and lr < 0.1:
        logger.warning(
            "train.lr is %g with prodigy; prodigy adapts the step size and is usually run with "
            "lr 1.0 (ostris/ai-toolkit silently replaced lr < 0.1 with 1.0; here it is used as given)",
            lr,
        )
    ctor_lr: float | None = lr
    if key == "adafactor" and kwargs.get("relative_step"):
        ctor_lr = None  # Adafactor computes its own step size; group lrs are ignored by it
        logger.warning(
            "adafactor with relative_step=True ignores train.lr and the lr scheduler"
        )
    if key in ("adamw", "adam") and "fused" not in kwargs and "foreach" not in kwargs:
        params = [p for g in groups for p in g["params"]]
        devices = {p.device.type for p in params}
        if params and len(devices) == 1 and devices <= {"cuda", "cpu"} and all(p.is_floating_point() for p in params):
            # torch's fused kernel: one launch for the whole update on CUDA; on the CPU one pass
            # instead of a Python loop of ops per tensor (about 5x faster on a LoRA's small tensors)
            kwargs = {**kwargs, "fused": True}
    try:
        return cls(groups, lr=ctor_lr, **kwargs)
    except (TypeError, ValueError) as e:
        raise OptimizerConfigError(
            f"train.optimizer_params: {dotted} rejected {kwargs!r} (lr={lr}): {e}"
        ) from e


def text_encoder_param_group(params: list[torch.nn.Parameter], train_cfg: Any) -> dict[str, Any]:
    """The param group of the text-encoder networks (train.train_text_encoder): its own learning
    rate, train.text_encoder_lr, else train.lr (kohya's default; train.unet_lr is the denoiser's)."""
    lr = train_cfg.text_encoder_lr if train_cfg.text_encoder_lr is not None else train_cfg.lr
    return {"params": list(params), "lr": float(lr)}


# ----------------------------------------------------------------------------------------------
# learning-rate schedulers
# ----------------------------------------------------------------------------------------------

# The job schema is the one list of scheduler names (validation, CLI and UI read it too).
SCHEDULER_NAMES: tuple[str, ...] = get_args(LrScheduler)
_DECAYING = {"cosine", "cosine_with_warmup", "cosine_with_restarts", "linear", "polynomial"}
_WARMUP_KEYS = ("warmup_steps", "num_warmup_steps")
# ostris/ai-toolkit passed torch-scheduler style lengths; any of these overrides total_steps.
_TOTAL_KEYS = ("total_iters", "T_max", "steps", "num_training_steps")
_EXTRA_KEYS: dict[str, tuple[str, ...]] = {
    "constant": ("factor",),
    "constant_with_warmup": (),
    "cosine": ("eta_min",),
    "cosine_with_warmup": ("eta_min",),
    "cosine_with_restarts": ("eta_min", "num_cycles", "T_0", "T_mult"),
    "linear": ("eta_min", "start_factor", "end_factor"),
    "polynomial": ("eta_min", "power", "lr_end"),
}


def _num(params: dict, key: str, kind: type, *, minimum: float | None = None) -> Any:
    v = params[key]
    try:
        f = float(v)
        if kind is int:
            if not f.is_integer():
                raise ValueError
            out: Any = int(f)
        else:
            out = f
    except (TypeError, ValueError):
        raise OptimizerConfigError(
            f"train.lr_scheduler_params.{key}: {v!r} is not {'an integer' if kind is int else 'a number'}"
        ) from None
    if minimum is not None and out < minimum:
        raise OptimizerConfigError(f"train.lr_scheduler_params.{key}: {v!r} must be >= {minimum}")
    return out


def check_scheduler_params(
    name: str, *, total_steps: int, warmup_steps: int = 0, params: dict | None = None
) -> dict[str, Any]:
    """Validate train.lr_scheduler / train.lr_scheduler_params; returns the resolved settings
    {name, total_steps, warmup_steps, ...}. Raises OptimizerConfigError. Imports nothing heavy."""
    key = _normalize_name(name, "train.lr_scheduler", SCHEDULER_NAMES)
    if key not in SCHEDULER_NAMES:
        raise OptimizerConfigError(
            f"train.lr_scheduler: unknown scheduler {name!r}{_did_you_mean(key, SCHEDULER_NAMES)}. "
            f"Valid: {', '.join(SCHEDULER_NAMES)}"
        )
    params = dict(params or {})
    accepted = _WARMUP_KEYS + _TOTAL_KEYS + _EXTRA_KEYS[key]
    for k in params:
        if k not in accepted:
            raise OptimizerConfigError(
                f"train.lr_scheduler_params.{k}: not a parameter of the {key} scheduler"
                f"{_did_you_mean(k, accepted)}. Accepted: {', '.join(accepted)}. Fix: remove or rename it"
            )
    out: dict[str, Any] = {"name": key}

    total = int(total_steps)
    given_total = [k for k in _TOTAL_KEYS if k in params]
    if len(given_total) > 1:
        vals = {_num(params, k, int) for k in given_total}
        if len(vals) > 1:
            raise OptimizerConfigError(
                f"train.lr_scheduler_params: {', '.join(given_total)} disagree; keep one of them"
            )
    if given_total:
        total = _num(params, given_total[0], int, minimum=1)
    if total < 1:
        raise OptimizerConfigError(f"train.steps: total steps must be >= 1, got {total}")
    out["total_steps"] = total

    warmup = int(warmup_steps or 0)
    given_warmup = [k for k in _WARMUP_KEYS if k in params]
    if given_warmup:
        warmup = _num(params, given_warmup[0], int, minimum=0)
    if warmup < 0:
        raise OptimizerConfigError(f"train.lr_warmup_steps: must be >= 0, got {warmup}")
    if key in _DECAYING and warmup >= total:
        raise OptimizerConfigError(
            f"train.lr_warmup_steps: {warmup} warmup steps leave nothing of the {total} steps "
            f"for the {key} decay. Fix: use fewer warmup steps or constant_with_warmup"
        )
    if key == "constant" and warmup > 0 and "factor" not in params:
        logger.info("lr_scheduler constant with %d warmup steps: using constant_with_warmup", warmup)
        key = out["name"] = "constant_with_warmup"
    out["warmup_steps"] = warmup

    if "eta_min" in params:
        out["eta_min"] = _num(params, "eta_min", float, minimum=0.0)
    if key == "cosine_with_restarts":
        cycles = _num(params, "num_cycles", int, minimum=1) if "num_cycles" in params else 1
        # torch's CosineAnnealingWarmRestarts (what ai-toolkit builds): cycle i lasts T_0 * T_mult**i steps
        t_mult = _num(params, "T_mult", int, minimum=1) if "T_mult" in params else 1
        span = total - warmup
        if "T_0" in params:
            t0 = _num(params, "T_0", int, minimum=1)
            cycles = max(1, round(span / t0))
        elif t_mult > 1:  # num_cycles cycles, each T_mult times the last, filling the steps after warmup
            t0 = max(1, round(span * (t_mult - 1) / (t_mult**cycles - 1)))
        else:
            t0 = None
        out["num_cycles"] = cycles
        if t_mult > 1:
            out["T_0"], out["T_mult"] = t0, t_mult
    if key == "polynomial":
        out["power"] = _num(params, "power", float) if "power" in params else 1.0
        if "lr_end" in params:
            out["lr_end"] = _num(params, "lr_end", float, minimum=0.0)
    if key == "linear" and ("start_factor" in params or "end_factor" in params):
        if warmup:
            raise OptimizerConfigError(
                "train.lr_scheduler_params.start_factor/end_factor (torch LinearLR style) cannot be "
                "combined with warmup steps. Fix: drop the factors (linear = warmup then decay to 0) "
                "or the warmup"
            )
        out["start_factor"] = _num(params, "start_factor", float) if "start_factor" in params else 1 / 3
        out["end_factor"] = _num(params, "end_factor", float) if "end_factor" in params else 1.0
    if key == "constant" and "factor" in params:
        out["factor"] = _num(params, "factor", float, minimum=0.0)
    return out


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    params: dict | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Build the scheduler; call scheduler.step() once after every optimizer.step().

    Curves come from diffusers.optimization (warmup rises linearly from 0 at step 0 to the full lr
    at step `warmup_steps`; total_steps includes the warmup). The result is a LambdaLR over the
    given optimizer, one lambda per param group (so per-group lrs keep their ratio), clamped at
    total_steps (stepping past the end keeps the final lr). Its state_dict() resumes exactly.
    """
    cfg = check_scheduler_params(name, total_steps=total_steps, warmup_steps=warmup_steps, params=params)
    key, total, warmup = cfg["name"], cfg["total_steps"], cfg["warmup_steps"]
    LambdaLR = torch.optim.lr_scheduler.LambdaLR

    # torch-style variants kept for ostris/ai-toolkit job files
    if key == "constant" and "factor" in cfg:
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=cfg["factor"], total_iters=total)
    if key == "linear" and "start_factor" in cfg:
        return torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=cfg["start_factor"], end_factor=cfg["end_factor"], total_iters=total
        )

    if "T_mult" in cfg:
        base = _warm_restarts(warmup, cfg["T_0"], cfg["T_mult"])
    else:
        base = _diffusers_lambda(optimizer, key, cfg)
    eta_min = cfg.get("eta_min", 0.0)
    lambdas = []
    for group in optimizer.param_groups:
        initial = group.get("initial_lr", group["lr"])
        floor = (eta_min / initial) if (eta_min and initial) else 0.0
        lambdas.append(_make_lambda(base, total, warmup, floor, key in _DECAYING))
    return LambdaLR(optimizer, lambdas)


def _warm_restarts(warmup: int, t0: int, t_mult: int) -> Callable[[int], float]:
    """Linear warmup, then cosine cycles of T_0, T_0 * T_mult, ... steps, each restarting at the
    full lr (torch's CosineAnnealingWarmRestarts after a warmup)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        position, length = step - warmup, t0
        while position >= length:
            position, length = position - length, length * t_mult
        return 0.5 * (1.0 + math.cos(math.pi * position / length))

    return factor


def _make_lambda(base: Callable[[int], float], total: int, warmup: int, floor: float, decaying: bool):
    def lr_lambda(step: int) -> float:
        s = min(step, total) if decaying else step
        f = base(s)
        if floor and s >= warmup:
            f = floor + (1.0 - floor) * f
        return f

    return lr_lambda


def _diffusers_lambda(optimizer: torch.optim.Optimizer, key: str, cfg: dict) -> Callable[[int], float]:
    """The lr multiplier function of diffusers' schedule, built on a throwaway optimizer so the
    real one is touched only by the returned scheduler."""
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

    ref_lr = optimizer.defaults.get("lr")
    if not isinstance(ref_lr, (int, float)) or ref_lr <= 0:
        ref_lr = max((float(g["lr"]) for g in optimizer.param_groups if g.get("lr")), default=1.0)
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=float(ref_lr))
    diff_name = {"cosine_with_warmup": "cosine"}.get(key, key)
    if key == "polynomial":
        lr_end = cfg.get("lr_end", 1e-7)
        if lr_end >= ref_lr:
            raise OptimizerConfigError(
                f"train.lr_scheduler_params.lr_end: {lr_end} must be below the learning rate {ref_lr}"
            )
        sched = get_polynomial_decay_schedule_with_warmup(
            dummy, cfg["warmup_steps"], cfg["total_steps"], lr_end=lr_end, power=cfg["power"]
        )
    else:
        sched = get_scheduler(
            diff_name,
            dummy,
            num_warmup_steps=cfg["warmup_steps"],
            num_training_steps=cfg["total_steps"],
            num_cycles=cfg.get("num_cycles", 1),
        )
    fn = sched.lr_lambdas[0]
    if not math.isfinite(fn(0)):
        raise OptimizerConfigError(f"train.lr_scheduler: {key} gives no usable curve for {cfg}")
    return fn
