"""The next batch, loaded in a background thread while the current step runs.

Batches are drawn from the sampler in order on the caller's thread and loaded (decode, crop,
stack; pinned for the GPU) on one loader thread, one batch ahead. Every random choice of a draw
is seeded by (seed, epoch, sample index), so loading ahead changes no batch. The sampler runs one
batch ahead of what the trainer has consumed: `consumed_state` is the state a checkpoint saves,
and `reset` rewinds the sampler to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

_TENSOR_FIELDS = ("pixels", "latents", "loss_multiplier", "masks", "controls", "first_frames")


def pinned(batch: Any) -> Any:
    """The batch with its tensors in page-locked host memory, so that copies to the GPU can be
    asynchronous (`.to(device, non_blocking=True)`)."""
    changes = {}
    for name in _TENSOR_FIELDS:
        tensor = getattr(batch, name, None)
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and not tensor.is_pinned():
            changes[name] = tensor.pin_memory()
    return dataclasses.replace(batch, **changes) if changes else batch


class BatchesAhead:
    def __init__(self, sampler: Any, load: Callable[[int, list[int]], Any], *, pin_memory: bool) -> None:
        self._sampler = sampler
        self._load = load
        self._pin_memory = pin_memory
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aitk-prefetch")
        self._pending: tuple[dict, Future] | None = None  # (sampler state before its draw, its load)

    def _submit(self) -> tuple[dict, Future]:
        before = self._sampler.state_dict()
        epoch, entries = self._sampler.next()
        return before, self._executor.submit(self._load_one, epoch, entries)

    def _load_one(self, epoch: int, entries: list[int]) -> Any:
        batch = self._load(epoch, entries)
        return pinned(batch) if self._pin_memory else batch

    def next(self) -> Any:
        current = self._pending or self._submit()
        self._pending = self._submit()  # starts as soon as the loader thread is free
        return current[1].result()

    def consumed_state(self) -> dict | None:
        """The sampler's state after the batches handed out (None: nothing drawn ahead)."""
        return dict(self._pending[0]) if self._pending is not None else None

    def reset(self) -> None:
        """Drop the batch loaded ahead and rewind the sampler to what was handed out."""
        if self._pending is None:
            return
        before, future = self._pending
        self._pending = None
        if not future.cancel():
            future.exception()  # wait for it; its error, if any, belongs to a batch never used
        self._sampler.load_state_dict(before)

    def close(self) -> None:
        self.reset()  # the sampler's state stays what was handed out
        self._executor.shutdown(wait=False, cancel_futures=True)
