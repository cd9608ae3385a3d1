"""Where each part of a loaded model lives while training, and every move between host and device.

Adapters load their parts on the host in the stored dtype (`ModelAdapter.load`); `Placement`
then brings them to the device part by part and block by block, so the device never holds more
than training will and the host never more than the weights as stored:

- a part is *resident* (on the device for the whole run) or *parked* (its frozen weights stay in
  host memory; `using(...)` copies them to the device for a while, e.g. text encoders for
  encoding, the VAE for latent caching and previews). Parked parts keep their host copy, so
  parking again only drops the device copy.
- quantization (`model.quantize`) happens block by block on the way: one block goes to the
  device, is quantized there and stays (or goes back to the host when it is offloaded or parked),
  so at most one block is on the device in full precision.
- layer offloading (`BlockOffloader`) holds a share of the repeated blocks on the host.
- an exclusive group (WAN 2.2's experts with `low_vram`): at most one member on the device; the
  other is parked and they swap when the other's forward runs (logged with the time it took).

Trainable parameters (the network, a full fine-tune) are always resident. Every byte moved is
counted in a `DeviceLedger`, which tests read: what would live on the GPU, on any machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from aitk.models.offload import (
    BlockOffloader,
    DeviceLedger,
    device_copy,
    same_data_key,
    frozen_tensors,
    get_entry,
    set_entry,
    tensor_bytes,
)

#: quantizes the Linear layers of a piece in place, given the piece's qualified name in its part
Quantizer = Callable[[nn.Module, str], int]


def pieces(root: nn.Module, blocks: list[nn.Module]) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of `blocks`, then of the largest submodules of `root` holding no
    block (embeddings, norms, heads): together they cover every parameter once. A root with no
    blocks is one piece ("")."""
    if not blocks:
        return [("", root)]
    block_ids = {id(b) for b in blocks}
    # modules that hold a block: every prefix of a block's qualified name
    holders: set[str] = set()
    for name, sub in root.named_modules():
        if id(sub) in block_ids:
            parts = name.split(".")
            holders.update(".".join(parts[:i]) for i in range(len(parts)))
    holder_ids = {id(sub) for name, sub in root.named_modules() if name in holders}
    named_blocks: list[tuple[str, nn.Module]] = []
    rest: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            qualified = f"{prefix}.{name}" if prefix else name
            if id(child) in block_ids:
                named_blocks.append((qualified, child))
            elif id(child) in holder_ids:
                walk(child, qualified)
            else:
                rest.append((qualified, child))

    walk(root, "")
    order = {id(b): i for i, b in enumerate(blocks)}
    return sorted(named_blocks, key=lambda item: order[id(item[1])]) + rest


@dataclass
class Part:
    """One placed module: resident or parked, and what sits on the device now."""

    name: str
    module: nn.Module
    resident: bool
    offloader: BlockOffloader | None = None
    # parked parts: (owner, kind, key) -> host master tensor
    host: dict[tuple[int, str, str], tuple[nn.Module, str, str, torch.Tensor]] = field(default_factory=dict)
    on_device: bool = False
    device_bytes: int = 0
    group: str | None = None


