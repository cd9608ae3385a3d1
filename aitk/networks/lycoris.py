"""LoKr and LoHa networks (peft's LoKrConfig / LoHaConfig layers), with the NetworkHandle interface.

The layers are peft's, whose tensors have exactly the shapes and names of the LyCORIS key layout
(`lokr_w1`, `lokr_w2_a`, `hada_w1_a`, ...), so files carry them unchanged (aitk.networks.lycoris_files).

Scale, set live like LoRA's (peft `alpha[adapter]` / `scaling[adapter]`), by the convention LyCORIS
and ComfyUI use when they read these files:
- LoHa: dW = multiplier * alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b)   (elementwise product), r = the
  rank (inner dimension of each pair).
- LoKr: dW = multiplier * alpha / r * kron(w1, w2) when a factor is rank-decomposed
  (w2 = w2_a @ w2_b, r its inner dimension); when both factors are full matrices
  (`lokr_full_rank`, or a layer small enough that the rank covers it) dW = multiplier *
  kron(w1, w2): alpha has no effect there, and the file's `.alpha` is written as the rank.
LoKr factorises each dimension into (smaller, larger) factors: `lokr_factor` -1 picks the pair
nearest the square root, a positive factor f gives (f, dim / f) when f divides dim. w1 is the
(out_small x in_small) factor, always full; w2 (out_large x in_large[ x k x k]) is full or
rank-decomposed (peft decides with LyCORIS's rule: decomposed when rank < max(dims of w2) / 2).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from aitk.networks.lora import NetworkHandle, _alternation, checked_targets

__all__ = ["LycorisHandle", "inject_lycoris", "LYCORIS_ALGOS"]

LYCORIS_ALGOS = ("lokr", "loha")
#: the factor that starts at zero so the network starts as a no-op (peft's default init)
_ZERO_FACTORS = {"lokr": ("lokr_w1", "lokr_w1_a"), "loha": ("hada_w2_b",)}
#: peft's rank for "make every LoKr factor a full matrix": above any dimension it compares against
_FULL_RANK = 1 << 30


def _layer_classes(algo: str) -> type[nn.Module]:
    if algo == "lokr":
        from peft.tuners.lokr.layer import LoKrLayer

        return LoKrLayer
    if algo == "loha":
        from peft.tuners.loha.layer import LoHaLayer

        return LoHaLayer
    raise ValueError(f"unknown LyCORIS algorithm {algo!r}; use one of {LYCORIS_ALGOS}")


class LycorisHandle(NetworkHandle):
    """A LoKr / LoHa network injected into `module`: the NetworkHandle interface (parameters by
    name, state dicts, live alphas and multiplier) over peft's LyCORIS layers."""

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
        algo: str,
    ) -> None:
        if algo not in LYCORIS_ALGOS:
            raise ValueError(f"unknown LyCORIS algorithm {algo!r}; use one of {LYCORIS_ALGOS}")
        # set before the base constructor applies the scaling, which reads them
        self._ranks = {n: int(conv_rank if n in conv_names else linear_rank) for n in layers}  # type: ignore[arg-type]
        self._decomposed = {n: self._has_rank_factor(layer, adapter_name, algo) for n, layer in layers.items()}
        super().__init__(
            module, adapter_name, layers, conv_names, linear_rank, linear_alpha, conv_rank, conv_alpha, algo=algo
        )

    @staticmethod
    def _has_rank_factor(layer: nn.Module, adapter: str, algo: str) -> bool:
        if algo == "loha":
            return True
        return adapter in layer.lokr_w1_a or adapter in layer.lokr_w2_a

    # --- structure -------------------------------------------------------------------------
    def module_rank(self, name: str) -> int:
        """The configured rank of the module (linear or conv rank), also for full LoKr factors."""
        return self._ranks[name]

    def module_alpha(self, name: str) -> float:
        """The alpha in effect: for a LoKr module without a rank-decomposed factor, the rank
        (its scale is 1 whatever the alpha, as LyCORIS writes and reads it)."""
        return float(self._layers[name].alpha[self.adapter_name])

    def is_decomposed(self, name: str) -> bool:
        """Whether the module has a rank-decomposed factor (so alpha / rank scales it)."""
        return self._decomposed[name]

    def layer_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """One module's tensors by LyCORIS name (lokr_w1, lokr_w2_a, ..., hada_w1_a, ...)."""
        a = self.adapter_name
        layer = self._layers[name]
        return {p: getattr(layer, p)[a] for p in layer.adapter_layer_names if a in getattr(layer, p)}

    # --- alpha and multiplier ------------------------------------------------------------------
    def _apply_scaling(self) -> None:
        a = self.adapter_name
        for name, layer in self._layers.items():
            r = self._ranks[name]
            alpha = self._alpha_for(name) if self._decomposed[name] else float(r)
            layer.alpha[a] = alpha
            layer.scaling[a] = self._multiplier * alpha / r


def _has_adapter(layer: nn.Module, adapter: str) -> bool:
    if hasattr(layer, "lora_A"):
        return adapter in layer.lora_A
    return adapter in getattr(layer, "_available_adapters", set())


