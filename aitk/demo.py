"""`aitk demo`: a tiny SD 1.5 LoRA trained end to end on CPU in a few minutes.

It builds a random-init SD 1.5-shaped model (nothing is downloaded), draws a small captioned
dataset of coloured shapes, writes a job file and runs it like any other job.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

DEMO_NAME = "aitk_demo"
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}


def cache_dir() -> Path:
    return Path(os.environ.get("AITK_CACHE", Path.home() / ".cache" / "aitk"))


def draw_dataset(folder: Path, size: int = 64) -> int:
    """Coloured shapes on a grey background, each with a caption naming shape and colour."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for shape in SHAPES:
        for colour_name, rgb in COLOURS.items():
            image = Image.new("RGB", (size, size), (128, 128, 128))
            draw = ImageDraw.Draw(image)
            box = (size // 5, size // 5, size - size // 5, size - size // 5)
            if shape == "circle":
                draw.ellipse(box, fill=rgb)
            elif shape == "square":
                draw.rectangle(box, fill=rgb)
            else:
                draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=rgb)
            stem = f"{colour_name}_{shape}"
            image.save(folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(f"a {colour_name} {shape}, [trigger] style")
            count += 1
    return count


def demo_job_yaml(model_dir: Path, data_dir: Path, training_folder: Path, steps: int) -> str:
    every = max(1, steps // 3)
    warmup = min(20, steps // 10)
    return f"""# Written by `aitk demo`: a complete job file; run it again with `aitk run` to resume.
job: extension
config:
  name: {DEMO_NAME}
  process:
    - type: sd_trainer
      training_folder: {training_folder}
      device: cpu
      trigger_word: shp
      training_seed: 42
      network:
        type: lora
        linear: 8
        linear_alpha: 8
        conv: 4
        conv_alpha: 4
      save:
        dtype: float16
        save_every: {every}
        max_step_saves_to_keep: 3
      datasets:
        - folder_path: {data_dir}
          caption_ext: txt
          resolution: [64]
          cache_latents: true
          caption_dropout_rate: 0.05
      train:
        steps: {steps}
        batch_size: 2
        lr: 1e-3
        optimizer: adamw
        lr_scheduler: cosine_with_warmup
        lr_warmup_steps: {warmup}
        max_grad_norm: 1.0
      model:
        name_or_path: {model_dir}
      sample:
        sampler: ddim
        sample_every: {every}
        width: 64
        height: 64
        sample_steps: 8
        guidance_scale: 3.0
        prompts:
          - "a red circle, [trigger] style --seed 1"
          - "a blue triangle, [trigger] style --seed 2"
meta:
  name: "[name]"
  description: tiny demo LoRA
"""


def run_demo(output: Path, run_job: Callable[[Path], int], steps: int = 300) -> int:
    """Build the model and data, write the job file and train it with `run_job` (the CLI's
    `aitk run`, handed in so that this module never imports the CLI); 0 when it finished."""
    from aitk.models.sd import build_tiny_sd15

    output = output.resolve()
    model_dir = build_tiny_sd15(cache_dir() / "tiny-sd15")
    data_dir = output / "demo_data"
    run_dir = output / DEMO_NAME
    # A demo always starts fresh; a user's own runs resume instead.
    for old in (data_dir, run_dir):
        shutil.rmtree(old, ignore_errors=True)
    images = draw_dataset(data_dir)
    output.mkdir(parents=True, exist_ok=True)
    job_file = output / f"{DEMO_NAME}.yaml"
    job_file.write_text(demo_job_yaml(model_dir, data_dir, output, steps))
    print(f"demo: tiny SD 1.5 model in {model_dir}, {images} images in {data_dir}, job {job_file}")
    code = run_job(job_file)
    if code != 0:
        return code
    loras = sorted(p.name for p in run_dir.glob("*.safetensors"))
    samples = sorted(p.name for p in (run_dir / "samples").glob("*"))
    print(
        "\nDemo finished. Everything is in " + str(run_dir) + ":\n"
        f"  LoRA files:  {', '.join(loras)}\n"
        f"  samples:     {len(samples)} images in {run_dir / 'samples'} (step_index.jpg; the tiny\n"
        "               model's VAE is random, so they look like coloured noise: they show the\n"
        "               sampling path works, not image quality)\n"
        f"  metrics:     {run_dir / f'metrics_{DEMO_NAME}.jsonl'} (one JSON line per step)\n"
        f"  status:      {run_dir / 'status.json'}\n"
        f"  log:         {run_dir / 'log.txt'}\n"
        f"  checkpoints: {run_dir / 'checkpoints'}\n"
        f"Train again or longer: aitk run {job_file}"
    )
    return 0
