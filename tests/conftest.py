"""Shared fixtures: the tiny SD 1.5 model, a small captioned dataset, and job-file builders."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests never read or change the user's own hub cache (the model-cache routes list and delete
# in it): each test session gets an empty one, set before huggingface_hub reads its constants.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="aitk-tests-hf-home-")
for _cache_variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
    os.environ.pop(_cache_variable, None)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast as two, and threads fight on a small shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from aitk.models.sd import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from aitk.demo import draw_dataset

    folder = tmp_path_factory.mktemp("data") / "shapes"
    draw_dataset(folder)
    return folder


#: model.arch -> the tiny builder variant (build_tiny_model) that stands in for its model; every
#: registered arch has one (tests/test_adapter_bind.py checks)
TINY_VARIANT_OF_ARCH: dict[str, str] = {
    "sd1": "sd15", "sd15": "sd15", "sd2": "sd15", "sdxl": "sdxl",
    "flux": "dev", "flux_kontext": "kontext", "flex2": "flex2", "chroma": "chroma",
    "flux2": "flux2_dev", "flux2_klein_4b": "flux2_klein_4b", "flux2_klein_9b": "flux2_klein_9b",
    "wan21": "t2v", "wan21_i2v": "i2v", "wan22_14b": "22_t2v", "wan22_14b_i2v": "22_i2v",
    "wan22_5b": "22_5b",
    "sd3": "sd3_medium", "zimage": "zimage", "lumina2": "lumina2", "hidream": "hidream",
    "qwen_image": "qwen_image", "qwen_image_edit": "qwen_image_edit", "qwen_image_edit_plus": "qwen_image_edit_plus",
    "pixart": "pixart_alpha", "pixart_sigma": "pixart_sigma", "auraflow": "auraflow",
    "cogview4": "cogview4", "krea2": "krea2", "ernie_image": "ernie_image",
    "ltx2": "ltx2",
    "hunyuan_video_1_5": "hunyuan_video_1_5_t2v", "hunyuan_video_1_5_i2v": "hunyuan_video_1_5_i2v",
}


def build_tiny_model_for(arch: str, root: Path) -> Path:
    """The tiny model folder standing in for `arch`'s model under `root`."""
    return build_tiny_model(TINY_VARIANT_OF_ARCH[arch], root)


def build_tiny_model(variant: str, root: Path) -> Path:
    """The tiny random-init model of a builder variant under `root` (built once per folder):
    "sd15", "sdxl", FLUX's "dev" / "schnell" / "kontext", WAN's "t2v" / "i2v" / "22_t2v" / "22_i2v",
    "qwen_image"."""
    if variant == "sd15":
        from aitk.models.sd import build_tiny_sd15 as build
    elif variant == "sdxl":
        from aitk.models.sd import build_tiny_sdxl as build
    elif variant in ("dev", "schnell", "kontext"):
        from aitk.models.flux import build_tiny_flux

        return build_tiny_flux(root / f"flux_{variant}", variant)
    elif variant == "chroma":
        from aitk.models.chroma import build_tiny_chroma

        return build_tiny_chroma(root / "chroma")
    elif variant == "flex2":
        from aitk.models.flex2 import build_tiny_flex2

        return build_tiny_flex2(root / "flex2")
    elif variant == "zimage":
        from aitk.models.zimage import build_tiny_zimage

        return build_tiny_zimage(root / "zimage")
    elif variant in ("qwen_image_edit", "qwen_image_edit_plus"):
        from aitk.models.qwen_image_edit import build_tiny_qwen_image_edit

        return build_tiny_qwen_image_edit(root / variant, variant.removeprefix("qwen_image_"))
    elif variant == "qwen_image":
        from aitk.models.qwen_image import build_tiny_qwen_image

        return build_tiny_qwen_image(root / "qwen_image")
    elif variant == "lumina2":
        from aitk.models.lumina2 import build_tiny_lumina2

        return build_tiny_lumina2(root / "lumina2")
    elif variant == "hidream":
        from aitk.models.hidream import build_tiny_hidream

        return build_tiny_hidream(root / "hidream")
    elif variant in ("flux2_dev", "flux2_klein_4b", "flux2_klein_9b"):
        from aitk.models.flux2 import build_tiny_flux2

        return build_tiny_flux2(root / variant, variant.removeprefix("flux2_"))
    elif variant in ("krea2", "krea2_turbo"):
        from aitk.models.krea2 import build_tiny_krea2

        return build_tiny_krea2(root / variant, "turbo" if variant == "krea2_turbo" else "raw")
    elif variant == "cogview4":
        from aitk.models.cogview4 import build_tiny_cogview4

        return build_tiny_cogview4(root / "cogview4")
    elif variant in ("hunyuan_video_1_5_t2v", "hunyuan_video_1_5_i2v"):
        from aitk.models.hunyuan_video_1_5 import build_tiny_hunyuan_video_15

        return build_tiny_hunyuan_video_15(root / variant, variant.rsplit("_", 1)[1])
    elif variant == "ltx2":
        from aitk.models.ltx2 import build_tiny_ltx2

        return build_tiny_ltx2(root / "ltx2")
    elif variant == "ernie_image":
        from aitk.models.ernie_image import build_tiny_ernie_image

        return build_tiny_ernie_image(root / "ernie_image")
    elif variant in ("pixart_alpha", "pixart_sigma"):
        from aitk.models.pixart import build_tiny_pixart

        return build_tiny_pixart(root / variant, variant.removeprefix("pixart_"))
    elif variant == "auraflow":
        from aitk.models.auraflow import build_tiny_auraflow

        return build_tiny_auraflow(root / "auraflow")
    elif variant in ("sd3_large", "sd3_medium"):
        from aitk.models.sd3 import build_tiny_sd3

        return build_tiny_sd3(root / variant, variant.removeprefix("sd3_"))
    else:
        from aitk.models.wan import build_tiny_wan

        return build_tiny_wan(root / f"wan_{variant}", variant)
    return build(root / variant)


def deep_update(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = deep_update(result[key], value)
        else:
            result[key] = value
    return result


def base_process(model: Path, data: Path, training_folder: Path) -> dict[str, Any]:
    return {
        "type": "sd_trainer",
        "training_folder": str(training_folder),
        "device": "cpu",
        "trigger_word": "shp",
        "training_seed": 7,
        "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
        "save": {"dtype": "float32", "save_every": 1000, "max_step_saves_to_keep": 5},
        "datasets": [{"folder_path": str(data), "resolution": [64], "cache_latents": True}],
        "train": {"steps": 10, "batch_size": 2, "lr": 1e-3, "optimizer": "adamw"},
        "model": {"name_or_path": str(model)},
    }


def write_job(path: Path, name: str, process: dict[str, Any], meta: dict | None = None) -> Path:
    job = {"job": "extension", "config": {"name": name, "process": [process]}, "meta": meta or {}}
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


@pytest.fixture
def make_job(tiny_sd15: Path, shapes_dataset: Path, tmp_path: Path):
    """make_job(name, dataset={...}, **section_overrides) -> a job file training the tiny model.

    `dataset` updates the first dataset entry; other keyword arguments deep-update the process.
    """

    def build(name: str = "run", dataset: dict[str, Any] | None = None, **changes: Any) -> Path:
        process = deep_update(base_process(tiny_sd15, shapes_dataset, tmp_path / "out"), changes)
        process["datasets"][0].update(dataset or {})
        return write_job(tmp_path / f"{name}.yaml", name, process)

    return build
