"""GPU benchmark: seconds per step, MFU and peak memory of real-size LoRA training, beside the plan.

    python bench/gpu.py [--quick] [--only flux,wan22] [--out DIR] [--max-seconds 540]
    python bench/gpu.py --dry-run          # the same code path on tiny models on the CPU (seconds)

For SD 1.5, SDXL, FLUX.1 dev and WAN 2.2 T2V A14B, random-init at real size from the public
configs aitk plan ships (nothing is downloaded), LoRA rank 16, at the preset's largest bucket
(and frames), each memory setting (bench/gpu_cases.py) is set up and trained through aitk's
own code (bench/gpu_case.py) and measured (bench/gpu_timing.py): seconds per step, model FLOPs
utilisation against the card's measured bf16 matmul peak, torch.cuda.max_memory_allocated, and
`aitk.plan`'s estimate of the same job beside it (bench/gpu_plans.py).

Runs unattended within --max-seconds (each case has its own limit; what does not fit is
skipped with a note; out of memory is recorded as OOM) and always writes gpu_bench.json and
gpu_bench.md (bench/gpu_report.py) to --out, else $OUT when set, else bench/results/.
How to run it on the GPU machine: docs/memory.md, "GPU benchmark".
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts from here, imports included

import argparse  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for folder in (str(REPO), str(BENCH)):
    if folder not in sys.path:
        sys.path.insert(0, folder)

from gpu_cases import MODELS, SETTINGS, Case, case_list, job_dict  # noqa: E402
from gpu_report import CaseRecord, write_outputs  # noqa: E402

#: modules every case needs; torchao only the quantized ones
REQUIRED_MODULES = ("torch", "diffusers", "transformers", "peft", "accelerate", "pydantic", "yaml", "safetensors")
#: seconds kept back at the end for waiting on plans and writing the outputs
RESERVE_SECONDS = 15.0
#: a case is not started with less time than this left
MIN_CASE_SECONDS = {"cuda": 20.0, "cpu": 2.0}


class Interrupted(BaseException):
    """SIGTERM / SIGINT: stop now, write what was measured (BaseException: no case catches it)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer settings and steps")
    parser.add_argument("--only", default="", help="comma-separated model keys or case ids, e.g. flux,wan22/bf16")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else bench/results/)")
    parser.add_argument("--max-seconds", type=float, default=540.0, help="whole-run budget (default 540)")
    parser.add_argument("--case-seconds", type=float, default=None, help="limit of one case (default 150; dry run 120)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2, --quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5, --quick 3, dry run 2)")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny random-init models of the same families")
    parser.add_argument("--dry-run", action="store_true", help="--device cpu --tiny, plans inline: checks the script")
    parser.add_argument("--tiny-dir", default=None, help="where tiny model folders are built (default: a temp dir)")
    parser.add_argument("--plans", choices=("process", "inline", "off"), default=None,
                        help="how plans are computed (default: process on the GPU, inline in a dry run)")
    parser.add_argument("--plan-workers", type=int, default=3)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = args.device or "cpu", True
    args.device = args.device or "cuda"
    args.plans = args.plans or ("inline" if args.dry_run else "process")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick or args.dry_run else 2)
    args.steps = args.steps if args.steps is not None else (2 if args.dry_run else 3 if args.quick else 5)
    args.case_seconds = args.case_seconds or (120.0 if args.dry_run else 150.0)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    return args


def output_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return BENCH / "results"


def missing_modules(names: tuple[str, ...] = REQUIRED_MODULES) -> list[str]:
    import importlib.util

    return [name for name in names if importlib.util.find_spec(name) is None]


def versions() -> dict[str, Any]:
    from importlib import metadata

    found: dict[str, Any] = {"python": sys.version.split()[0]}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "torchao", "pydantic"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    if found["torchao"] is None:  # `make install` keeps it in <venv>/extras (aitk.extras)
        try:
            from aitk.extras import import_extra

            found["torchao"] = getattr(import_extra("torchao", needed_for="", pip_spec=""), "__version__", "?")
        except ImportError:
            pass
    return found


