"""plan_job: a job file -> MemoryPlan (build the model on fake tensors, trace one step, account)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aitk.config.schema import JobFile, ModelConfig, ProcessConfig
from aitk.plan.errors import PlanInputError
from aitk.plan.report import MemoryPlan
from aitk.plan.settings import PlanSettings, largest_bucket, settings_from_process
from aitk.plan.sources import ModelSpec, model_spec

def _load_job(job: str | Path | JobFile) -> tuple[JobFile, str]:
    if isinstance(job, JobFile):
        return job, job.config.name
    from aitk.config.loader import JobFileError, load_job_file

    path = Path(job)
    if not path.is_file():
        raise PlanInputError(f"{path}: no such job file; give the path of a job file (YAML, JSON or JSONC)")
    try:
        loaded = load_job_file(path)
    except JobFileError as exc:
        raise PlanInputError(str(exc)) from None
    return loaded.job, str(path)


def _check_arch(settings: PlanSettings) -> None:
    from aitk.models.archs import ADAPTERS, UNSUPPORTED_ARCH_LABELS, supported_archs

    if settings.arch in ADAPTERS:
        return
    label = UNSUPPORTED_ARCH_LABELS.get(settings.arch, settings.arch)
    raise PlanInputError(
        f"model.arch {settings.arch!r} ({label}) is not supported by this version, so there is nothing to "
        f"plan; supported: {', '.join(supported_archs())}"
    )


def _tokenizer_lengths(name_or_path: str) -> dict[str, int]:
    """model_max_length of a local folder's tokenizers (the tiny test models use short ones)."""
    folder = Path(name_or_path).expanduser()
    lengths: dict[str, int] = {}
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        config = folder / name / "tokenizer_config.json"
        if config.is_file():
            try:
                value = json.loads(config.read_text()).get("model_max_length")
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(value, int) and value < 10**6:
                lengths[name] = value
    return lengths


