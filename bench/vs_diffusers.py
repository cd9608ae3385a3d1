"""aitk against diffusers' example `train_text_to_image_lora.py` on the same tiny SD 1.5 work.

Same tiny model, 16 images at 64 px, batch 2, rank 4, fp32, the same LoRA modules (to_q, to_k,
to_v, to_out.0 of the UNet), one CPU thread each. Both encode latents every step (aitk's latent
cache off); aitk keeps its default text-embedding cache, which the script does not have. A second
aitk row turns the latent cache on. Each trainer's step time is the median gap between optimizer
steps (torch's global optimizer step hook, the same clock for both) after a warm-up, in RUNS
interleaved runs; the median over runs is printed with the ratio. Aim (#16): aitk <= 0.9x.

The script is not ours and is never committed: pass a copy of it (from the diffusers repository,
examples/text_to_image/) with --script, and an interpreter that has `datasets` and `tensorboard`
(the script's default tracker) with --python (docs/benchmarks.md: how). torchvision has no CPU
build for our torch, so the bench runs a scratch copy of the script whose torchvision import is
replaced by bench/vs_diffusers_transforms.py, unless --python can import torchvision.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

STEPS = 200
WARMUP = 20
IMAGES = 16
MODULES = ["to_q", "to_k", "to_v", "to_out.0"]

# Runs the target (a module or a script) with a timestamp per optimizer step written to a file.
STEP_CLOCK = """
import runpy, sys, time, torch
from torch.optim.optimizer import register_optimizer_step_post_hook
stamps = []  # (perf_counter, time) of each optimizer step
register_optimizer_step_post_hook(lambda *_: stamps.append((time.perf_counter(), time.time())))
out, kind, target, *rest = sys.argv[1:]
sys.argv = [target, *rest]
try:
    runpy.run_module(target, run_name="__main__") if kind == "module" else runpy.run_path(target, run_name="__main__")
except SystemExit as exc:
    if exc.code not in (None, 0):
        raise
finally:
    open(out, "w").write("\\n".join(f"{a} {b}" for a, b in stamps))
