"""Optimizers, learning-rate schedulers and the EMA of the trained network.

Nothing heavy is imported here: each optimizer's library is imported only when it is chosen.
"""

from aitk.optim.ema import NetworkEMA
from aitk.optim.factory import (
    EXPERT_OPTIMIZER_KEYS,
    OPTIMIZER_NAMES,
    SCHEDULER_NAMES,
    OptimizerConfigError,
    build_lr_scheduler,
    build_optimizer,
    check_optimizer_params,
    check_scheduler_params,
    split_optimizer_params,
)

__all__ = [
    "EXPERT_OPTIMIZER_KEYS",
    "OPTIMIZER_NAMES",
    "SCHEDULER_NAMES",
    "NetworkEMA",
    "OptimizerConfigError",
    "build_lr_scheduler",
    "build_optimizer",
    "check_optimizer_params",
    "check_scheduler_params",
    "split_optimizer_params",
]
