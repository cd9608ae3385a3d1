"""The alpha schedule's start-up warnings, worked out from the job file alone.

The trainer says these once the networks are built (aitk/trainer/health.py); `aitk validate` must
say them before any model loads, so here what the built network would show (conv layers wrapped
or not, which experts train) comes from the architecture's facts in aitk/models/archs.py.
"""

from __future__ import annotations

from aitk.config.schema import JobFile, ProcessConfig
from aitk.config.support import render_path
from aitk.models.archs import CONV_ARCHS, EXPERT_ARCHS


def trained_experts(process: ProcessConfig) -> list[str] | None:
    """The experts the job trains (None for a one-network model), as the WAN adapter decides."""
    names = EXPERT_ARCHS.get(process.model.resolved_arch)
    if names is None:
        return None
    kwargs = process.model.model_kwargs
    return [name for name in names if kwargs.get(f"train_{name}", True) is not False]


def wraps_conv_layers(process: ProcessConfig) -> bool:
    """Whether the network will wrap conv layers: network.conv is set and the model has convs."""
    network = process.network
    return network is not None and network.conv_rank is not None and process.model.resolved_arch in CONV_ARCHS


def alpha_schedule_warnings(job: JobFile) -> list[str]:
    """The warnings the run's alpha scheduler gives at start, one per line, prefixed with the
    schedule's key path (config.process[i].network.alpha_schedule: ...)."""
    from aitk.schedule.alpha import AlphaScheduler

    out: list[str] = []
    for index, process in enumerate(job.config.process):
        experts = trained_experts(process)
        try:
            scheduler = AlphaScheduler.from_config(process.network, experts)
        except ValueError:
            continue  # a schedule the loader already refused has its own error
        if scheduler is None:
            continue
        where = render_path(("config", "process", index, "network", "alpha_schedule"))
        for warning in scheduler.startup_warnings(has_conv=wraps_conv_layers(process), has_linear=True):
            out.append(f"{where}: {warning}")
    return out
