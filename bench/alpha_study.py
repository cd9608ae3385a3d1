"""Does alpha scheduling help? A paired study on a tiny concept-learning task (CPU, fp32).

The same LoCon (rank 4 on linear and conv layers of the tiny SD 1.5 UNet) is trained on the same
concept, with the same steps and seeds, in two arms:

- fixed:    linear and conv alpha at the rank (scale 1.0) for the whole run: what the schedule ends
            at, and what a run without scheduling trains with;
- schedule: the image preset of docs/alpha-scheduling.md as conv_alpha_phases (scale 0.5 -> 0.75
            -> 1.0 on conv and linear alike), its min_steps scaled to this run's length, its exit
            criteria unchanged.

After training, each LoRA (at the alpha it ended with) is scored by its mean diffusion loss on
held-out images of the concept (other positions and sizes), over one fixed set of timesteps and
noises shared by every run. Prints per seed the two held-out losses and the schedule's transition
steps, then the mean difference (schedule - fixed) with its standard deviation and a t-based 95%
interval (4 degrees of freedom for 5 seeds), and the wall time.

Usage: python bench/alpha_study.py [--steps N] [--seeds K] [--jobs J]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# One thread per run: the model is tiny, and runs go side by side on separate cores instead.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

STEPS = 900
N_SEEDS = 5  # seeds 1..N_SEEDS; each seed is shared by both arms (a paired comparison)
RANK = 4
BATCH = 4
LR = 1e-3
SIZE = 64  # pixels; 8x8 latents on the tiny model
TRIGGER = "zqx"
CAPTION = "a photo of [trigger] emblem"
N_TRAIN = 16
N_HELDOUT = 8
EVAL_DRAWS = 24  # (timestep, noise) draws per held-out image
EVAL_SEED = 2024
DATA_SEED = 11
# The image preset's min_steps (400, 600) are meant for runs of 2,000 to 4,000 steps; they are
# scaled by steps / 3,000 (the middle of that range), so the phases take the same share of the run.
PRESET_RUN_LENGTH = 3000
# Two-sided 95% quantile of Student's t with 4 degrees of freedom (5 seeds); other seed counts use
# the table below (no scipy in the environment).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


# ---------------------------------------------------------------------------- the concept
def draw_emblem(size: int, cx: float, cy: float, radius: float, background: tuple[int, int, int]) -> Any:
    """The concept: a yellow disc with a red ring, a dark centre and a white bar, on a plain ground.

    Several parts in fixed proportions, so the adapter must learn a structure, not one colour."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)

    def disc(r: float, fill: tuple[int, int, int]) -> None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)

    disc(radius, (200, 30, 40))
    disc(radius * 0.75, (235, 205, 40))
    draw.rectangle((cx - radius * 0.6, cy - radius * 0.12, cx + radius * 0.6, cy + radius * 0.12),
                   fill=(245, 245, 245))
    disc(radius * 0.28, (30, 30, 60))
    return image


def write_concept(train_dir: Path, heldout_dir: Path) -> None:
    """Train and held-out images of the same concept. Held-out radii lie between the training
    radii, and every position is drawn afresh, so held-out images are never training images."""
    import numpy as np

    rng = np.random.default_rng(DATA_SEED)
    grounds = [(110, 120, 135), (90, 140, 100), (150, 150, 150), (70, 80, 120)]
    splits = ((train_dir, N_TRAIN, (10.0, 14.0, 18.0, 22.0)), (heldout_dir, N_HELDOUT, (12.0, 16.0, 20.0)))
    for folder, count, radii in splits:
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            radius = radii[i % len(radii)]
            cx, cy = (float(v) for v in rng.uniform(radius + 1, SIZE - radius - 1, 2))
            image = draw_emblem(SIZE, cx, cy, radius, grounds[int(rng.integers(len(grounds)))])
            image.save(folder / f"emblem_{i:02d}.png")
            (folder / f"emblem_{i:02d}.txt").write_text(CAPTION)


# ---------------------------------------------------------------------------- the arms
def scaled_schedule(steps: int) -> dict[str, Any]:
    """The image preset of docs/alpha-scheduling.md for a LoCon: conv_alpha_phases with the same
    criteria; each phase also sets linear_alpha, so the whole adapter goes 0.5 -> 0.75 -> 1.0."""
    scale = steps / PRESET_RUN_LENGTH
    half, three_quarters = RANK * 0.5, RANK * 0.75
    return {
        "enabled": True,
        "conv_alpha_phases": {
            "foundation": {
                "alpha": half, "linear_alpha": half, "min_steps": round(400 * scale),
                "exit_criteria": {"loss_improvement_rate_below": 0.0005, "min_gradient_stability": 0.50,
                                  "max_loss_cv": 0.8, "min_samples": 100},
            },
            "balance": {
                "alpha": three_quarters, "linear_alpha": three_quarters, "min_steps": round(600 * scale),
                "exit_criteria": {"loss_improvement_rate_below": 0.0003, "min_gradient_stability": 0.50,
                                  "max_loss_cv": 0.8, "min_samples": 150},
            },
            "emphasis": {"alpha": RANK, "linear_alpha": RANK},
        },
    }