class Placement:
    """The moves of one run's model parts; see the module docstring."""

    def __init__(self, device: torch.device, ledger: DeviceLedger | None = None,
                 log: Callable[[str], None] = lambda _m: None) -> None:
        self.device = torch.device(device)
        self.ledger = ledger or DeviceLedger()
        self.log = log
        self.parts: dict[str, Part] = {}
        self.swaps = 0
        self.swap_seconds = 0.0

    # --- adding parts -------------------------------------------------------------------
    def add(
        self,
        name: str,
        module: nn.Module,
        *,
        resident: bool,
        blocks: list[nn.Module] | None = None,
        offload_share: float = 0.0,
        quantize: Quantizer | None = None,
        after_quantize: Callable[[], None] | None = None,
        group: str | None = None,
    ) -> Part:
        """Place `module` (on the host now): resident parts end on the device, parked ones on the
        host; quantized block by block on the way; `offload_share` of `blocks` offloaded.
        `after_quantize` runs once every piece is quantized, before offloading starts (e.g. to add
        a frozen adapter on the quantized layers, whose weights then move with their block)."""
        blocks = blocks or []
        on_device: dict[tuple[int, ...], torch.Tensor] = {}  # tied weights moved so far in this part
        part = Part(name, module, resident, group=group)
        self.parts[name] = part
        offloaded_blocks: set[int] = set()
        if offload_share > 0 and blocks:
            from aitk.models.offload import offloaded_indices

            offloaded_blocks = {id(blocks[i]) for i in offloaded_indices(len(blocks), offload_share)}
        moved_pieces: list[tuple[nn.Module, int]] = []  # (piece, bytes counted on the device)
        for prefix, piece in pieces(module, blocks):
            stays = resident and id(piece) not in offloaded_blocks
            if quantize is not None and any(isinstance(m, nn.Linear) for m in piece.modules()):
                # quantize on the device (fast), one piece at a time: at most one full-precision
                # piece is there besides what training keeps
                moved = self._move_frozen(piece, self.device)
                quantize(piece, prefix)
                self.ledger.remove(moved)
                counted = _frozen_bytes(piece) if stays else 0
                self.ledger.add(counted)
                if not stays:
                    self._move_frozen(piece, torch.device("cpu"), count=False)
            elif stays:
                counted = self._move_frozen(piece, self.device, seen=on_device)
            if stays:
                moved_pieces.append((piece, counted))
        if after_quantize is not None:
            after_quantize()
            for piece, counted in moved_pieces:  # weights it added (e.g. an adapter's) come along
                self.ledger.remove(counted)
                self._move_frozen(piece, self.device)
        if offloaded_blocks:
            part.offloader = BlockOffloader(module, blocks, offload_share, self.device, self.ledger, name)
            self.log(part.offloader.describe())
        skip = part.offloader.entry_keys if part.offloader else set()
        if resident:
            part.on_device = True
        else:
            for owner, kind, key in frozen_tensors(module):
                if (id(owner), kind, key) not in skip:
                    host = get_entry(owner, kind, key).detach()
                    part.host[(id(owner), kind, key)] = (owner, kind, key, host)
                    set_entry(owner, kind, key, self._parked(host))
        return part

    def move_trainable(self, parameters: list[nn.Parameter]) -> None:
        """Trainable parameters (made on the host next to their base weights) to the device."""
        for param in parameters:
            if param.device != self.device:
                param.data = param.data.to(self.device)

    # --- using parked parts ---------------------------------------------------------------
    def bring(self, name: str) -> None:
        part = self.parts.get(name)
        if part is None or part.on_device:
            return
        if part.group is not None:
            for other in self.parts.values():
                if other.group == part.group and other is not part and other.on_device:
                    self.park(other.name)
        nbytes = 0
        copies: dict[tuple[int, ...], torch.Tensor] = {}
        for owner, kind, key, host in part.host.values():
            tied = same_data_key(host)
            if tied not in copies:
                copies[tied] = device_copy(host, self.device)
                nbytes += tensor_bytes(host)
            set_entry(owner, kind, key, copies[tied])
        part.device_bytes = nbytes
        self.ledger.add(nbytes)
        part.on_device = True

    @staticmethod
    def _parked(host: torch.Tensor) -> torch.Tensor:
        """What a parked entry holds: its host copy (tests replace this to catch stray use)."""
        return host

    def park(self, name: str) -> None:
        part = self.parts.get(name)
        if part is None or part.resident or not part.on_device:
            return
        parked: dict[tuple[int, ...], torch.Tensor] = {}
        for owner, kind, key, host in part.host.values():
            tied = same_data_key(host)
            set_entry(owner, kind, key, parked.setdefault(tied, self._parked(host)))
        if part.offloader is not None:  # its blocks still on the device go too
            part.offloader.evict_all()
        self.ledger.remove(part.device_bytes)
        part.device_bytes = 0
        part.on_device = False

    @contextmanager
    def using(self, *names: str) -> Iterator[None]:
        """The named parts on the device inside the block; parked ones go back afterwards."""
        brought = [n for n in names if n in self.parts and not self.parts[n].on_device]
        for name in brought:
            self.bring(name)
        try:
            yield
        finally:
            for name in brought:
                self.park(name)

    def exclusive(self, names: list[str]) -> None:
        """At most one of `names` (parked parts of one group) on the device: each one's forward
        brings it and parks the others; the swap time is logged."""
        for name in names:
            part = self.parts[name]

            def before(_module: nn.Module, _args: Any, _name: str = name) -> None:
                if not self.parts[_name].on_device:
                    started = time.perf_counter()
                    self.bring(_name)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    took = time.perf_counter() - started
                    self.swaps += 1
                    self.swap_seconds += took
                    self.log(f"expert swap: {_name} onto the device in {took:.2f} s")

            part.module.register_forward_pre_hook(before)

    def release(self, name: str) -> None:
        """Forget a part whose module the adapter released (its host copies go with it)."""
        part = self.parts.pop(name, None)
        if part is None:
            return
        if part.offloader is not None:
            part.offloader.remove()
        if part.on_device:
            self.ledger.remove(part.device_bytes if not part.resident else _frozen_bytes(part.module))

    # --- moving ---------------------------------------------------------------------------
    def _move_frozen(self, module: nn.Module, device: torch.device, count: bool = True,
                     seen: dict[tuple[int, ...], torch.Tensor] | None = None) -> int:
        """Move `module`'s frozen parameters and buffers to `device`; returns their bytes (added
        to the ledger when moving to the device and `count`). Tied weights stay tied: a tensor
        already moved (in this module, or in `seen`: earlier pieces of the part) is reused, counted once."""
        seen = {} if seen is None else seen
        nbytes = 0
        for owner, kind, key in frozen_tensors(module):
            tensor = get_entry(owner, kind, key)
            tied = same_data_key(tensor)
            if tied in seen:
                set_entry(owner, kind, key, seen[tied])
                continue
            nbytes += tensor_bytes(tensor)
            moved = tensor.to(device) if tensor.device != device else tensor
            if moved is not tensor:
                set_entry(owner, kind, key, moved)
            seen[same_data_key(moved)] = seen[tied] = moved.detach()
        if count and device == self.device:
            self.ledger.add(nbytes)
        return nbytes


def _frozen_bytes(module: nn.Module) -> int:
    unique = {same_data_key(t): t for t in (get_entry(*entry) for entry in frozen_tensors(module))}
    return sum(tensor_bytes(t) for t in unique.values())
