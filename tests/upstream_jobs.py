"""Job files written the way ostris/ai-toolkit's users write them, run on tiny models.

A test may change only what cannot run here: paths (model, data, output, control and first-frame
images, the hub files a job downloads), the device, the step count (warm-up steps shrink with it)
and the preview size. Transformer block numbers in layer filters become 0, because the tiny models
have one or two blocks where the real ones have dozens. Everything else (dtype, optimizer,
quantization, timestep type, network...) runs as written. Used by tests/test_upstream_corpus.py
and tests/test_fork_examples.py.
"""

from __future__ import annotations

import copy
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

CORPUS = Path(__file__).parent / "data" / "upstream_corpus"
FORK_EXAMPLES = Path(__file__).parent / "data" / "fork_examples"

PREVIEW_SIZE = 64
PREVIEW_STEPS = 2
PREVIEW_FRAMES = 5  # 4k+1, the smallest WAN clip with motion
CTRL_IMG_FLAG = re.compile(r"--ctrl_img\s+\S+")
#: a transformer block number in a layer filter ("single_transformer_blocks.7.", "blocks_3"), not a
#: UNet's "up_blocks_1" / "down_blocks.0", which the tiny UNets have
BLOCK_NUMBER = re.compile(r"((?<!up_)(?<!down_)blocks[._])\d+")


@pytest.fixture(autouse=True)
def extras_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchao (model.quantize) and bitsandbytes (adamw8bit) live outside site-packages (Makefile)."""
    from aitk.extras import extras_dir

    if extras_dir().is_dir():
        monkeypatch.syspath_prepend(str(extras_dir()))


def read_job(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def write_job(job: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def tiny_variant(job: dict[str, Any]) -> str:
    """The tiny builder variant (tests/conftest.py build_tiny_model) standing in for the job's model."""
    model = job["config"]["process"][0]["model"]
    arch = str(model.get("arch") or "").split(":")[0]  # the UI writes e.g. "wan21:1b"
    name = str(model.get("name_or_path", ""))
    if arch == "flux_kontext" or "kontext" in name.lower():
        return "kontext"
    if arch == "flux" or model.get("is_flux"):
        return "schnell" if "schnell" in name.lower() else "dev"
    if arch == "chroma":
        return "chroma"
    if arch == "zimage":
        return "zimage"
    if arch == "flex2":
        return "flex2"
    if arch in ("pixart", "pixart_sigma") or model.get("is_pixart") or model.get("is_pixart_sigma"):
        return "pixart_sigma" if arch == "pixart_sigma" or model.get("is_pixart_sigma") else "pixart_alpha"
    if arch == "auraflow" or model.get("is_auraflow"):
        return "auraflow"
    if arch == "qwen_image":
        return "qwen_image"
    if arch in ("qwen_image_edit", "qwen_image_edit_plus"):
        return arch
    if arch == "cogview4":
        return "cogview4"
    if arch == "ernie_image":
        return "ernie_image"
    if arch == "ltx2":
        return "ltx2"
    if arch in ("hunyuan_video_1_5", "hunyuan_video_1_5_i2v"):
        return "hunyuan_video_1_5_i2v" if arch.endswith("i2v") else "hunyuan_video_1_5_t2v"
    if arch == "krea2":
        return "krea2_turbo" if "turbo" in name.lower() else "krea2"
    if arch in ("flux2", "flux2_klein_4b", "flux2_klein_9b"):
        return "flux2_dev" if arch == "flux2" else arch
    if arch == "hidream":
        return "hidream"
    if arch == "lumina2" or model.get("is_lumina2"):
        return "lumina2"
    if arch == "wan22_14b_i2v":
        return "22_i2v"
    if arch == "wan22_5b":
        return "22_5b"
    if arch == "wan22_14b":
        return "22_t2v"
    if arch in ("wan21", "wan21_i2v"):
        return "i2v" if arch == "wan21_i2v" or "i2v" in name.lower() else "t2v"
    if arch == "sd3" or (not arch and model.get("is_v3")):
        return "sd3_medium" if "medium" in name.lower() else "sd3_large"
    if arch == "sdxl" or model.get("is_xl"):
        return "sdxl"
    return "sd15"