def write_job_file(workdir: Path, arm: str, seed: int, steps: int) -> Path:
    from aitk.models.sd import build_tiny_sd15
    from conftest import base_process, write_job

    model = build_tiny_sd15(workdir / "tiny-sd15")
    name = f"{arm}_s{seed}"
    process = base_process(model, workdir / "train", workdir / "out")
    process["trigger_word"] = TRIGGER
    process["training_seed"] = seed
    network: dict[str, Any] = {"type": "lora", "linear": RANK, "linear_alpha": RANK, "conv": RANK,
                               "conv_alpha": RANK}
    if arm == "schedule":
        network["alpha_schedule"] = scaled_schedule(steps)
    process["network"] = network
    process["train"] |= {"steps": steps, "batch_size": BATCH, "lr": LR, "skip_first_sample": True}
    process["save"]["save_every"] = steps + 1  # only the final LoRA; checkpoints cost time here
    return write_job(workdir / f"{name}.yaml", name, process)


# ---------------------------------------------------------------------------- one run
@dataclass
class RunOutcome:
    arm: str
    seed: int
    heldout: float
    base_heldout: float  # the same score with the adapter switched off (multiplier 0)
    final_train_loss: float  # mean training loss of the last 100 steps
    final_alphas: tuple[float, float | None]
    transitions: list[str] = field(default_factory=list)
    final_phase: str | None = None
    blocking: list[str] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def heldout_loss(trainer: Any, folder: Path) -> float:
    """Mean MSE of the adapter's prediction on held-out images: EVAL_DRAWS (timestep, noise) pairs
    per image from one seeded generator, so every run is scored on exactly the same draws."""
    from PIL import Image

    from aitk.data.captions import apply_trigger
    from aitk.data.images import to_tensor

    adapter = trainer.adapter
    paths = sorted(folder.glob("*.png"))
    pixels = torch.stack([to_tensor(Image.open(p).convert("RGB")) for p in paths])
    latents = adapter.encode_images(pixels).repeat_interleave(EVAL_DRAWS, dim=0)
    generator = torch.Generator().manual_seed(EVAL_SEED)
    noisy = adapter.make_noisy_batch(latents, trainer.train_cfg, generator)
    cond = adapter.encode_prompts([apply_trigger(CAPTION, TRIGGER)])
    cond.hidden_states = cond.hidden_states.expand(latents.shape[0], -1, -1)
    denoiser = adapter.denoiser()
    denoiser.eval()
    prediction = adapter.predict(noisy, cond)
    return torch.nn.functional.mse_loss(prediction.float(), noisy.target.float()).item()


def train_and_score(workdir: Path, arm: str, seed: int, steps: int) -> RunOutcome:
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    torch.set_num_threads(1)
    started = time.perf_counter()
    loaded = load_job_file(write_job_file(workdir, arm, seed, steps))
    trainer = Trainer(loaded.job, loaded.job.config.process[0])
    # tqdm and the run log would interleave across parallel runs; the study prints its own table.
    with open(os.devnull, "w") as quiet, redirect_stdout(quiet), redirect_stderr(quiet):
        trainer.run()
    score = heldout_loss(trainer, workdir / "heldout")
    trainer.network.set_multiplier(0.0)
    base = heldout_loss(trainer, workdir / "heldout")
    trainer.network.set_multiplier(1.0)
    scheduler = trainer.health.scheduler
    outcome = RunOutcome(arm, seed, score, base, _tail_loss(trainer, 100),
                         (trainer.network.first.linear_alpha, trainer.network.first.conv_alpha))
    if scheduler is not None:
        # Transition.step is the 0-based index of the step that fired it; printed as steps done.
        outcome.transitions = [f"{t.to_phase} after {t.step + 1}" for t in scheduler.transition_history]
        outcome.final_phase = scheduler.phase(None).name
        outcome.blocking = scheduler.blocking_criteria(None)
    outcome.seconds = time.perf_counter() - started
    return outcome


