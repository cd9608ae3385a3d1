"""model.quantize / quantize_te during set-up, with the accuracy-recovery adapter of
"qtype|<LoRA file>" (aitk.models.recovery): what each placed part is quantized with.

Placement (aitk.trainer.placing) quantizes piece by piece on the way to the device; this module
says how: the layers the recovery adapter covers in the qtype, the others in uint8, then the
adapter is added frozen on the quantized denoiser, before any block is offloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from aitk.config.schema import ModelConfig
from aitk.models.base import ModelAdapter
from aitk.models.placement import Quantizer
from aitk.trainer.errors import TrainingAborted
from aitk.trainer.placing import EXPERT_PREFIX


def _relative(names: set[str], prefix: str) -> set[str]:
    """Qualified names under `prefix`, relative to it ("" for the prefix itself)."""
    if not prefix:
        return set(names)
    inner = {n[len(prefix) + 1:] for n in names if n.startswith(prefix + ".")}
    return inner | ({""} if prefix in names else set())


class BaseQuantization:
    """The quantizers and the recovery adapter of one run's set-up, and the log lines about them."""

    def __init__(
        self, adapter: ModelAdapter, model_cfg: ModelConfig, *, has_network: bool,
        job_path: Path | None, log: Callable[[str], None],
    ) -> None:
        from aitk.hub_files import use_job_token
        from aitk.models.quantize import check_qtype, split_qtype
        from aitk.models.recovery import read_recovery_file

        self.adapter = adapter
        self.model_cfg = model_cfg
        self.log = log
        self.qtype = model_cfg.qtype
        self.te_qtype = (model_cfg.model_extra or {}).get("qtype_te") or self.qtype
        self.qname, self.reference = split_qtype(self.qtype)
        self.naming = {"key_for": adapter.lora_key_stem, "diffusers_prefix": adapter.diffusers_lora_prefix}
        self.recovery: Any = None
        self.counts: dict[str, list[int]] = {}  # part -> [in the qtype, uncovered in uint8]
        if model_cfg.quantize:
            check_qtype(self.qtype)
            if self.reference:
                if not has_network:
                    raise TrainingAborted(
                        f"model.qtype: the accuracy recovery adapter {self.reference!r} sits under a trained "
                        "network; a full fine-tune (no network: section) cannot train a quantized model - "
                        "add a network: section or set model.quantize: false"
                    )
                use_job_token(job_path)
                self.recovery = read_recovery_file(self.reference, log=log)
        # a reference without model.quantize is a job-file warning (aitk.config.support)
        if model_cfg.quantize_te:
            check_qtype(self.te_qtype)

    def quantizer(self, part: str, module: nn.Module) -> Quantizer | None:
        from aitk.models.quantize import quantize_with_report

        if part.startswith(EXPERT_PREFIX):
            if not self.model_cfg.quantize:
                return None
            qtype = self.qtype
            covered = self._covered(module)
        elif part in self.adapter.text_encoder_names and self.model_cfg.quantize_te:
            qtype, covered = self.te_qtype, None
        else:
            return None
        counts = self.counts.setdefault(part, [0, 0])

        def quantize(piece: nn.Module, prefix: str) -> int:
            inner = _relative(covered, prefix) if covered is not None else None
            report = quantize_with_report(piece, qtype, covered=inner)
            counts[0] += report.quantized
            counts[1] += report.uncovered
            return report.quantized + report.uncovered

        return quantize

    def _covered(self, module: nn.Module) -> set[str] | None:
        from aitk.models.recovery import recovery_targets

        if self.recovery is None:
            return None
        return set(recovery_targets(module, self.recovery, **self.naming))

    def after_quantize(self, part: str, module: nn.Module) -> None:
        """Add the recovery adapter, frozen, on a quantized denoiser."""
        from aitk.models.recovery import attach_recovery_adapter

        self.log_part(part)
        if self.recovery is None:
            return
        handles = attach_recovery_adapter(module, self.recovery, **self.naming)
        layers = sum(len(h.wrapped_module_names()) for h in handles)
        ranks = sorted({h.linear_rank for h in handles})
        self.log(
            f"accuracy recovery adapter{self._which(part)}: {self.reference} on {layers} layers "
            f"(rank {'/'.join(map(str, ranks))}), frozen, active in training and previews, not saved"
        )

    def log_part(self, part: str) -> None:
        from aitk.models.quantize import split_qtype

        if part not in self.counts:
            return
        quantized, uncovered = self.counts[part]
        if part.startswith(EXPERT_PREFIX):
            rest = f", {uncovered} outside the recovery adapter to uint8" if uncovered else ""
            self.log(f"quantized {quantized} linear layers of the base model{self._which(part)} to {self.qname}{rest}")
        else:
            self.log(f"quantized {quantized} linear layers of {part} to {split_qtype(self.te_qtype)[0]}")

    @staticmethod
    def _which(part: str) -> str:
        name = part.removeprefix(EXPERT_PREFIX)
        return "" if name == "main" else f" ({name})"
