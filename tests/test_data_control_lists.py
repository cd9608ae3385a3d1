"""datasets[].control_path as a list of folders (Qwen-Image-Edit-2509's several control images per
sample): every folder's file of the same name, each cropped and flipped with its target, in the
list's order as (B, K, 3, H, W); an image missing from any folder is skipped; bad lists are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from aitk.config.schema import DatasetConfig
from aitk.data import DatasetError, TrainingData


def _solid(path: Path, value: int, w: int = 64, h: int = 48) -> None:
    Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8)).save(path)


def _folders(tmp_path: Path) -> tuple[Path, list[Path]]:
    images, controls = tmp_path / "images", [tmp_path / "c0", tmp_path / "c1"]
    for folder in (images, *controls):
        folder.mkdir()
    for i, name in enumerate(("a", "b", "c")):
        _solid(images / f"{name}.png", 10 * i)
        _solid(controls[0] / f"{name}.png", 100 + i)
        if name != "c":  # c has no second control image
            _solid(controls[1] / f"{name}.jpg" if name == "b" else controls[1] / f"{name}.png", 200 + i)
    return images, controls


def _data(cfg: DatasetConfig, logs: list[str]) -> TrainingData:
    return TrainingData([cfg], trigger_word=None, divisibility=16, batch_size=2, seed=0, rank=0, world_size=1,
                        log=logs.append)


def test_each_folder_gives_one_control_in_order(tmp_path: Path) -> None:
    images, controls = _folders(tmp_path)
    logs: list[str] = []
    td = _data(DatasetConfig(folder_path=str(images), control_path=[str(c) for c in controls], resolution=64,
                             flip_x=True), logs)
    assert td.reports[0].skipped["no control image"] == 1 and any("c.png" in line for line in logs)
    batch = td.next_batch()
    assert batch.controls is not None and batch.controls.shape == (2, 2, 3, *batch.pixels.shape[-2:])
    for key, sample in zip(batch.keys, batch.controls):
        i = "ab".index(key.split(":")[1][0])
        first, second = ((sample[0] + 1) * 127.5).round(), ((sample[1] + 1) * 127.5).round()
        assert first.unique().tolist() == [100 + i]  # control_path[0]'s file first
        assert (second - (200 + i)).abs().max() <= 2  # then control_path[1]'s (b's is a JPEG)


def test_one_folder_keeps_the_single_control_layout(tmp_path: Path) -> None:
    images, controls = _folders(tmp_path)
    for cfg in (DatasetConfig(folder_path=str(images), control_path=str(controls[0]), resolution=64),
                DatasetConfig(folder_path=str(images), control_path=[str(controls[0])], resolution=64)):
        batch = _data(cfg, []).next_batch()
        assert batch.controls is not None and batch.controls.shape == batch.pixels.shape  # (B, 3, H, W)


def test_bad_lists_and_missing_folders_are_refused(tmp_path: Path) -> None:
    images, controls = _folders(tmp_path)
    for bad in ([], ["", str(controls[0])]):
        with pytest.raises(ValidationError, match="list of folders"):
            DatasetConfig(folder_path=str(images), control_path=bad)
    with pytest.raises(DatasetError, match=r"control_path\[1\]"):
        _data(DatasetConfig(folder_path=str(images), control_path=[str(controls[0]), str(tmp_path / "nope")],
                            resolution=64), [])