def environment() -> dict[str, Any]:
    import subprocess

    import torch

    info = versions()
    info.update(cuda=torch.version.cuda, cpu_count=os.cpu_count())
    try:
        import psutil

        info["host_memory_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    try:
        info["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                        text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


class Budget:
    """Seconds left of --max-seconds (counted from start-up), less what the end needs."""

    def __init__(self, total: float, started: float = STARTED, reserve: float = RESERVE_SECONDS) -> None:
        self.end = started + total
        self.reserve = reserve

    def left(self) -> float:
        return self.end - self.reserve - time.monotonic()

    def case_limit(self, per_case: float) -> float:
        return min(per_case, self.left())


def quiet_libraries() -> None:
    """diffusers warns on every cast of a class with fp32 modules; keep the log to the bench."""
    import warnings

    for name in ("diffusers", "transformers"):
        try:
            __import__(f"{name}.utils.logging", fromlist=["set_verbosity_error"]).set_verbosity_error()
        except ImportError:
            pass
    # peft: a LoRA on torchao weights cannot be merged, which training never does
    warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")


def log(message: str) -> None:
    elapsed = time.monotonic() - STARTED
    print(f"[{elapsed:6.1f}s] {message}", flush=True)


class Run:
    """One benchmark run: the records, the outputs, and the loop over models and cases."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = output_dir(args.out)
        self.budget = Budget(args.max_seconds)
        self.cases: list[Case] = case_list(args.quick, args.only)
        self.records = {c.id: CaseRecord(c.id, c.model.key, c.setting.key,
                                         gradient_checkpointing=c.setting.gradient_checkpointing) for c in self.cases}
        self.meta: dict[str, Any] = {
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "max_seconds": args.max_seconds,
            "argv": sys.argv[1:],
            "mode": "dry run: tiny models on the CPU, figures check the script only" if args.dry_run else
                    ("tiny models" if args.tiny else ""),
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "notes": [],
        }
        self.plans: Any = None
        self.ops: Any = None

    def write(self) -> None:
        self.meta["seconds"] = time.monotonic() - STARTED
        if self.plans is not None:
            for case_id, plan in self.plans.ready().items():
                if case_id in self.records:
                    self.records[case_id].plan = plan
                elif plan.get("flops_per_step"):  # planned for its FLOPs only
                    self.meta.setdefault("planned_model_flops", {})[case_id.split("/")[0]] = plan["flops_per_step"]
        write_outputs(self.out, self.meta, list(self.records.values()))

    def skip_rest(self, cases: list[Case], note: str, status: str = "skipped") -> None:
        for case in cases:
            record = self.records[case.id]
            if record.status == "not run":
                record.status, record.note = status, note

    # --- the run ----------------------------------------------------------------------------
    def run(self) -> int:
        import torch

        from gpu_timing import DeviceOps, matmul_peak

        args = self.args
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("no CUDA device here; `python bench/gpu.py --dry-run` checks the script on the CPU")
        self.ops = ops = DeviceOps(torch.device(args.device))
        quiet_libraries()
        self.meta.update(environment())
        self.meta.update(ops.describe())
        if self.meta.get("torchao") is None:
            self.meta["notes"].append("torchao is not installed: the quantized settings fail (pip install torchao)")
        size, repeats, warm = (8192, 20, 0.5) if ops.cuda else (256, 3, 0.0)
        self.meta.update(matmul_dtype="bf16", matmul_size=size)
        self.meta["matmul_peak_flops"] = matmul_peak(ops, torch.bfloat16, size, repeats, warm)
        log(f"{self.meta.get('gpu', args.device)}: bf16 matmul {self.meta['matmul_peak_flops'] / 1e12:.3g} TFLOP/s")
        self.write()

        import tempfile

        from gpu_plans import PlanService

        with tempfile.TemporaryDirectory(prefix="aitk-bench-") as scratch:
            tiny_root = Path(args.tiny_dir) if args.tiny_dir else Path(scratch)
            sources = self._model_sources(tiny_root)
            self.plans = PlanService(args.plans, args.plan_workers)
            for case in self.cases:
                if case.model.key in sources:
                    self.plans.submit(case.id, job_dict(case, sources[case.model.key], args.tiny))
            for key, source in sources.items():  # model FLOPs (MFU) need the step without checkpointing
                plain = Case(next(m for m in MODELS if m.key == key), SETTINGS[0])
                if plain.id not in self.records:
                    self.plans.submit(plain.id, job_dict(plain, source, args.tiny))
            for model in MODELS:
                cases = [c for c in self.cases if c.model is model]
                if cases and model.key in sources:
                    self._run_model(cases, sources[model.key])
            self.plans.wait(max(1.0, self.budget.left() + RESERVE_SECONDS - 5.0))
        return 0

    def _model_sources(self, tiny_root: Path) -> dict[str, str]:
        """model key -> name_or_path: the hub id (shipped configs) or a tiny folder built now."""
        from gpu_case import tiny_folder

        sources = {}
        for model in MODELS:
            cases = [c for c in self.cases if c.model is model]
            if not cases:
                continue
            if not self.args.tiny:
                sources[model.key] = model.hub_id
                continue
            try:
                sources[model.key] = str(tiny_folder(cases[0], tiny_root))
            except Exception as exc:  # noqa: BLE001 - that family is reported, the others run
                self.skip_rest(cases, f"tiny model not built: {type(exc).__name__}: {exc}", "error")
        return sources

    def _run_model(self, cases: list[Case], name_or_path: str) -> None:
        import torch

        from gpu_case import model_context
        from gpu_models import host_weights
        from gpu_timing import guarded

        model = cases[0].model
        limit = self.budget.left()
        if limit < MIN_CASE_SECONDS[self.ops.device.type]:
            self.skip_rest(cases, "time budget spent before this model")
            return
        log(f"{model.label}: building random weights on the host")

        def build() -> Any:
            ctx = model_context(cases[0], name_or_path, self.args.tiny)
            ctx.weights = host_weights(ctx.spec, model.arch, torch.bfloat16)
            return ctx

        built = guarded(build, limit, self.ops)
        if built.status != "ok":
            why = "the time budget ran out" if built.status == "timeout" else built.note
            self.skip_rest(cases, f"weights not built: {why}", "skipped" if built.status == "timeout" else "error")
            self.write()
            return
        ctx = built.value
        bucket = f"{ctx.size[0]}x{ctx.size[1]}" + (f"x{ctx.frames}f" if ctx.frames > 1 else "")
        log(f"{model.label}: weights built in {built.seconds:.1f} s; bucket {bucket}")
        for case in cases:
            self.records[case.id].bucket = bucket
            self._run_case(case, ctx)
            self.write()
        ctx.weights.clear()
        self.ops.release()

    def _run_case(self, case: Case, ctx: Any) -> None:
        import torch

        from gpu_case import Measurement, run_case
        from gpu_timing import guarded

        record = self.records[case.id]
        limit = self.budget.case_limit(self.args.case_seconds)
        if limit < MIN_CASE_SECONDS[self.ops.device.type]:
            record.status, record.note = "skipped", "time budget spent"
            return
        measured = Measurement()
        # timed steps stop at a fair share of what is left, so every remaining case gets its turn
        waiting = sum(1 for r in self.records.values() if r.status == "not run")
        share = max(self.budget.left() / max(waiting, 1), MIN_CASE_SECONDS[self.ops.device.type])
        soft_deadline = time.monotonic() + min(share, 0.8 * limit)
        outcome = guarded(
            lambda: run_case(case, ctx, self.ops, torch.bfloat16, measured, warmup=self.args.warmup,
                             timed=self.args.steps, deadline=soft_deadline),
            limit, self.ops,
        )
        self._record(record, outcome, measured)
        log(f"{case.id}: {record.status} {record.note} "
            + (f"{record.seconds_per_step:.3f} s/step" if record.seconds_per_step else ""))

    def _record(self, record: CaseRecord, outcome: Any, measured: Any) -> None:
        import math

        ops = self.ops
        times = measured.times
        record.status, record.note, record.error_detail = outcome.status, outcome.note, outcome.detail
        record.case_seconds = outcome.seconds
        record.setup_seconds = measured.setup_seconds
        record.warmup_seconds, record.step_seconds = times.warmup, times.timed
        record.seconds_per_step = times.median
        record.flops_counted = times.flops
        record.loss = times.loss
        record.trainable_parameters = measured.trainable_parameters
        record.text_tokens = measured.text_tokens
        record.placed_weights_peak = measured.ledger_peak
        record.expert_swaps, record.expert_swap_seconds = measured.swaps, measured.swap_seconds
        record.log = measured.log[-30:]
        base = measured.baseline or 0
        peak = ops.peak_allocated()
        if peak is not None:
            if measured.setup_peak is None:  # failed during set-up: the peak is the set-up's
                record.peak_setup_allocated = peak - base
            else:
                record.peak_setup_allocated = measured.setup_peak - base
                record.peak_allocated = peak - base
            record.peak_reserved = ops.peak_reserved()
            record.baseline_allocated = base
        if times.cut_short:
            record.note = (record.note + "; " if record.note else "") + (
                f"cut short at the case limit after {len(times.timed)} timed steps"
            )
        if record.loss is not None and not math.isfinite(record.loss):
            record.note = (record.note + "; " if record.note else "") + "loss not finite"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded, ever
    args = parse_args(argv)
    try:
        run = Run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def interrupt(signum: int, _frame: Any) -> None:
        raise Interrupted(f"stopped by signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 1
    try:
        missing = missing_modules()
        if missing:
            run.meta["error"] = (
                f"missing Python packages: {', '.join(missing)}; carry them as wheels (python3 "
                "bench/gpu_wheels.py here, then see docs/memory.md, GPU benchmark)"
            )
            code = 2
        else:
            code = run.run()
    except Interrupted as exc:
        run.meta["error"] = str(exc)
    except SystemExit as exc:
        run.meta["error"] = str(exc.code)
        code = 2
    except Exception as exc:  # noqa: BLE001 - the outputs are written whatever went wrong
        import traceback

        run.meta["error"] = f"{type(exc).__name__}: {exc}"
        run.meta["error_detail"] = traceback.format_exc()[-4000:]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        run.skip_rest(run.cases, "the run stopped before this case", "not run")
        try:
            run.write()
        finally:
            if run.plans is not None:
                run.plans.close()
        print(f"wrote {run.out}/gpu_bench.json and gpu_bench.md", flush=True)
    if run.meta.get("error"):
        print(f"error: {run.meta['error']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
