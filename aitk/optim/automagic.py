"""Automagic: an Adafactor-style optimizer whose learning rate is a per-element mask that adapts
to how steadily each element's update keeps its sign (`train.optimizer: automagic`).

Per parameter tensor, each step:

1. Second moment v of the gradient, an exponential moving average with `beta2`, bias-corrected
   (divided by 1 - beta2^t, so the first steps are not inflated). Matrices (and higher-rank tensors
   viewed as `shape[0] x rest`) keep only row and column averages of grad² + eps and rebuild v as
   outer(row, col) / mean(row), as Adafactor does; vectors and scalars keep the full v.
2. update = grad / sqrt(v), then RMS clipping: update /= max(1, RMS(update) / clip_threshold).
3. Learning-rate mask: where the update's sign equals the previous step's, the element's rate goes
   up by `lr_bump`; where it flips, it goes down by `lr_bump`; clamped to [min_lr, max_lr].
   An element whose update is exactly zero on this or the previous step has no sign to compare:
   its rate stays (so the first step changes nothing, and neither does a LoRA factor whose
   gradient is zero until the other factor moves).
4. p -= eff_lr * (update + weight_decay * p), with eff_lr = mask * (group lr / mask_init_lr):
   decoupled weight decay uses the same per-element rate as the update.

The lr scheduler: a torch scheduler writes group["lr"]; Automagic multiplies the mask by
group["lr"] / group["mask_init_lr"] (mask_init_lr = the group's lr when the optimizer was built),
so warmup and decay scale the adapted rates, and a constant scheduler leaves them as they are.
The bounds [min_lr, max_lr] apply to the mask, before that factor.

State (exact through state_dict / load_state_dict): per tensor `step` (int), `lr_code` (int16, or
int32 when the grid needs more than 32767 levels either side), `sign` (int8: -1, 0, +1),
`exp_avg_sq_row` / `exp_avg_sq_col` (fp32; factored) or `exp_avg_sq` (fp32; full). The mask is not
stored as rates but as integer codes k on the grid clamp(anchor + k * lr_bump, min_lr, max_lr),
anchor = clamp(mask_init_lr, min_lr, max_lr): 2 bytes per element and exactly additive. (Log-spaced
uint8 levels or bf16 rates would be 1-2 bytes too, but both are coarser than the default
lr_bump near max_lr -- bf16's spacing at 5e-4 is 3.8e-6 -- so the mask would freeze there.)
The live mask is always on this grid, so a resumed run continues bit for bit. The generators used
for stochastic rounding are saved under the extra key "automagic_rng".

bf16 parameters are updated in fp32 and written back with stochastic rounding (unbiased, drawn
from a seeded torch.Generator per device, so runs repeat exactly); fp16 rounds to nearest.

After each step(): `last_gradient_stability` (fraction of compared elements whose update sign
repeated, weighted by element count over every tensor that had a gradient; None when nothing
could be compared, e.g. the first step) and `mean_learning_rates()` (per group, the mean effective
rate over its elements; what metrics report as the learning rate).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import torch

logger = logging.getLogger(__name__)

_BF16_LOW_BITS = 0xFFFF  # bf16 is the top 16 bits of an fp32 number
_RNG_KEY = "automagic_rng"


def stochastic_round_to_bf16(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Round fp32 `value` to bf16 up or down at random, with the probability of rounding up equal
    to the dropped fraction, so the expected result is `value` (nearest rounding would drop every
    update smaller than half a bf16 step, which stalls training at small learning rates)."""
    bits = value.to(torch.float32).contiguous().view(torch.int32)
    noise = torch.randint(
        0, _BF16_LOW_BITS + 1, bits.shape, dtype=torch.int32, device=bits.device, generator=generator
    )
    # Adding noise below the kept bits then truncating rounds the magnitude up with probability
    # (dropped bits / 2^16); sign-magnitude encoding makes this symmetric for negative numbers.
    rounded = (bits + noise) & ~_BF16_LOW_BITS
    return rounded.view(torch.float32).to(torch.bfloat16)


def _as_matrix_shape(shape: torch.Size) -> tuple[int, int] | None:
    """(rows, cols) for the factored second moment, or None for a full one."""
    if len(shape) < 2:
        return None
    rows = shape[0]
    return rows, math.prod(shape[1:])


