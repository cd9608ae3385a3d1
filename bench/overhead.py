"""Trainer overhead, launch time and memory on the tiny SD 1.5 model (CPU, fp32).

Prints, from one run:
- trainer / bare loop: the trainer's median step time over a bare PyTorch loop doing the same
  forward, backward and optimizer step on the same tiny model and batch (cached latents), in
  ROUNDS interleaved rounds (bare, trainer, trainer without the gradient-sign statistic; the order
  turns each round so drift hits all three alike): the median of the rounds' ratios with their
  spread, and the statistic's own cost; aim: <= 1.05;
- where the trainer's step goes (data, forward, backward, optimizer: performance_log_every);
- launch to first step of `python -m aitk run job.yaml` (aitk byte-compiled and one warm-up
  launch first, as a user's second run), median of 3 launches, and the peak RSS of those runs;
  aims: <= 4.0 s, <= 550 MB. Beside it, the bare loop's own launch to its first step (this file
  run fresh: the same libraries, model load, LoRA and one step), and what the libraries' imports
  alone take in a fresh interpreter (torch, torch._dynamo, transformers, peft, diffusers); both
  hold back the garbage collector's full passes as `aitk run` does while a run starts.
  bench/vs_diffusers.py times the same launch for diffusers' example script.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

ROUNDS = 9  # short rounds: the machine's speed drifts within minutes, and drift within a round is noise
STEPS = 50  # per round and loop
WARMUP = 10
LAUNCHES = 3
BARE_FIRST_STEP = "--bare-loop-first-step"  # this file run as the bare loop's launch


def make_job(workdir: Path, name: str, steps: int) -> Path:
    from aitk.demo import draw_dataset
    from aitk.models.sd import build_tiny_sd15
    from conftest import base_process, write_job

    model = build_tiny_sd15(workdir / "tiny-sd15")
    data = workdir / "data"
    if not data.exists():
        draw_dataset(data)
    process = base_process(model, data, workdir / "out")
    process["train"] |= {"steps": steps, "skip_first_sample": True}
    process["save"]["save_every"] = 100000
    return write_job(workdir / f"{name}.yaml", name, process)


def trainer_step_times(job: Path, *, sign_statistic: bool = True, timed: bool = False) -> list[tuple[float, float]]:
    """(wall, process CPU) seconds of each step of the trainer on `job`; `sign_statistic=False` leaves out the gradient-sign
    agreement (the default health metric) to state its cost; `timed` returns the metrics lines'
    phase times instead (performance_log_every: 1)."""
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    loaded = load_job_file(job)
    process = loaded.job.config.process[0]
    if timed:
        process.performance_log_every = 1
    stamps: list[tuple[float, float]] = []
    trainer = Trainer(loaded.job, process,
                      on_step_end=lambda _t, _s: stamps.append((time.perf_counter(), time.process_time())))
    if not sign_statistic:
        trainer._measure_signs = lambda: None  # type: ignore[method-assign]
    for old in Path(process.training_folder).glob(f"{loaded.job.config.name}*"):
        import shutil

        shutil.rmtree(old, ignore_errors=True)  # each round trains from the start, not a resume
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.run()  # its log and progress bar stay out of the bench's output (log.txt has them)
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])][WARMUP:]


def phase_medians(job: Path) -> dict[str, float]:
    trainer_step_times(job, timed=True)
    raw = yaml.safe_load(job.read_text())
    name = raw["config"]["name"]
    metrics = Path(raw["config"]["process"][0]["training_folder"]) / name / f"metrics_{name}.jsonl"
    lines = [json.loads(line) for line in metrics.read_text().splitlines()][WARMUP:]
    fields = ["time_data_s", "time_forward_s", "time_backward_s", "time_optimizer_s", "step_time_s"]
    return {f: statistics.median(line[f] for line in lines) for f in fields}


def bare_step_times(job: Path, steps: int = STEPS) -> list[tuple[float, float]]:
    """(wall, process CPU) seconds of each step of the same work with nothing around it: UNet +
    peft LoRA, fixed latents and text, fused AdamW."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import CLIPTextModel, CLIPTokenizer

    from aitk.networks.targets import unet_lora_candidates

    model_dir = job.parent / "tiny-sd15"
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    targets = unet_lora_candidates(unet, include_conv=False)
    unet = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets), unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)  # the trainer's default, on the CPU too
    ids = tokenizer(["a red circle, shp style"] * 2, padding="max_length", max_length=77,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        text = text_encoder(ids)[0]
    latents = torch.randn(2, 4, 8, 8)
    generator = torch.Generator().manual_seed(0)
    unet.train()
    times: list[tuple[float, float]] = []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (2,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        loss = torch.nn.functional.mse_loss(unet(noisy, t, encoder_hidden_states=text).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append((time.perf_counter() - start, time.process_time() - start_cpu))
    return times[WARMUP:]


# What any trainer on these libraries pays before its first step: the imports of an SD 1.5 LoRA run.
# The bare loop's launch and the import floor hold back the collector's full passes as `aitk run`
# does while a run starts (aitk/startup_gc.py), so that the three launches compare like for like.
HOLD_FULL_GC_PASSES = "from aitk import startup_gc; startup_gc.pause()\n"

IMPORT_FLOOR = HOLD_FULL_GC_PASSES + """
import time
marks = [("start", time.perf_counter())]
import torch
marks.append(("torch", time.perf_counter()))
import torch._dynamo  # torch.optim imports it when the first optimizer is built
marks.append(("torch._dynamo", time.perf_counter()))
from transformers import CLIPTextModel, CLIPTokenizer
marks.append(("transformers", time.perf_counter()))
import peft
marks.append(("peft", time.perf_counter()))
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
marks.append(("diffusers", time.perf_counter()))
print(" ".join(f"{name}={b - a:.3f}" for (_, a), (name, b) in zip(marks, marks[1:])))
"""


def launch_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as users run it: compiled modules cached
    return env


def import_floor() -> dict[str, float]:
    """Seconds each library's import takes in a fresh interpreter (median of LAUNCHES)."""
    runs = []
    for _ in range(LAUNCHES):
        out = subprocess.run([sys.executable, "-c", IMPORT_FLOOR], env=launch_env(), check=True,
                             capture_output=True, text=True).stdout.split()
        runs.append({k: float(v) for k, v in (item.split("=") for item in out)})
    return {name: statistics.median(r[name] for r in runs) for name in runs[0]}


def launch_to_first_step(job: Path) -> tuple[float, float]:
    env = launch_env()
    started = time.time()
    child = subprocess.Popen([sys.executable, "-m", "aitk", "run", str(job)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)  # this run's own peak, not the largest of all children's
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, child.args)
    peak_mb = usage.ru_maxrss / 1024
    raw = yaml.safe_load(job.read_text())
    process = raw["config"]["process"][0]
    metrics = Path(process["training_folder"]) / raw["config"]["name"] / f"metrics_{raw['config']['name']}.jsonl"
    first = json.loads(metrics.read_text().splitlines()[0])
    first_end = datetime.fromisoformat(first["timestamp"]).timestamp()
    return first_end - started, peak_mb


def bare_launch_to_first_step(job: Path) -> float:
    """The same launch for the bare loop: this file run fresh, its imports (the same libraries),
    the model from disk, the LoRA and one step; it encodes no images (its latents are random)."""
    started = time.time()
    this = str(Path(__file__).resolve())
    code = HOLD_FULL_GC_PASSES + (f"import runpy, sys; sys.argv = [{this!r}, {BARE_FIRST_STEP!r}, {str(job)!r}]; "
                                  f"runpy.run_path({this!r}, run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], env=launch_env(), check=True, capture_output=True,
                         text=True).stdout
    return float(out.split()[-1]) - started


def main() -> None:
    if sys.argv[1:2] == [BARE_FIRST_STEP]:
        bare_step_times(Path(sys.argv[2]), steps=1)
        print(time.time())
        return
    torch.set_num_threads(1)
    ratios, cpu_ratios, statistic_costs, bares, ours = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        job = make_job(workdir, "overhead", STEPS)
        for round_index in range(ROUNDS):
            runs = {
                "bare": lambda: bare_step_times(job),
                "trainer": lambda: trainer_step_times(job),
                "no_statistic": lambda: trainer_step_times(job, sign_statistic=False),
            }
            order = list(runs)[round_index % 3:] + list(runs)[:round_index % 3]
            steps = {name: runs[name]() for name in order}
            medians = {name: statistics.median(wall for wall, _ in steps[name]) for name in order}
            cpu = {name: statistics.median(c for _, c in steps[name]) for name in order}
            cpu_ratios.append(cpu["trainer"] / cpu["bare"])
            ratios.append(medians["trainer"] / medians["bare"])
            statistic_costs.append((medians["trainer"] - medians["no_statistic"]) / medians["bare"])
            bares.append(medians["bare"])
            ours.append(medians["trainer"])
            print(f"round {round_index + 1}: bare {medians['bare'] * 1000:.1f} ms, trainer "
                  f"{medians['trainer'] * 1000:.1f} ms, without the sign statistic "
                  f"{medians['no_statistic'] * 1000:.1f} ms", flush=True)
        phases = phase_medians(job)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "aitk")], env=launch_env(),
                       check=True, stdout=subprocess.DEVNULL)
        launch_to_first_step(make_job(workdir, "warm", 2))  # file cache and compiled modules in place
        launches, bare_launches = [], []
        for i in range(LAUNCHES):  # interleaved, as the steps are
            launches.append(launch_to_first_step(make_job(workdir, f"launch{i}", 20)))
            bare_launches.append(bare_launch_to_first_step(job))
        floor = import_floor()
    launch = statistics.median(t for t, _ in launches)
    rss = max(r for _, r in launches)
    print(f"bare PyTorch loop, median step:   {statistics.median(bares) * 1000:.1f} ms")
    print(f"aitk trainer, median step:        {statistics.median(ours) * 1000:.1f} ms")
    print(f"overhead ratio (trainer / bare):  {statistics.median(ratios):.3f}   (median of {ROUNDS} interleaved "
          f"rounds, spread {min(ratios):.3f}-{max(ratios):.3f}; aim: <= 1.05)")
    print(f"  in CPU time of the process:     {statistics.median(cpu_ratios):.3f}   (spread "
          f"{min(cpu_ratios):.3f}-{max(cpu_ratios):.3f}; the data thread's work included; less moved by other "
          "processes than the wall clock)")
    print(f"  of which the gradient-sign statistic: {statistics.median(statistic_costs):+.3f} "
          f"(spread {min(statistic_costs):+.3f} to {max(statistic_costs):+.3f})")
    parts = ", ".join(f"{k.removeprefix('time_').removesuffix('_s')} {v * 1000:.1f} ms" for k, v in phases.items()
                      if k != "step_time_s")
    print(f"  trainer step by phase (timed run): {parts}; step {phases['step_time_s'] * 1000:.1f} ms")
    print(f"launch to first step:             {launch:.2f} s    (median of {LAUNCHES}: "
          f"{', '.join(f'{t:.2f}' for t, _ in launches)}; aim: <= 4.0 s)")
    bare_launch = statistics.median(bare_launches)
    print(f"  the bare loop's launch to its first step: {bare_launch:.2f} s (median of {LAUNCHES}: "
          f"{', '.join(f'{t:.2f}' for t in bare_launches)}; the same imports, model from disk, LoRA and one step, "
          f"no images encoded; full collector passes held back as aitk's): aitk / bare: {launch / bare_launch:.2f}")
    libraries = sum(floor.values())
    print(f"  of which library imports:       {libraries:.2f} s ({', '.join(f'{k} {v:.2f}' for k, v in floor.items())}; "
          "median of 3 fresh interpreters); the rest, aitk's own work to the first step: "
          f"{launch - libraries:.2f} s")
    print(f"peak RSS of a tiny run:           {rss:.0f} MB   (aim: <= 550 MB)")


if __name__ == "__main__":
    main()
