"""Alpha scheduling: phases of LoRA alpha driven by loss-trend and gradient-stability statistics.

- stats.py: the loss window (OLS slope, R², CV) and the gradient-stability EMA.
- alpha.py: AlphaScheduler (phases per expert, the transition rule, state for checkpoints).
- replay.py: `aitk schedule replay`, the same rule over a logged metrics file.
"""

from aitk.schedule.alpha import AlphaScheduler, Check, Phase, Transition
from aitk.schedule.stats import LossWindow, StabilityEMA, ols_slope_r2

__all__ = ["AlphaScheduler", "Check", "LossWindow", "Phase", "StabilityEMA", "Transition", "ols_slope_r2"]
