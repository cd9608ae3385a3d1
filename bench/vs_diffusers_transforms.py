"""A stand-in for the torchvision transforms diffusers' train_text_to_image_lora.py uses (Compose,
Resize, CenterCrop, RandomCrop, RandomHorizontalFlip, Lambda, ToTensor, Normalize and
InterpolationMode), for bench/vs_diffusers.py only: torchvision has no CPU build for our torch.
PIL and numpy do the same work the torchvision versions do on PIL images."""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"
    BOX = "box"
    HAMMING = "hamming"


_PIL_FILTERS = {
    "nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING,
}


class Compose:
    def __init__(self, steps: Sequence[Callable[[Any], Any]]) -> None:
        self.steps = list(steps)

    def __call__(self, value: Any) -> Any:
        for step in self.steps:
            value = step(value)
        return value


class Resize:
    """The shorter side to `size`, the aspect ratio kept."""

    def __init__(self, size: int, interpolation: InterpolationMode = InterpolationMode.BILINEAR) -> None:
        self.size, self.filter = size, _PIL_FILTERS[interpolation.value]

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        scale = self.size / min(w, h)
        return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), self.filter)


class CenterCrop:
    def __init__(self, size: int) -> None:
        self.size = size

    def _box(self, w: int, h: int) -> tuple[int, int]:
        return (w - self.size) // 2, (h - self.size) // 2

    def __call__(self, image: Image.Image) -> Image.Image:
        left, top = self._box(*image.size)
        return image.crop((left, top, left + self.size, top + self.size))


class RandomCrop(CenterCrop):
    def _box(self, w: int, h: int) -> tuple[int, int]:
        return random.randint(0, w - self.size), random.randint(0, h - self.size)


class RandomHorizontalFlip:
    def __call__(self, image: Image.Image) -> Image.Image:
        return image.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < 0.5 else image


class Lambda:
    def __init__(self, function: Callable[[Any], Any]) -> None:
        self.function = function

    def __call__(self, value: Any) -> Any:
        return self.function(value)


class ToTensor:
    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = mean[0], std[0]

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self.mean) / self.std
