"""MemoryPlan: what a plan found, as text, one line, or a JSON-ready dict. No torch import."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 2**30

#: what the plan leaves out, said every time (docs/memory.md explains each)
NOT_COUNTED = (
    "the CUDA context and kernels (about 0.3-1 GiB per process, more with cuDNN / cuBLAS workspaces)",
    "allocator caching and fragmentation (PyTorch's caching allocator reserves more than it allocates)",
    "kernel-specific attention workspace: the step is traced with the CPU's flash attention, whose "
    "saved tensors match CUDA's flash / memory-efficient kernels but whose scratch space is not theirs",
    "the optimizer step's temporaries (torch's foreach AdamW allocates about one extra copy of the "
    "trainable parameters for an instant) and gradient clipping's norms",
    "activations of the text encoders and VAE while they encode (weights are counted in their phases)",
    "an accuracy-recovery adapter's own weights (model.qtype \"...|<file>\"), previews, and data loading",
)


def parse_size(text: str) -> int:
    """'24GB', '24 GiB', '24g', '16000MB' -> bytes. GB means GiB here: a card sold as 24 GB has 24 GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a memory size; write e.g. 24GB, 24GiB or 16000MB")
    number, unit = float(match.group(1)), match.group(2) or "g"
    return int(number * {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit])


def gib(n: int | float) -> str:
    return f"{n / GIB:.1f} GiB" if abs(n) >= 0.1 * GIB else f"{n / 2**20:.0f} MiB"


@dataclass
class DeviceSplit:
    """Device bytes at the training step's peak, by what they hold."""

    weights: int  # frozen weights on the device (denoiser resident part, encoders when resident)
    trainable: int  # the network (or the model in a full fine-tune)
    optimizer: int  # optimizer state (+ the EMA copy)
    gradients: int
    activations: int  # saved for backward
    workspace: int  # made in backward: gradients of activations, recomputation, temporaries

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.optimizer + self.gradients + self.activations + self.workspace


@dataclass
class MemoryPlan:
    job: str
    model: str  # label, e.g. "FLUX.1 dev"
    arch: str
    origin: str  # where the configs came from
    setup: dict[str, Any]  # the settings the plan used (dtype, bucket, network, ...)
    step: DeviceSplit
    phases: dict[str, int]  # peak device bytes per phase: training step, text encoding, latent caching
    weights_by_part: dict[str, int]  # device bytes of frozen weights during the step, per part
    host: dict[str, int]  # peak host bytes by what they hold
    flops_per_step: int
    trainable_parameters: int
    gpu_memory: int | None = None
    suggestion: dict[str, Any] | None = None  # job keys -> values that make it fit
    suggestion_peak: int | None = None
    suggestion_note: str | None = None
    notes: list[str] = field(default_factory=list)
    not_counted: list[str] = field(default_factory=lambda: list(NOT_COUNTED))

    @property
    def peak_device(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k])

    @property
    def peak_host(self) -> int:
        return max(self.host.get("set-up", 0), sum(v for k, v in self.host.items() if k != "set-up"))

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.peak_device <= self.gpu_memory

    def one_line(self) -> str:
        """E.g. 'plan: 18.3 GiB device peak (training step), 33.0 GiB host; fits in 24.0 GiB'."""
        line = (
            f"plan: {gib(self.peak_device)} device peak ({self.peak_phase}), {gib(self.peak_host)} host, "
            f"{self.flops_per_step / 1e12:.1f} TFLOP per step"
        )
        if self.gpu_memory is not None:
            line += f"; {'fits in' if self.fits else 'does NOT fit in'} {gib(self.gpu_memory)}"
        return line

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["step"]["total"] = self.step.total
        data.update(peak_device=self.peak_device, peak_phase=self.peak_phase, peak_host=self.peak_host, fits=self.fits)
        return data

    def render(self) -> str:
        s = self.setup
        out = [f"{self.job}: {self.model} (model.arch {self.arch}), from {self.origin}"]
        out.append("  step: " + ", ".join(f"{k} {v}" for k, v in s.items()))
        out.append(f"  device peak: {gib(self.peak_device)} ({self.peak_phase})")
        split = self.step
        parts = ", ".join(f"{k} {gib(v)}" for k, v in self.weights_by_part.items() if v)
        rows = [
            ("weights", split.weights, parts),
            ("trainable + optimizer", split.trainable + split.optimizer,
             f"{self.trainable_parameters:,} parameters {gib(split.trainable)}, state {gib(split.optimizer)}"),
            ("gradients", split.gradients, ""),
            ("activations", split.activations, "saved for backward"),
            ("workspace", split.workspace, "backward temporaries, recomputation"),
        ]
        out.append(f"  training step: {gib(split.total)}")
        for name, value, detail in rows:
            out.append(f"    {name:<22}{gib(value):>11}" + (f"   ({detail})" if detail else ""))
        others = [f"{k} {gib(v)}" for k, v in self.phases.items() if k != "training step"]
        if others:
            out.append("  other phases: " + ", ".join(others))
        host = ", ".join(f"{k} {gib(v)}" for k, v in self.host.items() if v)
        out.append(f"  host peak: {gib(self.peak_host)}" + (f" ({host})" if host else ""))
        out.append(f"  compute: {self.flops_per_step / 1e12:.2f} TFLOP per step (forward + backward)")
        for note in self.notes:
            out.append(f"  note: {note}")
        if self.gpu_memory is not None:
            if self.fits:
                out.append(f"  fits in {gib(self.gpu_memory)}: yes, {gib(self.gpu_memory - self.peak_device)} to spare")
            else:
                out.append(f"  fits in {gib(self.gpu_memory)}: NO, {gib(self.peak_device - self.gpu_memory)} short")
                if self.suggestion:
                    out.append(f"  cheapest settings that fit ({gib(self.suggestion_peak or 0)} peak); change in the job:")
                    out.extend("    " + line for line in suggestion_yaml(self.suggestion).splitlines())
                elif self.suggestion_note:
                    out.append(f"  {self.suggestion_note}")
        out.append("  not counted:")
        out.extend(f"    - {item}" for item in self.not_counted)
        return "\n".join(out)


def suggestion_yaml(changes: dict[str, Any]) -> str:
    """Dotted job keys (model.quantize, train.batch_size, datasets.resolution) as a nested YAML snippet."""
    import yaml

    tree: dict[str, Any] = {}
    for dotted, value in changes.items():
        node = tree
        *heads, last = dotted.split(".")
        for head in heads:
            node = node.setdefault(head, {})
        node[last] = value
    if "datasets" in tree:  # a list in the job: the same change applies to every entry
        tree["datasets"] = [tree["datasets"]]
    text = yaml.safe_dump(tree, sort_keys=False, default_flow_style=None).rstrip()
    return text + ("\n# datasets: apply to every dataset entry" if "datasets" in tree else "")
