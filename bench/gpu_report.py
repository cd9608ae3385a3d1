"""Results of bench/gpu.py: one record per case, written as JSON and as a Markdown table.

Both files are rewritten after every case (to a temporary name, then renamed), so whatever
happens later (a crash, the machine's time limit) the outputs hold every case so far.
No torch import here.

Model FLOPs utilisation (MFU) = model FLOPs of one step / seconds per step / measured matmul
peak. Model FLOPs are those of the step without gradient checkpointing (counted with
torch.utils.flop_counter's formulas on this run's step of the model without checkpointing, else
the plan's count of that step); HFU counts what the case's own step computed, recomputation
included.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

JSON_NAME = "gpu_bench.json"
MARKDOWN_NAME = "gpu_bench.md"
GIB = 2**30


@dataclass
class CaseRecord:
    case: str
    model: str
    setting: str
    status: str = "not run"  # ok | OOM | timeout | error | skipped | not run
    note: str = ""
    bucket: str = ""
    seconds_per_step: float | None = None
    step_seconds: list[float] = field(default_factory=list)
    warmup_seconds: list[float] = field(default_factory=list)
    setup_seconds: float | None = None
    case_seconds: float | None = None
    flops_counted: int | None = None  # first warm-up step, torch's flop formulas (recomputation included)
    gradient_checkpointing: bool = False
    peak_allocated: int | None = None  # torch.cuda.max_memory_allocated over the steps, minus baseline
    peak_setup_allocated: int | None = None
    peak_reserved: int | None = None
    baseline_allocated: int | None = None
    placed_weights_peak: int | None = None  # the placement's DeviceLedger peak
    trainable_parameters: int | None = None
    text_tokens: int | None = None
    loss: float | None = None
    expert_swaps: int = 0
    expert_swap_seconds: float = 0.0
    plan: dict[str, Any] | None = None
    mfu: float | None = None
    hfu: float | None = None
    log: list[str] = field(default_factory=list)
    error_detail: str = ""


def model_flops(records: list[CaseRecord], model: str, planned: dict[str, int] | None = None) -> tuple[int | None, str]:
    """(FLOPs of one step of `model` without checkpointing, where the figure came from):
    counted on a case without checkpointing, else such a case's plan, else `planned[model]`
    (a plan made for the FLOPs alone when no such case was chosen)."""
    for record in records:
        if record.model == model and not record.gradient_checkpointing and record.flops_counted:
            return record.flops_counted, f"counted on {record.case}"
    for record in records:
        plan = record.plan or {}
        if record.model == model and not record.gradient_checkpointing and plan.get("flops_per_step"):
            return int(plan["flops_per_step"]), f"plan of {record.case}"
    if planned and planned.get(model):
        return int(planned[model]), f"plan of {model}/bf16 (not run)"
    return None, "none: no step without checkpointing ran or was planned"


def fill_utilisation(records: list[CaseRecord], peak_flops: float | None,
                     planned: dict[str, int] | None = None) -> dict[str, str]:
    """Set mfu / hfu of every record; returns model -> where its model FLOPs came from."""
    sources: dict[str, str] = {}
    for model in dict.fromkeys(r.model for r in records):
        flops, sources[model] = model_flops(records, model, planned)
        for record in (r for r in records if r.model == model):
            seconds = record.seconds_per_step
            usable = bool(seconds and peak_flops)
            record.mfu = flops / seconds / peak_flops if usable and flops else None
            record.hfu = record.flops_counted / seconds / peak_flops if usable and record.flops_counted else None
    return sources


def _gib(value: int | float | None) -> str:
    """GiB with one decimal; smaller figures (tiny models) in MiB, so they never read 0.0."""
    if value is None:
        return ""
    return f"{value / GIB:.1f}" if abs(value) >= 0.1 * GIB else f"{value / 2**20:.2f} MiB"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _ratio(plan: dict[str, Any] | None, measured: int | None) -> str:
    if not plan or not plan.get("step_total") or not measured:
        return ""
    return f"{plan['step_total'] / measured:.2f}"


def markdown(meta: dict[str, Any], records: list[CaseRecord]) -> str:
    peak = meta.get("matmul_peak_flops")
    lines = [
        "# aitk GPU benchmark: LoRA training steps at real size",
        "",
        f"- device: {meta.get('gpu') or meta.get('device', '?')}"
        + (f" ({meta['gpu_memory_bytes'] / GIB:.0f} GiB)" if meta.get("gpu_memory_bytes") else ""),
        f"- torch {meta.get('torch', '?')}, CUDA {meta.get('cuda') or 'none'}, diffusers {meta.get('diffusers', '?')}, "
        f"peft {meta.get('peft', '?')}, torchao {meta.get('torchao', 'not installed')}",
        f"- measured {meta.get('matmul_dtype', 'bf16')} matmul peak: "
        + (f"{peak / 1e12:.3g} TFLOP/s ({meta.get('matmul_size')}^3)" if peak else "not measured"),
        f"- started {meta.get('started', '?')}, took {meta.get('seconds', 0):.0f} s of a {meta.get('max_seconds', 0):.0f} s budget"
        + (f"; {meta['mode']}" if meta.get("mode") else ""),
        "- random-init models from the public configs in aitk/plan/configs/ (no download), LoRA rank 16, "
        "AdamW, bf16, batch 1, at each preset's largest bucket",
        "- text encoders and the VAE do not run: prompt embeddings are random tensors of the real shape "
        "and latents random (as if cached), which is what a step with both caches on computes",
        "- s/step: median of the timed steps (after warm-up), between CUDA synchronizations; peak: "
        "torch.cuda.max_memory_allocated over the steps, above what was allocated before the case; "
        "plan: `aitk.plan` training-step estimate of the same job",
        "- MFU: model FLOPs (one step without checkpointing, counted with torch.utils.flop_counter's "
        "formulas) / s per step / measured peak; HFU: the case's own counted FLOPs (recomputation included)",
    ]
    for model, source in meta.get("model_flops_source", {}).items():
        lines.append(f"- model FLOPs of {model}: {source}")
    for note in meta.get("notes", []):
        lines.append(f"- note: {note}")
    lines += [
        "",
        "| case | bucket | status | s/step | MFU | HFU | peak GiB | plan GiB | plan/peak | set-up s | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        plan = r.plan or {}
        plan_cell = _gib(plan.get("step_total")) if "step_total" in plan else ("plan failed" if plan.get("error") else "")
        notes = [r.note] if r.note else []
        if r.expert_swaps:
            notes.append(f"{r.expert_swaps} expert swaps, {r.expert_swap_seconds / r.expert_swaps:.2f} s each")
        if plan.get("error"):
            notes.append(f"plan: {plan['error']}")
        planned_flops = plan.get("flops_per_step")
        if r.flops_counted and planned_flops and abs(planned_flops / r.flops_counted - 1) > 0.01:
            # the plan traces this very step: a difference is an op one of the two counts differently
            notes.append(f"plan FLOPs x{planned_flops / r.flops_counted:.2f} of counted")
        cells = [
            r.case, r.bucket, r.status, _seconds(r.seconds_per_step), _percent(r.mfu), _percent(r.hfu),
            _gib(r.peak_allocated), plan_cell, _ratio(plan, r.peak_allocated), _seconds(r.setup_seconds),
            "; ".join(notes).replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if meta.get("error"):
        lines += ["", f"**The run stopped early:** {meta['error']}"]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_outputs(out_dir: Path, meta: dict[str, Any], records: list[CaseRecord]) -> tuple[Path, Path]:
    """Write gpu_bench.json and gpu_bench.md into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    meta["model_flops_source"] = fill_utilisation(records, meta.get("matmul_peak_flops"), meta.get("planned_model_flops"))
    data = {"meta": meta, "cases": [asdict(r) for r in records]}
    json_path, md_path = out_dir / JSON_NAME, out_dir / MARKDOWN_NAME
    _write_atomic(json_path, json.dumps(data, indent=2, default=str) + "\n")
    _write_atomic(md_path, markdown(meta, records))
    return json_path, md_path