def is_video_dataset(dataset: dict[str, Any]) -> bool:
    return int(dataset.get("num_frames") or 1) > 1


@dataclass(frozen=True)
class TinyData:
    """Inputs shared by the runs: captioned images, Kontext pairs, video clips, one still image."""

    images: Path
    pairs: Path
    controls: Path
    clips: Path
    still: Path


def make_tiny_data(root: Path, images: Path) -> TinyData:
    from test_data_video_training import write_clip
    from test_models_flux import _draw_pairs

    pairs, controls, clips = root / "pairs", root / "controls", root / "clips"
    _draw_pairs(pairs, controls)
    clips.mkdir()
    # long enough for the 41 frames upstream's video examples ask for
    write_clip(clips / "a.mp4", 48, 64, 48, fps=24)
    write_clip(clips / "b.mp4", 44, 48, 64, fps=16)
    for stem in ("a", "b"):
        (clips / f"{stem}.txt").write_text(f"a clip of colours {stem}")
    still = next(p for p in sorted(images.iterdir()) if p.suffix == ".png")
    return TinyData(images=images, pairs=pairs, controls=controls, clips=clips, still=still)


def localise(
    job: dict[str, Any],
    *,
    out: Path,
    model: Path,
    data: Path,
    controls: Path | None = None,
    ctrl_img: Path | None = None,
    steps: int = 3,
    keep_prompts: int | None = None,
    assistant_lora: Path | None = None,
    recovery_adapter: Path | None = None,
) -> dict[str, Any]:
    """The job with only paths, device, step count and preview size replaced (see the module text).

    `data` replaces every dataset folder (`controls` their control_path), `ctrl_img` every preview
    control / first-frame image (inline `--ctrl_img` flags too), `assistant_lora` and
    `recovery_adapter` the hub files the job names (model.assistant_lora_path, the adapter after
    "|" in model.qtype). `keep_prompts` keeps the first N preview prompts (None: all).
    """
    job = copy.deepcopy(job)
    process = job["config"]["process"][0]
    process["training_folder"] = str(out)
    process["device"] = "cpu"
    model_section = process["model"]
    model_section["name_or_path"] = str(model)
    if model_section.get("assistant_lora_path"):
        if assistant_lora is None:
            raise ValueError("the job names model.assistant_lora_path: pass assistant_lora")
        model_section["assistant_lora_path"] = str(assistant_lora)
    qtype = str(model_section.get("qtype") or "")
    if "|" in qtype:
        if recovery_adapter is None:
            raise ValueError(f"model.qtype {qtype!r} names a recovery adapter: pass recovery_adapter")
        model_section["qtype"] = f"{qtype.split('|', 1)[0]}|{recovery_adapter}"
    for dataset in process["datasets"]:
        dataset["folder_path"] = str(data)
        if isinstance(dataset.get("control_path"), list):  # a list of control folders keeps its length
            dataset["control_path"] = [str(controls)] * len(dataset["control_path"])
        elif dataset.get("control_path"):
            dataset["control_path"] = str(controls)
    train = process.setdefault("train", {})
    train["steps"] = steps
    if train.get("lr_warmup_steps"):
        train["lr_warmup_steps"] = min(train["lr_warmup_steps"], steps // 2)
    scheduler_params = train.get("lr_scheduler_params") or {}
    if scheduler_params.get("warmup_steps"):
        scheduler_params["warmup_steps"] = min(scheduler_params["warmup_steps"], steps // 2)
    model_kwargs = model_section.get("model_kwargs") or {}
    if model_kwargs.get("llama_model_path"):  # HiDream's Llama: the tiny model holds one (text_encoder_4/)
        model_kwargs["llama_model_path"] = str(model)
    kwargs = (process.get("network") or {}).get("network_kwargs") or {}
    for key in ("only_if_contains", "ignore_if_contains"):
        if kwargs.get(key):
            kwargs[key] = [BLOCK_NUMBER.sub(r"\g<1>0", name) for name in kwargs[key]]
    sample = process.get("sample")
    if sample:
        _shrink_previews(sample, ctrl_img, keep_prompts)
    return job


def _shrink_previews(sample: dict[str, Any], ctrl_img: Path | None, keep_prompts: int | None) -> None:
    sample.update({"width": PREVIEW_SIZE, "height": PREVIEW_SIZE, "sample_steps": PREVIEW_STEPS})
    if int(sample.get("num_frames") or 1) > 1:
        sample["num_frames"] = PREVIEW_FRAMES
    if sample.get("ctrl_img"):
        sample["ctrl_img"] = str(ctrl_img)
    if sample.get("prompts"):
        sample["prompts"] = [CTRL_IMG_FLAG.sub(f"--ctrl_img {ctrl_img}", p) for p in sample["prompts"][:keep_prompts]]
    if sample.get("samples"):
        sample["samples"] = sample["samples"][:keep_prompts]
        for entry in sample["samples"]:
            if entry.get("ctrl_img"):
                entry["ctrl_img"] = str(ctrl_img)
            for key in ("ctrl_img_1", "ctrl_img_2", "ctrl_img_3"):  # multi-image edit models
                if entry.get(key):
                    entry[key] = str(ctrl_img)
            entry["prompt"] = CTRL_IMG_FLAG.sub(f"--ctrl_img {ctrl_img}", entry["prompt"])


def run_job(path: Path):
    """Load and train as `aitk run` does, in this process: (LoadedJob, Trainer, RunResult)."""
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    loaded = load_job_file(path)
    trainer = Trainer(loaded.job, loaded.job.config.process[0], job_path=path)
    return loaded, trainer, trainer.run()


def copy_folder(source: Path, target: Path) -> Path:
    """A private copy of a shared data folder (latent caches are written next to the images)."""
    shutil.copytree(source, target)
    return target


def tiny_assistant_lora(model: Path, path: Path) -> Path:
    """A stand-in for the training adapter the job names (ostris/FLUX.1-schnell-training-adapter,
    ostris/zimage_turbo_training_adapter) made for the tiny model's transformer; one file per family
    next to `path`."""
    import json

    from aitk.models.tiny_common import MARKER_NAME

    arch = json.loads((model / MARKER_NAME).read_text()).get("arch", "flux")
    path = path.with_name(f"{path.stem}_{arch}{path.suffix}")
    if path.exists():
        return path
    if arch == "zimage":
        from test_models_zimage import write_assistant

        return write_assistant(model, path)
    from test_models_flux import _write_assistant

    return _write_assistant(model, path, "comfyui")


def tiny_recovery_adapter(variant: str, model: Path, path: Path) -> Path:
    """A recovery adapter for the tiny model of `variant` (WAN's, or Qwen-Image's)."""
    if variant in ("qwen_image", "qwen_image_edit", "qwen_image_edit_plus"):  # the edit models: the same transformer
        return tiny_qwen_image_recovery_adapter(model, path)
    return tiny_wan_recovery_adapter(model, path)


def tiny_qwen_image_recovery_adapter(model: Path, path: Path) -> Path:
    """A recovery adapter for the tiny Qwen-Image transformer in ComfyUI key names, covering the
    default LoRA targets (ai-toolkit's Qwen-Image adapters cover the transformer blocks)."""
    if path.exists():
        return path
    from diffusers import QwenImageTransformer2DModel

    from aitk.models.qwen_image import qwen_image_lora_candidates
    from test_recovery_adapter import write_recovery_file

    transformer = QwenImageTransformer2DModel.from_pretrained(str(model), subfolder="transformer")
    write_recovery_file(transformer, path, qwen_image_lora_candidates(transformer),
                        stem=lambda name: f"diffusion_model.{name}", weights=("lora_A", "lora_B"))
    return path


def tiny_wan_recovery_adapter(model: Path, path: Path) -> Path:
    """A recovery adapter for the tiny WAN transformer in ComfyUI key names (as the published ones)."""
    if path.exists():
        return path
    from diffusers import WanTransformer3DModel
    from torch import nn

    from aitk.models.wan import is_block_target, lora_key_stem
    from test_recovery_adapter import write_recovery_file

    transformer = WanTransformer3DModel.from_pretrained(str(model), subfolder="transformer")
    names = [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear) and is_block_target(n)]
    write_recovery_file(transformer, path, names, stem=lora_key_stem, weights=("lora_A", "lora_B"))
    return path