def inject_lycoris(
    module: nn.Module,
    *,
    algo: str,
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
    lokr_factor: int = -1,
    lokr_full_rank: bool = False,
) -> LycorisHandle:
    """Wrap the selected Linear / Conv2d modules of `module` with peft LoKr or LoHa layers, in place.

    Targets, ranks and alphas work as in `aitk.networks.lora.inject_network` (kxk convs only with
    `conv_rank`, 1x1 convs take the linear rank). `dropout` becomes peft's rank dropout (rows of
    the weight update dropped while training; LyCORIS's rank_dropout), the nearest equivalent of
    LoRA's dropout on the hidden features. LoKr: `lokr_factor` (-1 = automatic) and
    `lokr_full_rank` (both Kronecker factors full matrices; alpha has no effect then).
    `seed` redraws the initial weights from a CPU generator in model order (the factors peft
    initialises with kaiming-uniform get kaiming-uniform, the one it zeroes stays zero), so every
    process starts from the same network.
    """
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    if algo not in LYCORIS_ALGOS:
        raise ValueError(f"unknown LyCORIS algorithm {algo!r}; use one of {LYCORIS_ALGOS}")
    lokr_factor = int(lokr_factor)
    if lokr_factor == 0 or lokr_factor < -1:
        raise ValueError(f"lokr_factor must be -1 (automatic) or a positive integer, got {lokr_factor}")
    targets, conv_names, conv_alpha = checked_targets(
        module, linear_rank=linear_rank, conv_rank=conv_rank, conv_alpha=conv_alpha, dropout=dropout,
        only_if_contains=only_if_contains, ignore_if_contains=ignore_if_contains, candidates=candidates,
        adapter_name=adapter_name,
    )

    full = algo == "lokr" and bool(lokr_full_rank)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if conv_names:
        key = _alternation(sorted(conv_names))[:-1]  # peft appends its own "$"
        rank_pattern[key] = _FULL_RANK if full else int(conv_rank)  # type: ignore[arg-type]
        alpha_pattern[key] = float(conv_alpha)  # type: ignore[arg-type]
    common = dict(
        r=_FULL_RANK if full else int(linear_rank),
        alpha=float(linear_alpha),
        target_modules=_alternation(targets),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        rank_dropout=float(dropout),
        module_dropout=0.0,
        init_weights=True,
        use_effective_conv2d=False,  # LyCORIS's default (no Tucker core): plain lokr_w2_a / _b for convs
    )
    if algo == "lokr":
        config = LoKrConfig(**common, decompose_both=False, decompose_factor=lokr_factor)
    else:
        config = LoHaConfig(**common)

    prev_active = {n: list(m.active_adapters) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, module, adapter_name=adapter_name)
    if prev_active:
        # adapters already in the model (e.g. an assistant LoRA) stay active after ours is added
        for n, m in module.named_modules():
            if isinstance(m, BaseTunerLayer):
                want = [a for a in prev_active.get(n, []) if a != adapter_name]
                if _has_adapter(m, adapter_name):
                    want.append(adapter_name)
                m.set_adapter(want)

    layer_cls = _layer_classes(algo)
    layers: dict[str, nn.Module] = {}
    for name, sub in module.named_modules():
        if isinstance(sub, layer_cls) and adapter_name in sub._available_adapters:
            layers[name] = sub
    if set(layers) != set(targets):
        missing = sorted(set(targets) - set(layers))
        extra = sorted(set(layers) - set(targets))
        raise RuntimeError(f"peft wrapped other modules than selected: missing {missing[:5]}, extra {extra[:5]}")
    layers = {n: layers[n] for n in targets}  # model order

    for name, layer in layers.items():
        params = [getattr(layer, p)[adapter_name] for p in layer.adapter_layer_names
                  if adapter_name in getattr(layer, p)]
        if full and any(adapter_name in getattr(layer, p) for p in ("lokr_w1_a", "lokr_w2_a")):
            raise RuntimeError(f"{name}: lokr_full_rank asked for full factors, peft made a decomposed one")
        if dtype is not None:
            for p in params:
                p.data = p.data.to(dtype=dtype)

    if seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        zero = _ZERO_FACTORS[algo]
        with torch.no_grad():
            for layer in layers.values():
                for pname in layer.adapter_layer_names:
                    if adapter_name not in getattr(layer, pname):
                        continue
                    p = getattr(layer, pname)[adapter_name]
                    if pname in zero:
                        p.zero_()
                        continue
                    tmp = torch.empty(p.shape, dtype=torch.float32)
                    nn.init.kaiming_uniform_(tmp, a=math.sqrt(5), generator=gen)
                    p.copy_(tmp.to(device=p.device, dtype=p.dtype))

    handle = LycorisHandle(
        module,
        adapter_name,
        layers,
        conv_names,
        linear_rank=int(linear_rank),
        linear_alpha=float(linear_alpha),
        conv_rank=int(conv_rank) if conv_rank is not None else None,
        conv_alpha=float(conv_alpha) if conv_alpha is not None else None,
        algo=algo,
    )
    # only this network trains: base weights (peft froze them) and any other adapter stay frozen
    ours = {id(p) for p in handle.trainable_parameters()}
    for p in module.parameters():
        p.requires_grad_(id(p) in ours)
    return handle
