"""Loss-trend and gradient-stability statistics for alpha scheduling (spec: alpha-schedule.md).

Everything here is plain Python floats in and out (never NaN, never a numpy scalar), so the values
can go straight into the metrics JSONL and the scheduler's JSON state.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

WINDOW_SIZE = 200      # losses of the current phase the trend is fitted over
CV_SIZE = 50           # most recent losses the coefficient of variation is taken over
MIN_TREND_SAMPLES = 20  # below this a slope / R² / CV is noise, so it is reported as undefined
STABILITY_SPAN = 50    # EMA span of the gradient stability


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def ols_slope_r2(steps: Sequence[float], losses: Sequence[float]) -> tuple[float | None, float | None]:
    """Ordinary least squares of loss against step: (slope per step, R²).

    (None, None) below MIN_TREND_SAMPLES samples or when every sample has the same step (no x
    spread, no slope). Constant losses give (0.0, 0.0): there is no trend to explain, and 0 (not
    NaN) keeps the value JSON-safe and makes an R² threshold fail rather than pass by accident.
    """
    n = len(losses)
    if n < MIN_TREND_SAMPLES or len(steps) != n:
        return None, None
    y = np.asarray(losses, dtype=np.float64)
    x = np.asarray(steps, dtype=np.float64)
    if float(np.ptp(y)) == 0.0:
        # Exact check first: centring a constant series can leave 1e-17 residue that would give
        # an arbitrary R² from rounding noise.
        return (0.0, 0.0) if float(np.ptp(x)) > 0.0 else (None, None)
    dx = x - x.mean()  # centred sums: steps in the 10^5 range would lose digits otherwise
    dy = y - y.mean()
    sxx = float(dx @ dx)
    if sxx == 0.0:
        return None, None
    sxy = float(dx @ dy)
    syy = float(dy @ dy)
    slope = sxy / sxx
    r2 = (sxy * sxy) / (sxx * syy) if syy > 0.0 else 0.0
    return float(slope), float(min(1.0, max(0.0, r2)))


def coefficient_of_variation(losses: Sequence[float]) -> float | None:
    """Population std / |mean|; None below MIN_TREND_SAMPLES samples or for a zero mean."""
    if len(losses) < MIN_TREND_SAMPLES:
        return None
    y = np.asarray(losses, dtype=np.float64)
    if float(np.ptp(y)) == 0.0:
        return 0.0
    mean = abs(float(y.mean()))
    if mean == 0.0:
        return None
    return float(y.std()) / mean


class LossWindow:
    """The last WINDOW_SIZE finite losses of one expert's current phase, with their steps.

    Statistics are cached until the next add/reset: the trainer asks for them twice per step (the
    transition rule and the metrics line), and the scheduler state must not depend on how often.
    """

    def __init__(self, size: int = WINDOW_SIZE) -> None:
        self.size = size
        self._steps: deque[int] = deque(maxlen=size)
        self._losses: deque[float] = deque(maxlen=size)
        self._cache: tuple[float | None, float | None, float | None] | None = None

    def add(self, step: int, loss: float) -> bool:
        """Add one loss; a non-finite loss is dropped (it would poison 200 steps of statistics)."""
        if not _finite(loss):
            return False
        self._steps.append(int(step))
        self._losses.append(float(loss))
        self._cache = None
        return True

    def reset(self) -> None:
        self._steps.clear()
        self._losses.clear()
        self._cache = None

    @property
    def samples(self) -> int:
        return len(self._losses)

    @property
    def losses(self) -> list[float]:
        return list(self._losses)

    @property
    def steps(self) -> list[int]:
        return list(self._steps)

    def _stats(self) -> tuple[float | None, float | None, float | None]:
        if self._cache is None:
            slope, r2 = ols_slope_r2(self._steps, self._losses)
            recent = list(self._losses)[-CV_SIZE:]
            self._cache = (slope, r2, coefficient_of_variation(recent))
        return self._cache

    @property
    def slope(self) -> float | None:
        return self._stats()[0]

    @property
    def r2(self) -> float | None:
        return self._stats()[1]

    @property
    def cv(self) -> float | None:
        return self._stats()[2]

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self._steps), "losses": list(self._losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        steps, losses = list(state.get("steps", [])), list(state.get("losses", []))
        if len(steps) != len(losses):
            raise ValueError(f"loss window state has {len(steps)} steps but {len(losses)} losses")
        self.reset()
        for step, loss in zip(steps[-self.size:], losses[-self.size:]):
            self.add(int(step), float(loss))


class StabilityEMA:
    """Exponential moving average of the per-step gradient stability (sign agreement, 0..1).

    alpha = 2 / (span + 1), the usual "span" convention, so span 50 weighs roughly the last 50
    steps. The first sample initialises the average (no bias towards 0 at the start); `value` is
    None until then, which the transition rule treats as "no value exists" and skips.
    None and non-finite samples are ignored: an optimizer step whose stability is unknown says
    nothing about stability.
    """

    def __init__(self, span: int = STABILITY_SPAN) -> None:
        self.span = span
        self.alpha = 2.0 / (span + 1)
        self.value: float | None = None
        self.count = 0
        # The recent raw values, kept for users who read the state file; the EMA alone decides.
        self.history: deque[float] = deque(maxlen=span)

    def update(self, sample: float | None) -> float | None:
        if not _finite(sample):
            return self.value
        sample = float(sample)
        self.value = sample if self.value is None else self.value + self.alpha * (sample - self.value)
        self.count += 1
        self.history.append(sample)
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.value, "count": self.count, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ema = state.get("ema")
        self.value = float(ema) if ema is not None else None
        self.count = int(state.get("count", 0))
        self.history = deque((float(v) for v in state.get("history", [])), maxlen=self.span)
