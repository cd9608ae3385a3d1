"""cache_text_embeddings frees the text encoders after caching; training and previews go on from
the cached embeddings, and previews match those rendered with the encoders present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import base_process, deep_update, write_job  # noqa: E402


def build(arch: str, root: Path) -> Path:
    if arch == "sd1":
        from aitk.models.sd import build_tiny_sd15

        return build_tiny_sd15(root / "sd15")
    if arch == "sdxl":
        from aitk.models.sd import build_tiny_sdxl

        return build_tiny_sdxl(root / "sdxl")
    if arch == "flux":
        from aitk.models.flux import build_tiny_flux

        return build_tiny_flux(root / "flux", "dev")
    from aitk.models.wan import build_tiny_wan

    return build_tiny_wan(root / "wan", "t2v")


def run(tmp_path: Path, data: Path, arch: str, name: str, cache: bool):
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    process = deep_update(base_process(build(arch, tmp_path.parent / "models"), data, tmp_path / "out"), {
        "model": {"arch": arch},
        "train": {"steps": 3, "cache_text_embeddings": cache},
        "sample": {"sample_every": 1000, "prompts": ["a red square [trigger]"], "neg": "blurry",
                   "sample_steps": 2, "width": 64, "height": 64, "num_frames": 1},
    })
    process["datasets"][0]["caption_dropout_rate"] = 0.3
    loaded = load_job_file(write_job(tmp_path / f"{name}.yaml", name, process))
    trainer = Trainer(loaded.job, loaded.job.config.process[0])
    return trainer, trainer.run()


def first_sample(result) -> np.ndarray:
    sample = sorted((result.output_dir / "samples").iterdir())[-1]
    if sample.suffix == ".jpg":
        return np.asarray(Image.open(sample), dtype=np.float32)
    with Image.open(sample.with_suffix(".webp")) as webp:
        return np.asarray(webp.convert("RGB"), dtype=np.float32)


@pytest.mark.parametrize("arch", ["sd1", "sdxl", "flux", "wan21"])
def test_text_encoders_are_released_and_previews_still_match(arch, shapes_dataset, tmp_path):
    data = tmp_path / "data"
    import shutil

    shutil.copytree(shapes_dataset, data, ignore=shutil.ignore_patterns("_*"))
    trainer, cached = run(tmp_path, data, arch, "cached", cache=True)
    assert cached.state == "completed"
    assert trainer.text_encoders_released
    assert all(getattr(trainer.adapter, n, None) is None for n in ("text_encoder", "text_encoder_2"))
    assert "text encoders released after caching" in (cached.output_dir / "log.txt").read_text()
    _, plain = run(tmp_path, data, arch, "plain", cache=False)
    # same seed, same weights path: the preview from cached embeddings equals the one encoded live
    assert np.abs(first_sample(cached) - first_sample(plain)).max() <= 2.0