class Planner:
    """Plans one process entry; `evaluate` re-traces only when a setting the step depends on changes."""

    def __init__(self, job_name: str, process: ProcessConfig) -> None:
        self.job_name = job_name
        self.process = process
        self.settings = settings_from_process(process)
        _check_arch(self.settings)
        self.spec: ModelSpec = model_spec(self.settings.name_or_path, self.settings.arch, self.settings.model_kwargs)
        self.tokenizer_lengths = _tokenizer_lengths(self.settings.name_or_path)
        self._traces: dict[tuple, Any] = {}

    def evaluate(self, settings: PlanSettings) -> MemoryPlan:
        from aitk.plan.budget import account
        from aitk.plan.optimizer_state import total_state_bytes

        model, trace, size = self._trace(settings)
        trainable = sum(p.numel() * p.element_size() for p in model.trainable)
        shapes = [(tuple(p.shape), p.element_size()) for p in model.trainable]
        momentum = float(self.process.train.optimizer_params.get("momentum", 0) or 0)
        optimizer = total_state_bytes(settings.optimizer, shapes, momentum)
        if settings.ema:
            optimizer += sum(p.numel() * 4 for p in model.trainable)  # NetworkEMA: an fp32 copy
        budget = account(settings, model.sizes, model.expert_parts, model.traced_part, trainable, optimizer, trace)
        return MemoryPlan(
            job=self.job_name,
            model=self.spec.label,
            arch=settings.arch,
            origin=self.spec.origin,
            setup=self._describe(settings, size, model),
            step=budget.step,
            phases=budget.phases,
            weights_by_part=budget.weights_by_part,
            host=budget.host,
            flops_per_step=trace.flops,
            trainable_parameters=sum(p.numel() for p in model.trainable),
            notes=self._notes(settings),
        )

    def _trace(self, settings: PlanSettings) -> tuple[Any, Any, tuple[int, int]]:
        from aitk.models.archs import data_facts

        size = largest_bucket(settings, data_facts(settings.arch)[0])
        key = (settings.quantize, settings.qtype, settings.quantize_te, settings.qtype_te,
               settings.gradient_checkpointing, settings.batch_size, size, settings.frames, settings.dtype)
        if key not in self._traces:
            self._traces[key] = self._run_trace(settings, size)
        model, trace = self._traces[key]
        return model, trace, size

    def _run_trace(self, settings: PlanSettings, size: tuple[int, int]) -> tuple[Any, Any]:
        from torch._subclasses.fake_tensor import (
            DataDependentOutputException,
            DynamicOutputShapeException,
            FakeTensorMode,
        )

        from aitk.plan.model import build_fake_model
        from aitk.plan.step import trace_step

        fake_mode = FakeTensorMode()
        model_cfg = self._model_config(settings)
        model = build_fake_model(settings, self.spec, model_cfg, fake_mode, self.tokenizer_lengths)
        adapter = model.adapter
        expert = model.trained[0]

        def inputs() -> Any:
            return adapter.example_batch(
                settings.batch_size, size, settings.frames, expert=expert, with_controls=adapter.uses_controls
            )

        try:
            trace = trace_step(adapter, model.denoisers[model.traced_part], inputs, fake_mode)
        except PlanInputError:
            raise
        except (DynamicOutputShapeException, DataDependentOutputException) as exc:
            # fake tensors have no values: a step whose shapes follow the data (mixture-of-experts
            # routing, token counts read from a mask) has no size before it runs
            raise PlanInputError(
                f"{self.spec.label} cannot be planned ahead: its training step has shapes that depend on "
                f"the data ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}), which a "
                "model without weights cannot know; start with the settings of the family's example job "
                "file (docs/models.md) and watch the memory line of the first steps"
            ) from exc
        except Exception as exc:  # an op fake tensors cannot run: say which, never a traceback
            raise PlanInputError(
                f"the training step of {self.spec.label} could not be traced on fake tensors "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); please report this "
                "with the job file"
            ) from exc
        return model, trace

    def _model_config(self, settings: PlanSettings) -> ModelConfig:
        return self.process.model.model_copy(update={"quantize": settings.quantize, "qtype": settings.qtype})

    @staticmethod
    def _describe(settings: PlanSettings, size: tuple[int, int], model: Any) -> dict[str, Any]:
        net = settings.network
        network = "full fine-tune" if net is None else (
            f"{net.type} rank {net.linear_rank}" + (f", conv {net.conv_rank}" if net.conv_rank else "")
        )
        out: dict[str, Any] = {
            "bucket": f"{size[0]}x{size[1]}" + (f"x{settings.frames} frames" if settings.frames > 1 else ""),
            "batch": settings.batch_size,
            "dtype": settings.dtype,
            "quantize": settings.quantized_qtype if settings.quantize else "no",
            "network": network,
            "optimizer": settings.optimizer + (" + EMA" if settings.ema else ""),
            "gradient checkpointing": "on" if settings.gradient_checkpointing else "off",
        }
        if settings.layer_offloading:
            out["layer offloading"] = f"{settings.offload_transformer_percent:.0%} of blocks"
        if settings.low_vram:
            out["low_vram"] = "on"
        if len(model.expert_parts) > 1:
            out["traced expert"] = model.trained[0]
        return out

    @staticmethod
    def _notes(settings: PlanSettings) -> list[str]:
        notes = []
        if settings.quantize and settings.recovery_adapter:
            notes.append(
                f"the accuracy-recovery adapter {settings.recovery_adapter!r} is not counted; every Linear is "
                f"planned in {settings.quantized_qtype}"
            )
        if settings.quantize:
            notes.append(
                "torchao's weight-only linears save their dequantized weight for backward: without gradient "
                "checkpointing the activations hold a full-precision copy of every quantized layer"
                if not settings.gradient_checkpointing else
                "torchao's weight-only linears save their dequantized weight for backward (one block at a time "
                "with gradient checkpointing)"
            )
        return notes


def plan_job(
    job: str | Path | JobFile, gpu_memory: int | None = None, *, process_index: int = 0
) -> MemoryPlan:
    """The memory plan of one process entry of a job (a path or a loaded JobFile).

    With `gpu_memory` (bytes) the plan says whether it fits and, if not, the cheapest settings
    that do (MemoryPlan.suggestion: dotted job keys -> values). Raises PlanInputError with a
    user-facing message for a missing or broken job, model folder or config.
    """
    job_file, name = _load_job(job)
    processes = job_file.config.process
    if not 0 <= process_index < len(processes):
        raise PlanInputError(f"process {process_index}: the job has {len(processes)} process entries")
    planner = Planner(name, processes[process_index])
    plan = planner.evaluate(planner.settings)
    if gpu_memory is not None:
        plan.gpu_memory = gpu_memory
        if not plan.fits:
            from aitk.plan.advise import cheapest_fit

            found = cheapest_fit(planner, gpu_memory)
            if found is None:
                plan.suggestion_note = (
                    "no combination of quantization, offloading, checkpointing, batch 1 and smaller "
                    "resolutions fits; a larger GPU is needed"
                )
            else:
                plan.suggestion, plan.suggestion_peak = found
    return plan
