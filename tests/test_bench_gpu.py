"""bench/gpu.py, the parts that run without a GPU: real-size models on the meta device, random
weights, FLOP counting, the case list and jobs, the per-case bookkeeping (OOM, time limits,
budget), the JSON + Markdown outputs, and a dry run end to end on tiny models on the CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import gpu  # noqa: E402
import gpu_case  # noqa: E402
from gpu_cases import MODELS, QUICK_SETTINGS, SETTINGS, case_list, job_dict, load_job  # noqa: E402
from gpu_models import RandomPool, empty_part, keeps_fp32, module_from_weights, parameter_count, random_weights  # noqa: E402
from gpu_report import JSON_NAME, MARKDOWN_NAME, CaseRecord, write_outputs  # noqa: E402
from gpu_timing import DeviceOps, StepTimes, guarded, time_steps  # noqa: E402

CPU = DeviceOps(torch.device("cpu"))
MODEL = {m.key: m for m in MODELS}


# --- models at real size ----------------------------------------------------------------------
def test_real_size_denoisers_build_on_meta_with_their_known_parameter_counts():
    from aitk.plan.sources import model_spec

    for model in MODELS:
        spec = model_spec(model.hub_id, model.arch)
        for name in spec.denoisers:  # WAN 2.2: both experts
            module = empty_part(spec.parts[name], torch.bfloat16, keeps_fp32(model.arch))
            count = parameter_count(module)
            assert abs(count / model.denoiser_parameters - 1) < 0.02, (model.key, name, count)
            assert all(p.device.type == "meta" for p in module.parameters())  # no memory taken
            dtypes = {p.dtype for p in module.parameters()}
            # WAN keeps its norms and time embedding in fp32, as from_pretrained(torch_dtype) does
            assert dtypes == ({torch.bfloat16, torch.float32} if keeps_fp32(model.arch) else {torch.bfloat16})
    assert len(model_spec(MODEL["wan22"].hub_id, "wan22_14b").denoisers) == 2


def test_random_weights_fill_in_place_and_cases_share_them():
    part = SimpleNamespace(library="diffusers", class_name="FluxTransformer2DModel", config=dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)))
    module = empty_part(part, torch.bfloat16)
    weights = random_weights(module, RandomPool(0, size=4096))
    linear = weights["transformer_blocks.0.attn.to_q.weight"]
    assert linear.device.type == "cpu" and linear.dtype == torch.bfloat16
    assert abs(linear.float().std().item() * math.sqrt(linear.shape[1]) - 1) < 0.15  # N(0, 1/fan_in)
    assert torch.all(weights["transformer_blocks.0.attn.to_q.bias"] == 0)
    assert torch.all(weights["transformer_blocks.0.attn.norm_q.weight"] == 1)
    first = module_from_weights(part, weights, torch.bfloat16)
    second = module_from_weights(part, weights, torch.bfloat16)
    assert first is not second
    assert first.transformer_blocks[0].attn.to_q.weight.data_ptr() == linear.data_ptr()  # shared, no copy
    first.transformer_blocks[0].attn.to_q = nn.Identity()  # a case changing its module ...
    assert second.transformer_blocks[0].attn.to_q.weight.data_ptr() == linear.data_ptr()  # ... leaves the others


# --- FLOP counting ----------------------------------------------------------------------------
def test_flop_count_of_a_step_equals_the_hand_count_and_flop_counter_mode():
    batch, sizes = 4, [(8, 16), (16, 32), (32, 4)]
    layers = [nn.Linear(i, o) for i, o in sizes]
    model = nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2])
    model.requires_grad_(False)
    layers[1].weight.requires_grad_(True)  # the trained layer, as a LoRA is among frozen ones
    x = torch.randn(batch, 8)

    def step(_i: int) -> torch.Tensor:
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    times = time_steps(step, warmup=1, timed=1, ops=CPU)
    forward = sum(2 * batch * i * o for i, o in sizes)
    # backward: the last layer's input gradient (the trained layer needs it), the trained layer's
    # weight gradient; nothing below it (frozen layer, input without grad)
    backward = 2 * batch * 32 * 4 + 2 * batch * 16 * 32
    assert times.flops == forward + backward
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as library:
        step(0)
    assert library.get_total_flops() == times.flops
    assert len(times.warmup) == 1 and len(times.timed) == 1 and times.loss is not None


# --- cases and jobs ---------------------------------------------------------------------------
def test_case_list_covers_every_model_and_setting_and_filters():
    cases = case_list()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)) == 4 * (len(SETTINGS) - 1) + 1
    assert [c.id for c in cases if c.setting.low_vram] == ["wan22/qfloat8+gc+low_vram"]
    assert ids.index("sd15/bf16") < ids.index("sdxl/bf16") < ids.index("flux/bf16") < ids.index("wan22/bf16")
    quick = case_list(quick=True)
    assert {c.setting.key for c in quick} == set(QUICK_SETTINGS) and len(quick) == 3 * 4 + 1
    assert [c.id for c in case_list(only=["flux"])] == [f"flux/{s.key}" for s in SETTINGS if not s.low_vram]
    assert [c.id for c in case_list(only=["wan22/bf16", "sd15"])][-1] == "wan22/bf16"
    with pytest.raises(ValueError, match="flux2"):
        case_list(only=["flux2"])


def test_jobs_are_the_presets_with_the_benchmarks_settings():
    expected = {"sd15": ((512, 512), 1), "sdxl": ((1024, 1024), 1), "flux": ((1024, 1024), 1), "wan22": ((512, 512), 33)}
    for case in case_list():
        process = load_job(job_dict(case, case.model.hub_id)).config.process[0]
        setting = case.setting
        assert process.network.linear_rank == 16 and process.train.optimizer == "adamw"
        assert process.train.dtype == "bf16" and process.train.batch_size == 1
        assert process.model.quantize == setting.quantize and process.model.qtype == "qfloat8"
        assert process.train.gradient_checkpointing == setting.gradient_checkpointing
        assert process.model.low_vram == setting.low_vram
        assert process.model.layer_offloading == (setting.offload_percent is not None)
        if setting.offload_percent is not None:
            assert process.model.layer_offloading_transformer_percent == setting.offload_percent
        assert process.datasets[0].cache_text_embeddings and process.datasets[0].cache_latents_to_disk
    for key, (size, frames) in expected.items():  # the preset's largest bucket, as the plan reads it
        ctx = gpu_case.model_context(case_list(only=[f"{key}/bf16"])[0], MODEL[key].hub_id, tiny=False)
        assert (ctx.size, ctx.frames) == (size, frames)


def test_expert_schedule_trains_each_expert_in_warmup_then_the_first():
    assert gpu_case.expert_schedule([], 2) == (2, [None, None])
    assert gpu_case.expert_schedule(["high_noise", "low_noise"], 1) == (3, ["high_noise", "low_noise", "high_noise"])
    assert gpu_case.expert_schedule(["high_noise", "low_noise"], 4)[1][-1] == "high_noise"


# --- bookkeeping --------------------------------------------------------------------------------
def _counting_step(fail_at: int | None = None, error: BaseException | None = None, sleep: float = 0.0):
    calls: list[int] = []

    def step(i: int) -> torch.Tensor:
        calls.append(i)
        if sleep:
            time.sleep(sleep)
        if fail_at is not None and i == fail_at:
            raise error  # type: ignore[misc]
        return torch.tensor(1.0)

    return step, calls


def test_out_of_memory_is_recorded_and_keeps_what_was_measured():
    step, calls = _counting_step(fail_at=2, error=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    times = StepTimes()
    outcome = guarded(lambda: time_steps(step, warmup=1, timed=5, ops=CPU, times=times), 30, CPU)
    assert outcome.status == "OOM" and "out of memory" in outcome.note
    assert calls == [0, 1, 2] and len(times.warmup) == 1 and len(times.timed) == 1


def test_errors_and_hard_time_limits_become_a_status():
    step, _ = _counting_step(fail_at=0, error=KeyError("no such block"))
    outcome = guarded(lambda: time_steps(step, warmup=1, timed=1, ops=CPU), 30, CPU)
    assert outcome.status == "error" and outcome.note == "KeyError: 'no such block'" and "KeyError" in outcome.detail
    slow, calls = _counting_step(sleep=0.2)
    started = time.monotonic()
    outcome = guarded(lambda: time_steps(slow, warmup=1, timed=50, ops=CPU), 0.5, CPU)
    assert outcome.status == "timeout" and time.monotonic() - started < 2 and len(calls) < 5


def test_soft_deadline_cuts_timed_steps_short_after_the_first():
    slow, calls = _counting_step(sleep=0.05)
    times = time_steps(slow, warmup=1, timed=20, ops=CPU, deadline=time.monotonic() + 0.12)
    assert times.cut_short and 1 <= len(times.timed) < 20 and times.median is not None


def _run(tmp_path: Path, *argv: str) -> gpu.Run:
    run = gpu.Run(gpu.parse_args(["--dry-run", "--out", str(tmp_path), *argv]))
    # the budget counts from the bench's start-up, which for a test is its module's import at
    # collection, possibly many minutes before it runs
    run.budget = gpu.Budget(run.args.max_seconds, started=time.monotonic())
    run.ops = CPU
    run.meta["matmul_peak_flops"] = 1e9
    return run


def test_run_records_each_case_and_continues_after_oom(tmp_path, monkeypatch):
    run = _run(tmp_path, "--only", "sd15/bf16,sd15/qfloat8,sd15/qfloat8+gc")

    def fake_case(case, ctx, ops, dtype, measured, *, warmup, timed, deadline):
        if case.setting.key == "qfloat8":
            measured.setup_seconds = 0.5
            raise torch.OutOfMemoryError("CUDA out of memory")
        measured.setup_seconds = 0.25
        measured.times = StepTimes(warmup=[0.3], timed=[0.1, 0.1, 0.3], flops=4 * 10**8, loss=0.5)
        return measured

    monkeypatch.setattr(gpu_case, "run_case", fake_case)
    for case in run.cases:
        run._run_case(case, None)
    run.write()
    data = json.loads((tmp_path / JSON_NAME).read_text())
    status = {c["case"]: c for c in data["cases"]}
    assert [status[c]["status"] for c in ("sd15/bf16", "sd15/qfloat8", "sd15/qfloat8+gc")] == ["ok", "OOM", "ok"]
    assert status["sd15/bf16"]["seconds_per_step"] == pytest.approx(0.1)
    assert status["sd15/bf16"]["mfu"] == pytest.approx(4.0)  # 4e8 FLOP / 0.1 s / 1e9 FLOP/s
    # with checkpointing: MFU from the model FLOPs of the step without, HFU from its own count
    assert status["sd15/qfloat8+gc"]["mfu"] == pytest.approx(4.0)
    assert status["sd15/qfloat8"]["setup_seconds"] == 0.5 and status["sd15/qfloat8"]["mfu"] is None
    table = (tmp_path / MARKDOWN_NAME).read_text()
    assert "| sd15/qfloat8 |  | OOM |" in table and "| sd15/bf16 |  | ok | 0.100 | 400.0% |" in table


def test_cases_past_the_budget_are_skipped_with_a_note(tmp_path, monkeypatch):
    run = _run(tmp_path, "--only", "sd15/bf16,sd15/qfloat8")
    run.budget = gpu.Budget(total=0.0)
    monkeypatch.setattr(gpu_case, "run_case", lambda *a, **k: pytest.fail("no case may start"))
    for case in run.cases:
        run._run_case(case, None)
    assert {r.status for r in run.records.values()} == {"skipped"}
    assert all("budget" in r.note for r in run.records.values())


def test_outputs_are_written_even_when_the_run_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu.Run, "run", lambda self: (_ for _ in ()).throw(RuntimeError("driver gone")))
    code = gpu.main(["--dry-run", "--only", "sd15", "--out", str(tmp_path)])
    data = json.loads((tmp_path / JSON_NAME).read_text())
    assert code == 1 and data["meta"]["error"] == "RuntimeError: driver gone"
    assert {c["status"] for c in data["cases"]} == {"not run"} and len(data["cases"]) == 5
    assert "stopped early" in (tmp_path / MARKDOWN_NAME).read_text()
    monkeypatch.setattr(gpu, "missing_modules", lambda: ["diffusers", "torchao"])
    assert gpu.main(["--dry-run", "--only", "sd15", "--out", str(tmp_path)]) == 2
    assert "missing Python packages: diffusers, torchao" in json.loads((tmp_path / JSON_NAME).read_text())["meta"]["error"]


def test_report_falls_back_to_the_plans_flops_and_shows_plan_beside_peak(tmp_path):
    records = [
        CaseRecord("wan22/bf16", "wan22", "bf16", status="OOM", plan={"flops_per_step": 6 * 10**14, "step_total": 150 * 2**30}),
        CaseRecord("wan22/qfloat8+gc", "wan22", "qfloat8+gc", status="ok", gradient_checkpointing=True,
                   seconds_per_step=2.0, flops_counted=8 * 10**14, peak_allocated=40 * 2**30,
                   plan={"step_total": 44 * 2**30, "flops_per_step": 8 * 10**14}),
    ]
    write_outputs(tmp_path, {"matmul_peak_flops": 7.5e14, "gpu": "NVIDIA H200"}, records)
    data = json.loads((tmp_path / JSON_NAME).read_text())
    ok = data["cases"][1]
    assert ok["mfu"] == pytest.approx(6e14 / 2.0 / 7.5e14) and ok["hfu"] == pytest.approx(8e14 / 2.0 / 7.5e14)
    assert data["meta"]["model_flops_source"]["wan22"] == "plan of wan22/bf16"
    table = (tmp_path / MARKDOWN_NAME).read_text()
    assert "| wan22/qfloat8+gc |  | ok | 2.000 | 40.0% | 53.3% | 40.0 | 44.0 | 1.10 |" in table
    assert "NVIDIA H200" in table and "750 TFLOP/s" in table


# --- end to end ---------------------------------------------------------------------------------
#: not on the GPU machine (its image has torch, transformers, peft, accelerate; the bench must not
#: need these either)
ABSENT_THERE = ("av", "fastapi", "uvicorn", "sqlalchemy", "bitsandbytes", "prodigyopt", "lion_pytorch")


def test_dry_run_end_to_end_on_tiny_models(tmp_path):
    """The GPU run's code path on the CPU: tiny SD 1.5 with quantization, checkpointing and 50%
    offloading, tiny WAN 2.2 with low_vram (expert swaps), plans inline; modules the GPU
    machine lacks are blocked."""
    blocked = "import sys; sys.modules.update({m: None for m in %r}); " % (ABSENT_THERE,)
    script = (blocked + "import runpy; sys.argv = ['bench/gpu.py'] + sys.argv[1:]; "
              "runpy.run_path('bench/gpu.py', run_name='__main__')")
    argv = ["--dry-run", "--only", "sd15/qfloat8+gc+offload50%,wan22/qfloat8+gc+low_vram",
            "--out", str(tmp_path), "--tiny-dir", str(tmp_path / "models")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, "-c", script, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / JSON_NAME).read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["matmul_peak_flops"] > 0
    cases = {c["case"]: c for c in data["cases"]}
    assert set(cases) == {"sd15/qfloat8+gc+offload50%", "wan22/qfloat8+gc+low_vram"}
    for case in cases.values():
        assert case["status"] == "ok", (case["case"], case["note"], case["error_detail"])
        assert len(case["step_seconds"]) == 2 and case["seconds_per_step"] > 0
        assert case["flops_counted"] > 0 and math.isfinite(case["loss"])
        assert case["trainable_parameters"] > 0 and case["placed_weights_peak"] > 0
        assert case["mfu"] > 0  # model FLOPs from the plan of the step without checkpointing
        assert case["plan"]["step_total"] > 0
        # the plan traces the same step on fake tensors: same count, recomputation included
        assert case["flops_counted"] == case["plan"]["flops_per_step"], case["case"]
    assert any("blocks offloaded" in line for line in cases["sd15/qfloat8+gc+offload50%"]["log"])
    low_vram = cases["wan22/qfloat8+gc+low_vram"]
    assert low_vram["bucket"] == "64x64x5f" and low_vram["expert_swaps"] >= 2
    assert len(low_vram["warmup_seconds"]) == 3  # each expert once, then the first again
    table = (tmp_path / MARKDOWN_NAME).read_text()
    assert table.count("| ok |") == 2 and "dry run" in table
