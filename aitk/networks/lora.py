"""LoRA / LoCon / DoRA injection with peft, live alpha and multiplier control.

The adapter layers are peft's (`peft.inject_adapter_in_model`): the model keeps its own class
(a diffusers UNet stays a UNet2DConditionModel), only its Linear / Conv2d children are replaced
by peft LoRA layers that hold the base layer as `<name>.base_layer`.

Scale of every wrapped module = multiplier * alpha / rank, set live on the peft layers
(`lora_alpha[adapter]` and `scaling[adapter]`); nothing is rebuilt when alpha changes. The peft
config stored on the model keeps the alphas it was created with: exporters read the live values
from the layers (`NetworkHandle.module_alphas()`), never from the config.

DoRA (`use_dora=True`) is peft's: W' = m * (W + s*B@A) / ||W + s*B@A||, the norm taken per
output channel, m = `lora_magnitude_vector` (trained, starts at ||W||), s = the scale above (so
alpha and the multiplier act inside the normalisation, as in diffusers / peft).

LoKr / LoHa handles (aitk.networks.lycoris) subclass NetworkHandle: the trainer, checkpoints,
EMA and the alpha schedule only use the interface defined here.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Iterable

import torch
from torch import nn

__all__ = ["NetworkHandle", "inject_network", "eligible_modules", "select_targets"]


def _tuner_base(module: nn.Module) -> nn.Module | None:
    """The base layer of a peft adapter layer (already wrapped by another adapter), else None."""
    get = getattr(module, "get_base_layer", None)
    if callable(get) and hasattr(module, "active_adapters"):
        return get()
    return None


def _is_kxk_conv(module: nn.Module) -> bool:
    module = _tuner_base(module) or module
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def eligible_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear / nn.Conv2d inside `module`, in model order.

    A layer that another peft adapter already wraps (e.g. an assistant LoRA loaded by diffusers)
    counts under its own name (the wrapper's), never as `<name>.base_layer` or its LoRA parts.
    """
    out: dict[str, nn.Module] = {}
    skip: str | None = None
    for name, sub in module.named_modules():  # pre-order: a wrapper's internals follow it
        if not name:
            continue
        if skip is not None and name.startswith(skip):
            continue
        skip = None
        base = _tuner_base(sub)
        if base is not None:
            skip = name + "."
            if isinstance(base, (nn.Linear, nn.Conv2d)):
                out[name] = sub
            continue
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            out[name] = sub
    return out


def _describe_filters(
    candidates: list[str] | None,
    only_if_contains: list[str] | None,
    ignore_if_contains: list[str] | None,
    conv_rank: int | None,
) -> str:
    parts = [
        f"candidates={'all Linear/Conv2d' if candidates is None else f'{len(candidates)} names'}",
        f"only_if_contains={only_if_contains!r}",
        f"ignore_if_contains={ignore_if_contains!r}",
        f"conv_rank={conv_rank!r}",
    ]
    return ", ".join(parts)


def select_targets(
    module: nn.Module,
    *,
    conv_rank: int | None = None,
    only_if_contains: list[str] | None = None,
    ignore_if_contains: list[str] | None = None,
    candidates: list[str] | None = None,
) -> list[str]:
    """Names of the modules a network with these settings wraps, in model order.

    - `candidates`: names allowed by the model adapter (None = every Linear / Conv2d).
    - kxk convs (k > 1) only when `conv_rank` is set (LoCon); 1x1 convs count as linear.
    - `only_if_contains`: keep names containing one of the substrings;
      `ignore_if_contains`: drop names containing any of them (wins over only_if_contains).
    Raises ValueError when nothing is left (naming the filters and example module names).
    """
    eligible = eligible_modules(module)
    if candidates is None:
        names = list(eligible)
    else:
        unknown = [c for c in candidates if c not in eligible]
        if unknown:
            raise ValueError(
                f"{len(unknown)} candidate module(s) are not Linear/Conv2d modules of this model, "
                f"e.g. {unknown[:5]}; examples of valid names: {list(eligible)[:5]}"
            )
        wanted = set(candidates)
        names = [n for n in eligible if n in wanted]  # model order, no duplicates
    if conv_rank is None:
        names = [n for n in names if not _is_kxk_conv(eligible[n])]
    if only_if_contains:
        names = [n for n in names if any(s in n for s in only_if_contains)]
    if ignore_if_contains:
        names = [n for n in names if not any(s in n for s in ignore_if_contains)]
    if not names:
        pool = list(eligible) if candidates is None else [c for c in eligible if c in set(candidates)]
        examples = pool[:8] or list(eligible)[:8]
        raise ValueError(
            "No module to wrap with the network: the filters left nothing "
            f"({_describe_filters(candidates, only_if_contains, ignore_if_contains, conv_rank)}). "
            f"Example module names in this model: {examples}"
        )
    return names