class Automagic(torch.optim.Optimizer):
    """See the module docstring. Group options: lr, min_lr, max_lr, lr_bump, beta2,
    clip_threshold, weight_decay, eps (each may differ per param group)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        min_lr: float = 1e-7,
        max_lr: float = 1e-3,
        lr_bump: float = 1e-6,
        beta2: float = 0.999,
        clip_threshold: float = 1.0,
        weight_decay: float = 0.0,
        eps: float = 1e-30,
        seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr, min_lr=min_lr, max_lr=max_lr, lr_bump=lr_bump, beta2=beta2,
            clip_threshold=clip_threshold, weight_decay=weight_decay, eps=eps,
        )
        self._seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        # Sums kept on the parameters' devices so step() never waits for the GPU; read lazily.
        self._agree: torch.Tensor | None = None
        self._compared: torch.Tensor | None = None
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group, len(self.param_groups) - 1)
        # The lr the mask starts from; also the reference the scheduler's lr is divided by.
        group.setdefault("mask_init_lr", float(group["lr"]))
        self._grid(group)  # refuses a grid too fine for int32 codes now, not at the first step
        lo, hi, start = group["min_lr"], group["max_lr"], group["mask_init_lr"]
        if not lo <= start <= hi:
            logger.warning(
                "automagic: param group %d starts at lr %g, outside [min_lr %g, max_lr %g]; "
                "its learning-rate mask starts at %g",
                len(self.param_groups) - 1, start, lo, hi, min(max(start, lo), hi),
            )

    @staticmethod
    def _grid(group: dict[str, Any]) -> tuple[float, float, int, int, torch.dtype]:
        """(anchor, lr_bump, lowest code, highest code, code dtype) of a group's mask grid."""
        lo, hi, bump = float(group["min_lr"]), float(group["max_lr"]), float(group["lr_bump"])
        anchor = min(max(float(group["mask_init_lr"]), lo), hi)
        if bump <= 0:
            return anchor, 0.0, 0, 0, torch.int16
        # The tiny slack keeps float noise (999.0000000001) from adding a level past a bound.
        down = math.ceil((anchor - lo) / bump - 1e-9)
        up = math.ceil((hi - anchor) / bump - 1e-9)
        if max(down, up) > torch.iinfo(torch.int32).max:
            raise ValueError(
                f"automagic: lr_bump {bump:g} is too small for [min_lr {lo:g}, max_lr {hi:g}] "
                "(more than 2^31 steps); raise lr_bump"
            )
        dtype = torch.int16 if max(down, up) <= torch.iinfo(torch.int16).max else torch.int32
        return anchor, bump, -down, up, dtype

    @staticmethod
    def _scale(group: dict[str, Any]) -> float:
        """The lr scheduler's factor: group lr relative to the lr the mask started from."""
        return float(group["lr"]) / float(group["mask_init_lr"])

    def _decode(self, group: dict[str, Any], codes: torch.Tensor) -> torch.Tensor:
        """Per-element mask rates (fp32) of `codes`, before the scheduler factor."""
        anchor, bump, _, _, _ = self._grid(group)
        # int32 codes can exceed 2^24, past which float32 no longer holds every integer
        wide = torch.float64 if codes.dtype == torch.int32 else torch.float32
        rates = codes.to(wide).mul_(bump).add_(anchor)
        return rates.clamp_(float(group["min_lr"]), float(group["max_lr"])).to(torch.float32)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            self._generators[key] = gen
        return self._generators[key]

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._agree = self._compared = None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("automagic does not support sparse gradients")
                self._step_param(p, group)
        return loss

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        _, _, _, _, code_dtype = self._grid(group)
        state["step"] = 0
        state["lr_code"] = torch.zeros(p.shape, dtype=code_dtype, device=p.device)
        state["sign"] = torch.zeros(p.shape, dtype=torch.int8, device=p.device)
        matrix = _as_matrix_shape(p.shape)
        if matrix is None:
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg_sq_row"] = torch.zeros(matrix[0], dtype=torch.float32, device=p.device)
            state["exp_avg_sq_col"] = torch.zeros(matrix[1], dtype=torch.float32, device=p.device)
        return state

    def _step_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p] if self.state.get(p) else self._init_state(p, group)
        state["step"] += 1
        beta2, eps = float(group["beta2"]), float(group["eps"])
        correction = 1.0 - beta2 ** state["step"]
        grad = p.grad.to(torch.float32)
        sq = grad.square().add_(eps)

        matrix = _as_matrix_shape(p.shape)
        if matrix is None:
            v = state["exp_avg_sq"]
            v.lerp_(sq, 1.0 - beta2)
            update = grad / (v / correction).sqrt_()
        else:
            sq2 = sq.reshape(matrix)
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.lerp_(sq2.mean(dim=1), 1.0 - beta2)
            col.lerp_(sq2.mean(dim=0), 1.0 - beta2)
            # v = outer(row, col) / mean(row) / correction, applied as two rsqrt factors so the
            # full matrix v is never built.
            row_factor = (row / row.mean()).rsqrt_().unsqueeze(1)
            col_factor = (col / correction).rsqrt_().unsqueeze(0)
            update = (grad.reshape(matrix) * row_factor * col_factor).reshape(p.shape)

        rms = update.square().mean().sqrt()
        update.div_((rms / float(group["clip_threshold"])).clamp_(min=1.0))

        sign = torch.sign(update).to(torch.int8)
        prev = state["sign"]
        compared = (sign != 0) & (prev != 0)
        agree = compared & (sign == prev)
        flip = compared & ~agree
        _, _, lowest, highest, _ = self._grid(group)
        codes = state["lr_code"]
        codes.add_(agree.to(codes.dtype)).sub_(flip.to(codes.dtype)).clamp_(lowest, highest)
        prev.copy_(sign)
        n_agree, n_compared = agree.sum(), compared.sum()
        self._agree = n_agree if self._agree is None else self._agree + n_agree.to(self._agree.device)
        self._compared = (
            n_compared if self._compared is None else self._compared + n_compared.to(self._compared.device)
        )

        rate = self._decode(group, codes).mul_(self._scale(group))
        wd = float(group["weight_decay"])
        if wd:
            update.add_(p.to(torch.float32), alpha=wd)
        if p.dtype == torch.float32:
            p.addcmul_(rate, update, value=-1.0)
            return
        new = p.to(torch.float32).addcmul_(rate, update, value=-1.0)
        if p.dtype == torch.bfloat16:
            p.copy_(stochastic_round_to_bf16(new, self._generator(p.device)))
        else:
            p.copy_(new)  # fp16 and others: nearest rounding

    # ------------------------------------------------------------------ reporting
    @property
    def last_gradient_stability(self) -> float | None:
        """Share of elements whose update sign repeated at the last step(), over the elements of
        every tensor that had a gradient and a nonzero update on both steps; None when there were
        none (the first step)."""
        if self._compared is None:
            return None
        compared = int(self._compared.item())
        if compared == 0:
            return None
        return int(self._agree.item()) / compared

    def learning_rate_mask(self, p: torch.Tensor) -> torch.Tensor:
        """The per-element rates of parameter `p` (fp32, before the scheduler factor)."""
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        codes = self.state[p].get("lr_code") if p in self.state else None
        if codes is None:
            return torch.full(p.shape, self._grid(group)[0], dtype=torch.float32, device=p.device)
        return self._decode(group, codes)

    def mean_learning_rates(self) -> list[float]:
        """Per param group: the mean effective learning rate (mask x scheduler factor) over all its
        elements; tensors not stepped yet count at their starting rate."""
        out = []
        for group in self.param_groups:
            anchor = self._grid(group)[0]
            fresh, count, sums = 0, 0, []
            for p in group["params"]:
                count += p.numel()
                codes = self.state[p].get("lr_code") if p in self.state else None
                if codes is None:
                    fresh += p.numel()
                else:  # summed on the device; one transfer per group, not one per tensor
                    sums.append(self._decode(group, codes).sum(dtype=torch.float64))
            stepped = float(torch.stack([s.to(sums[0].device) for s in sums]).sum()) if sums else 0.0
            total = anchor * fresh + stepped
            out.append(total / count * self._scale(group) if count else 0.0)
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out[_RNG_KEY] = {device: gen.get_state() for device, gen in self._generators.items()}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader casts every tensor of the state to the parameter's dtype (int codes to
        float, fp32 statistics to bf16): put back the saved tensors as saved, only moved."""
        state_dict = dict(state_dict)
        rng = state_dict.pop(_RNG_KEY, {})
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params))
        for pid, saved in state_dict["state"].items():
            p = by_id.get(pid)
            if p is None:
                continue
            self.state[p] = {
                k: v.to(device=p.device, copy=True) if isinstance(v, torch.Tensor) else v
                for k, v in saved.items()
            }
        self._generators = {}
        for device, gen_state in rng.items():
            try:
                gen = torch.Generator(device=device)
            except RuntimeError:  # saved on a device this machine lacks: that stream restarts
                logger.warning("automagic: no %s here; its rounding generator starts afresh", device)
                continue
            gen.set_state(gen_state.clone())
            self._generators[device] = gen
        self._agree = self._compared = None


def _check_group(group: dict[str, Any], index: int) -> None:
    """Refuse settings the update cannot work with; the message names the option."""
    where = f"automagic param group {index}"
    checks = [
        ("lr", group["lr"] > 0, "must be > 0"),
        ("min_lr", group["min_lr"] >= 0, "must be >= 0"),
        ("max_lr", group["max_lr"] >= group["min_lr"], "must be >= min_lr"),
        ("lr_bump", group["lr_bump"] >= 0, "must be >= 0"),
        ("beta2", 0 <= group["beta2"] < 1, "must be in [0, 1)"),
        ("clip_threshold", group["clip_threshold"] > 0, "must be > 0"),
        ("weight_decay", group["weight_decay"] >= 0, "must be >= 0"),
        ("eps", group["eps"] > 0, "must be > 0"),
    ]
    for key, ok, rule in checks:
        if not ok:
            raise ValueError(f"{where}: {key} {group[key]!r} {rule}")