"""


def make_work(workdir: Path) -> tuple[Path, Path]:
    """The tiny model and a 16-image dataset captioned both ways (.txt for aitk, metadata.jsonl
    for the script's imagefolder loader)."""
    from PIL import ImageOps

    from aitk.demo import draw_dataset
    from aitk.models.sd import build_tiny_sd15

    model = build_tiny_sd15(workdir / "tiny-sd15")
    drawn = workdir / "drawn"
    draw_dataset(drawn)
    data = workdir / "data"
    data.mkdir()
    images = sorted(p for p in drawn.iterdir() if p.suffix == ".png")
    rows = []
    for index in range(IMAGES):
        source = images[index % len(images)]
        caption = source.with_suffix(".txt").read_text().strip()
        name = f"{index:02d}.png"
        from PIL import Image

        image = Image.open(source)
        (ImageOps.mirror(image) if index >= len(images) else image).save(data / name)
        (data / name).with_suffix(".txt").write_text(caption)
        rows.append({"file_name": name, "text": caption})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data


def scratch_script(script: Path, python: str, workdir: Path) -> Path:
    """A copy of the script to run: as is when `python` has torchvision, else with the stand-in."""
    has_torchvision = subprocess.run([python, "-c", "import torchvision"], capture_output=True).returncode == 0
    text = script.read_text()
    line = "from torchvision import transforms"
    if not has_torchvision:
        if line not in text:
            raise SystemExit(f"{script}: no `{line}` line to replace (torchvision is missing)")
        text = text.replace(line, "import vs_diffusers_transforms as transforms", 1)
    copy = workdir / "train_text_to_image_lora.py"
    copy.write_text(text)
    return copy


def aitk_job(workdir: Path, model: Path, data: Path, name: str, cache_latents: bool) -> Path:
    import yaml

    process = {
        "type": "sd_trainer", "training_folder": str(workdir / "aitk-out"), "device": "cpu",
        "training_seed": 0,
        "network": {"type": "lora", "linear": 4, "linear_alpha": 4,
                    "network_kwargs": {"only_if_contains": MODULES}},
        "save": {"dtype": "float32", "save_every": 100000},
        "datasets": [{"folder_path": str(data), "resolution": [64], "cache_latents": cache_latents}],
        "train": {"steps": STEPS, "batch_size": 2, "lr": 1e-4, "optimizer": "adamw",
                  "skip_first_sample": True},
        "model": {"name_or_path": str(model)},
    }
    job = workdir / f"{name}.yaml"
    job.write_text(yaml.safe_dump({"job": "extension", "config": {"name": name, "process": [process]}}))
    return job


def step_time(python: str, clock: Path, args: list[str], env: dict[str, str], workdir: Path) -> tuple[float, float]:
    """(median seconds per step after the warm-up, seconds from the process's start to the end
    of its first optimizer step)."""
    stamps_file = workdir / "stamps.txt"
    started = time.time()
    result = subprocess.run([python, str(clock), str(stamps_file), *args], cwd=workdir, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{args[1]} failed:\n{result.stderr[-3000:]}")
    rows = [line.split() for line in stamps_file.read_text().splitlines()]
    if len(rows) != STEPS:
        raise SystemExit(f"{args[1]}: {len(rows)} optimizer steps, expected {STEPS}")
    stamps = [float(r[0]) for r in rows]
    step = statistics.median(b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1:]))
    return step, float(rows[0][1]) - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--script", required=True, type=Path, help="scratch copy of train_text_to_image_lora.py")
    parser.add_argument("--python", default=sys.executable, help="interpreter with `datasets` for the script")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # launches as users run them: compiled modules cached
    script_env = dict(env, PYTHONPATH=os.pathsep.join(p for p in [str(BENCH), env.get("PYTHONPATH", "")] if p))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        script = scratch_script(args.script, args.python, workdir)
        model, data = make_work(workdir)
        clock = workdir / "step_clock.py"
        clock.write_text(STEP_CLOCK)
        script_args = [
            "path", str(script), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--caption_column", "text", "--resolution", "64",
            "--train_batch_size", "2", "--max_train_steps", str(STEPS), "--rank", "4",
            "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--seed", "0",
            "--dataloader_num_workers", "0", "--mixed_precision", "no", "--report_to", "tensorboard",
            "--output_dir", str(workdir / "diffusers-out"), "--checkpointing_steps", "100000",
        ]
        rows: dict[str, list[float]] = {"diffusers": [], "aitk": [], "aitk_cached": []}
        launches: dict[str, list[float]] = {name: [] for name in rows}
        for run in range(args.runs):
            for name in (list(rows) if run % 2 == 0 else list(reversed(rows))):
                shutil.rmtree(workdir / "aitk-out", ignore_errors=True)
                shutil.rmtree(workdir / "diffusers-out", ignore_errors=True)
                if name == "diffusers":
                    seconds, launch = step_time(args.python, clock, script_args, script_env, workdir)
                else:
                    job = aitk_job(workdir, model, data, name, cache_latents=name == "aitk_cached")
                    seconds, launch = step_time(sys.executable, clock, ["module", "aitk", "run", str(job)], env, workdir)
                rows[name].append(seconds)
                launches[name].append(launch)
                print(f"run {run + 1} {name}: {seconds * 1000:.1f} ms/step, first step done {launch:.2f} s "
                      "after the start", flush=True)
    base = statistics.median(rows["diffusers"])
    base_launch = statistics.median(launches["diffusers"])
    print(f"diffusers train_text_to_image_lora.py: {base * 1000:.1f} ms/step, first step after "
          f"{base_launch:.2f} s (medians of {args.runs})")
    for name, label in (("aitk", "aitk, latents encoded each step"), ("aitk_cached", "aitk, latent cache on")):
        ours, launch = statistics.median(rows[name]), statistics.median(launches[name])
        print(f"{label + ':':38s} {ours * 1000:.1f} ms/step = {ours / base:.2f}x (aim: <= 0.90x); "
              f"first step after {launch:.2f} s = {launch / base_launch:.2f}x")


if __name__ == "__main__":
    main()