def _alternation(names: Iterable[str]) -> str:
    """An anchored regex matching exactly these full module names."""
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


class NetworkHandle:
    """A LoRA / LoCon / DoRA network injected (in place) into `module` under `adapter_name`."""

    #: the network kind in files and logs: "lora" (LoCon too), "dora"; subclasses "lokr", "loha"
    algo: str = "lora"

    def __init__(
        self,
        module: nn.Module,
        adapter_name: str,
        layers: dict[str, nn.Module],
        conv_names: set[str],
        linear_rank: int,
        linear_alpha: float,
        conv_rank: int | None,
        conv_alpha: float | None,
        algo: str | None = None,
    ) -> None:
        self.module = module
        self.adapter_name = adapter_name
        if algo is not None:
            self.algo = algo
        # per-module alphas loaded from a file whose modules do not share one alpha; set_alphas
        # (the alpha schedule) replaces them all
        self._alpha_override: dict[str, float] = {}
        self.linear_rank = int(linear_rank)
        self.conv_rank = int(conv_rank) if conv_rank is not None else None
        self._layers = layers  # full module name -> peft LoraLayer, model order
        self._conv_names = conv_names
        self._linear_alpha = float(linear_alpha)
        self._conv_alpha = float(conv_alpha) if conv_alpha is not None else None
        self._multiplier = 1.0
        self._apply_scaling()

    # --- structure -------------------------------------------------------------------------
    def wrapped_module_names(self) -> list[str]:
        return list(self._layers)

    def conv_module_names(self) -> list[str]:
        """Wrapped kxk convs (LoCon part, conv rank / alpha)."""
        return [n for n in self._layers if n in self._conv_names]

    def lora_layers(self) -> dict[str, nn.Module]:
        """Full module name -> peft adapter layer (LoRA, or LoKr / LoHa in the subclass)."""
        return dict(self._layers)

    @property
    def uses_dora(self) -> bool:
        return self.algo == "dora"

    def module_rank(self, name: str) -> int:
        return int(self._layers[name].r[self.adapter_name])

    def module_alpha(self, name: str) -> float:
        """The alpha in effect now for one wrapped module."""
        return float(self._layers[name].lora_alpha[self.adapter_name])

    def module_ranks(self) -> dict[str, int]:
        return {n: self.module_rank(n) for n in self._layers}

    def module_alphas(self) -> dict[str, float]:
        return {n: self.module_alpha(n) for n in self._layers}

    def is_conv_module(self, name: str) -> bool:
        return name in self._conv_names

    # --- parameters --------------------------------------------------------------------------
    def layer_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """One module's trainable tensors by suffix: lora_A.weight, lora_B.weight and, for DoRA,
        lora_magnitude_vector (peft's state-dict names without the adapter name)."""
        a = self.adapter_name
        layer = self._layers[name]
        out = {"lora_A.weight": layer.lora_A[a].weight, "lora_B.weight": layer.lora_B[a].weight}
        if self.uses_dora:
            out["lora_magnitude_vector"] = layer.lora_magnitude_vector[a].weight
        return out

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        """`<module>.<suffix>` -> parameter (no adapter name), suffixes from `layer_parameters`."""
        return {
            f"{name}.{suffix}": p for name in self._layers for suffix, p in self.layer_parameters(name).items()
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.named_trainable_parameters().values())

    def network_state_dict(self) -> dict[str, torch.Tensor]:
        """Just the LoRA weights, peft names without the adapter name; detached clones."""
        return {k: p.detach().clone() for k, p in self.named_trainable_parameters().items()}

    def load_network_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Exact inverse of `network_state_dict` (values copied in place, cast to the params' dtype)."""
        params = self.named_trainable_parameters()
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if missing or unexpected:
            raise KeyError(
                f"network state does not match the network: {len(missing)} missing key(s) "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, {len(unexpected)} unexpected key(s) "
                f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )
        bad = [
            f"{k}: file {tuple(state[k].shape)} vs network {tuple(p.shape)}"
            for k, p in params.items()
            if tuple(state[k].shape) != tuple(p.shape)
        ]
        if bad:
            raise ValueError(f"network state has wrong shapes: {bad[:5]}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k].to(device=p.device, dtype=p.dtype))

    # --- alpha and multiplier ------------------------------------------------------------------
    @property
    def linear_alpha(self) -> float:
        return self._linear_alpha

    @property
    def conv_alpha(self) -> float | None:
        return self._conv_alpha

    @property
    def multiplier(self) -> float:
        return self._multiplier

    def set_alphas(self, linear_alpha: float, conv_alpha: float | None) -> None:
        """Set alpha live: scale = multiplier * alpha / rank on every wrapped module.

        Linear modules (and 1x1 convs) take `linear_alpha`, kxk convs `conv_alpha`;
        `conv_alpha=None` leaves the conv alpha unchanged.
        """
        linear_alpha = float(linear_alpha)
        if not math.isfinite(linear_alpha):
            raise ValueError(f"linear_alpha must be a finite number, got {linear_alpha!r}")
        if conv_alpha is not None:
            conv_alpha = float(conv_alpha)
            if not math.isfinite(conv_alpha):
                raise ValueError(f"conv_alpha must be a finite number, got {conv_alpha!r}")
            if self.conv_rank is None:
                # no conv layers: remember nothing, there is nothing to scale
                conv_alpha = None
        self._linear_alpha = linear_alpha
        if conv_alpha is not None:
            self._conv_alpha = conv_alpha
        self._alpha_override = {}
        self._apply_scaling()

    def set_module_alphas(self, alphas: dict[str, float]) -> None:
        """Set the alpha of single modules (a loaded file may give each module its own); the
        others keep theirs. The next `set_alphas` call replaces these."""
        unknown = [n for n in alphas if n not in self._layers]
        if unknown:
            raise KeyError(f"not wrapped by this network: {unknown[:5]}")
        for name, value in alphas.items():
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"alpha of {name} must be a finite number, got {value!r}")
            self._alpha_override[name] = value
        self._apply_scaling()

    def _alpha_for(self, name: str) -> float:
        if name in self._alpha_override:
            return self._alpha_override[name]
        alpha = self._conv_alpha if name in self._conv_names else self._linear_alpha
        return float(alpha)

    def set_multiplier(self, m: float) -> None:
        """Scale the whole network's output (sample.network_multiplier); 1.0 = as trained."""
        m = float(m)
        if not math.isfinite(m):
            raise ValueError(f"multiplier must be a finite number, got {m!r}")
        self._multiplier = m
        self._apply_scaling()

    def _apply_scaling(self) -> None:
        a = self.adapter_name
        for name, layer in self._layers.items():
            alpha = self._alpha_for(name)
            r = layer.r[a]
            layer.lora_alpha[a] = alpha
            layer.scaling[a] = self._multiplier * alpha / r

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(algo={self.algo!r}, adapter={self.adapter_name!r}, modules={len(self._layers)}, "
            f"conv_modules={len(self._conv_names)}, linear={self.linear_rank}/{self._linear_alpha}, "
            f"conv={self.conv_rank}/{self._conv_alpha}, multiplier={self._multiplier})"
        )


def checked_targets(
    module: nn.Module,
    *,
    linear_rank: int,
    conv_rank: int | None,
    conv_alpha: float | None,
    dropout: float,
    only_if_contains: list[str] | None,
    ignore_if_contains: list[str] | None,
    candidates: list[str] | None,
    adapter_name: str,
) -> tuple[list[str], set[str], float | None]:
    """Validate the settings every network type shares and select its targets.

    Returns (target module names, the kxk convs among them, conv alpha with its default = conv rank).
    """
    if linear_rank is None or int(linear_rank) < 1:
        raise ValueError(f"linear_rank must be >= 1, got {linear_rank!r}")
    if conv_rank is not None and int(conv_rank) < 1:
        raise ValueError(f"conv_rank must be >= 1 or None, got {conv_rank!r}")
    if conv_rank is not None and conv_alpha is None:
        conv_alpha = float(conv_rank)
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    existing = getattr(module, "peft_config", None)
    if isinstance(existing, dict) and adapter_name in existing:
        raise ValueError(f"adapter {adapter_name!r} is already injected into this module")
    targets = select_targets(
        module,
        conv_rank=conv_rank,
        only_if_contains=only_if_contains,
        ignore_if_contains=ignore_if_contains,
        candidates=candidates,
    )
    eligible = eligible_modules(module)
    return targets, {n for n in targets if _is_kxk_conv(eligible[n])}, conv_alpha


def inject_network(
    module: nn.Module,
    *,
    linear_rank: int,
    linear_alpha: float,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    dropout: float = 0.0,
    only_if_contains: list[str] | None = None,
    ignore_if_contains: list[str] | None = None,
    candidates: list[str] | None = None,
    adapter_name: str = "default",
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    use_dora: bool = False,
) -> NetworkHandle:
    """Wrap the selected Linear / Conv2d modules of `module` with peft LoRA layers, in place.

    Linear and 1x1 convs get `linear_rank` / `linear_alpha`; kxk convs get `conv_rank` /
    `conv_alpha` (default: alpha = conv rank) and are only wrapped when `conv_rank` is set.
    `seed` makes the initial weights identical across processes (lora_A kaiming-uniform like
    peft's default, lora_B zeros, drawn in model order from a CPU generator).
    `dtype`: dtype of the LoRA weights (None = the base layer's dtype, peft's default).
    `use_dora`: weight-decomposed LoRA (peft's DoRA; the magnitude vector trains too).
    Afterwards only this network's parameters require grad (base weights and any other adapter
    already in `module` are frozen); other adapters stay active alongside this one.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    targets, conv_names, conv_alpha = checked_targets(
        module, linear_rank=linear_rank, conv_rank=conv_rank, conv_alpha=conv_alpha, dropout=dropout,
        only_if_contains=only_if_contains, ignore_if_contains=ignore_if_contains, candidates=candidates,
        adapter_name=adapter_name,
    )

    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if conv_names:
        # one anchored alternation key: peft matches it with re.match(r"(.*\.)?(KEY)$", name)
        key = _alternation(sorted(conv_names))[:-1]  # drop "$": peft appends its own
        rank_pattern[key] = int(conv_rank)
        alpha_pattern[key] = float(conv_alpha)
    config = LoraConfig(
        r=int(linear_rank),
        lora_alpha=float(linear_alpha),
        target_modules=_alternation(targets),  # a str is matched with re.fullmatch: exact names
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=float(dropout),
        bias="none",
        init_lora_weights=True,
        use_dora=bool(use_dora),
    )
    from peft.tuners.tuners_utils import BaseTunerLayer

    # adapters already in the model (e.g. an assistant LoRA) stay active after ours is added
    prev_active = {n: list(m.active_adapters) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, module, adapter_name=adapter_name)
    if prev_active:
        for n, m in module.named_modules():
            if isinstance(m, BaseTunerLayer):
                want = [a for a in prev_active.get(n, []) if a != adapter_name]
                if adapter_name in getattr(m, "lora_A", {}):
                    want.append(adapter_name)
                m.set_adapter(want)

    layers: dict[str, nn.Module] = {}
    for name, sub in module.named_modules():
        if isinstance(sub, LoraLayer) and adapter_name in sub.lora_A:
            layers[name] = sub
    if set(layers) != set(targets):
        missing = sorted(set(targets) - set(layers))
        extra = sorted(set(layers) - set(targets))
        raise RuntimeError(f"peft wrapped other modules than selected: missing {missing[:5]}, extra {extra[:5]}")
    layers = {n: layers[n] for n in targets}  # model order

    for name, layer in layers.items():
        want = int(conv_rank) if name in conv_names else int(linear_rank)
        if layer.r[adapter_name] != want:
            raise RuntimeError(f"{name}: peft used rank {layer.r[adapter_name]}, expected {want}")
        if dtype is not None:
            layer.lora_A[adapter_name].to(dtype=dtype)
            layer.lora_B[adapter_name].to(dtype=dtype)
            if use_dora:
                layer.lora_magnitude_vector[adapter_name].to(dtype=dtype)

    if seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        with torch.no_grad():
            for layer in layers.values():
                a = layer.lora_A[adapter_name].weight
                b = layer.lora_B[adapter_name].weight
                tmp = torch.empty(a.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(tmp, a=math.sqrt(5), generator=gen)
                a.copy_(tmp.to(device=a.device, dtype=a.dtype))
                b.zero_()
    # DoRA's magnitude vector was set to ||W + s*B@A|| = ||W|| at injection: B is still zero, so
    # redrawing A above leaves it right

    handle = NetworkHandle(
        module,
        adapter_name,
        layers,
        conv_names,
        linear_rank=int(linear_rank),
        linear_alpha=float(linear_alpha),
        conv_rank=int(conv_rank) if conv_rank is not None else None,
        conv_alpha=float(conv_alpha) if conv_alpha is not None else None,
        algo="dora" if use_dora else "lora",
    )
    # only this network trains: base weights (peft froze them) and any other adapter stay frozen
    ours = {id(p) for p in handle.trainable_parameters()}
    for p in module.parameters():
        p.requires_grad_(id(p) in ours)
    return handle