def _tail_loss(trainer: Any, n: int) -> float:
    """Mean training loss of the last n steps, from the run's metrics file."""
    import json

    lines = trainer.paths.metrics.read_text().splitlines()[-n:]
    return statistics.fmean(json.loads(line)["loss"] for line in lines)


# ---------------------------------------------------------------------------- the study
def summarise(diffs: list[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation and the half-width of a t-based 95% interval."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    sd = statistics.stdev(diffs)
    return mean, sd, T975.get(len(diffs) - 1, 1.96) * sd / math.sqrt(len(diffs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seeds", type=int, default=N_SEEDS)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs trained side by side (one thread each)")
    args = parser.parse_args()
    seeds = list(range(1, args.seeds + 1))
    arms = ("fixed", "schedule")
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        from aitk.models.sd import build_tiny_sd15

        build_tiny_sd15(workdir / "tiny-sd15")  # once, before the workers look for it
        write_concept(workdir / "train", workdir / "heldout")
        jobs = [(workdir, arm, seed, args.steps) for seed in seeds for arm in arms]
        if args.jobs > 1:
            import multiprocessing

            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                outcomes = list(pool.map(_run_job, jobs))
        else:
            outcomes = [_run_job(job) for job in jobs]
    wall = time.perf_counter() - started
    report(outcomes, seeds, args.steps, wall, args.jobs)


def _run_job(job: tuple[Path, str, int, int]) -> RunOutcome:
    return train_and_score(*job)


def report(outcomes: list[RunOutcome], seeds: list[int], steps: int, wall: float, jobs: int) -> None:
    by = {(o.arm, o.seed): o for o in outcomes}
    schedule = scaled_schedule(steps)["conv_alpha_phases"]
    print(f"task: LoCon rank {RANK} (linear+conv) on tiny SD 1.5, {N_TRAIN} train / {N_HELDOUT} held-out "
          f"images at {SIZE} px, batch {BATCH}, AdamW lr {LR:g}, {steps} steps, seeds {seeds[0]}..{seeds[-1]}")
    print(f"fixed arm: linear/conv alpha {RANK}/{RANK} throughout (scale 1.0)")
    print(f"schedule arm: foundation {RANK * 0.5:g} (min_steps {schedule['foundation']['min_steps']}) -> "
          f"balance {RANK * 0.75:g} (min_steps {schedule['balance']['min_steps']}) -> emphasis {RANK:g}; "
          "image-preset exit criteria")
    print("train(...): mean training loss of the last 100 steps")
    print(f"held-out score: MSE over {N_HELDOUT} images x {EVAL_DRAWS} fixed (timestep, noise) draws; "
          f"adapter off: {by[('fixed', seeds[0])].base_heldout:.5f}")
    print()
    print(f"{'seed':>4}  {'fixed':>9}  {'schedule':>9}  {'diff':>9}  {'train(fixed)':>12}  "
          f"{'train(sched)':>12}  schedule: phase entered after step N")
    diffs = []
    for seed in seeds:
        f, s = by[("fixed", seed)], by[("schedule", seed)]
        diffs.append(s.heldout - f.heldout)
        fired = ", ".join(s.transitions) if s.transitions else "no transition fired"
        end = f"ends in {s.final_phase} (alpha {s.final_alphas[0]:g}/{s.final_alphas[1]:g})"
        held = f"; held by {', '.join(s.blocking)}" if s.blocking else ""
        print(f"{seed:>4}  {f.heldout:9.5f}  {s.heldout:9.5f}  {diffs[-1]:+9.5f}  {f.final_train_loss:12.5f}  "
              f"{s.final_train_loss:12.5f}  {fired}; {end}{held}")
    fixed_mean = statistics.fmean(by[("fixed", s)].heldout for s in seeds)
    sched_mean = statistics.fmean(by[("schedule", s)].heldout for s in seeds)
    mean, sd, half = summarise(diffs)
    print()
    print(f"mean held-out loss: fixed {fixed_mean:.5f}, schedule {sched_mean:.5f}")
    print(f"schedule - fixed: mean {mean:+.5f}, std {sd:.5f}, 95% CI [{mean - half:+.5f}, {mean + half:+.5f}] "
          f"(t, {len(diffs) - 1} dof); {sum(d < 0 for d in diffs)} of {len(diffs)} seeds lower with the schedule")
    print(f"relative: {mean / fixed_mean * 100:+.2f}% of the fixed arm's held-out loss")
    per_run = statistics.fmean(o.seconds for o in outcomes)
    print(f"wall time: {wall:.0f} s for {len(outcomes)} runs ({per_run:.0f} s per run, {jobs} side by side)")


if __name__ == "__main__":
    main()
