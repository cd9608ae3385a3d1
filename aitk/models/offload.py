"""Layer offloading (block swap): a share of a model's repeated blocks lives in host memory.

One mechanism for every family: an adapter names its blocks (`ModelAdapter.offload_blocks`),
`BlockOffloader` decides which of them are offloaded and keeps them resident only while they
run. An offloaded block's frozen weights are kept in (pinned) host memory; just before the block
runs its copy is made on the device, and the next offloaded block in the direction of travel is
copied on a side stream meanwhile (forward: the next block, backward: the previous one), so the
copy overlaps compute. At most `WINDOW` offloaded blocks are on the device at any moment.

Backward needs the weights again. With gradient checkpointing the block's forward is run again
in backward (the pre-hook fetches it). Without, autograd would keep the device copies alive as
saved tensors until backward; a saved-tensor hook replaces each saved offloaded weight (or a
view of it) with a reference that fetches the block again when backward unpacks it.

Trainable parameters (LoRA weights, full fine-tunes) are never offloaded: the optimizer keeps
them and their state on the device.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: offloaded blocks on the device at any moment: the one running and the one being prefetched
WINDOW = 2


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a diffusers or transformers model, outermost first, in module order.

    Both libraries name them: diffusers' `_repeated_blocks` (the blocks regional compilation
    compiles) and `_no_split_modules` (what device maps never split), transformers'
    `_no_split_modules`. Embedding modules named there are left out (they run once).
    """
    names: set[str] = set()
    for attr in ("_repeated_blocks", "_no_split_modules"):
        names.update(getattr(module, attr, None) or ())
        if names:
            break
    names = {n for n in names if not n.endswith("Embeddings")}
    found: list[nn.Module] = []
    inside: set[int] = set()
    for _, sub in module.named_modules():
        if id(sub) in inside:
            for child in sub.children():
                inside.add(id(child))
            continue
        if type(sub).__name__ in names:
            found.append(sub)
            inside.update(id(child) for child in sub.children())
    return found


def offloaded_indices(count: int, share: float) -> list[int]:
    """Which of `count` blocks to offload for a share in [0, 1]: round(share * count) of them,
    spread evenly, so a resident block's compute hides the copy of the next offloaded one."""
    k = round(max(0.0, min(1.0, share)) * count)
    return [i for i in range(count) if (i + 1) * k // count > i * k // count]


def plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding a tensor's data: itself, or a quantized subclass's inner ones."""
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    if type(data) is torch.Tensor or not hasattr(data, "__tensor_flatten__"):
        return [data]
    names, _ = data.__tensor_flatten__()
    return [t for name in names for t in plain_tensors(getattr(data, name))]


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor's data takes, also for quantized tensor subclasses (their inner tensors)."""
    return sum(t.numel() * t.element_size() for t in plain_tensors(tensor))


def frozen_tensors(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(owner, "param" | "buffer", name) of every frozen parameter and buffer under `module`."""
    entries: list[tuple[nn.Module, str, str]] = []
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None and not param.requires_grad:
                entries.append((sub, "param", name))
        for name, buf in sub._buffers.items():
            if buf is not None:
                entries.append((sub, "buffer", name))
    return entries


def get_entry(owner: nn.Module, kind: str, name: str) -> torch.Tensor:
    return (owner._parameters if kind == "param" else owner._buffers)[name]


def set_entry(owner: nn.Module, kind: str, name: str, value: torch.Tensor) -> None:
    if kind == "param":
        owner._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[name] = value


def device_copy(tensor: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    """A new copy of `tensor` on `device`, also when it is there already (the CPU stands in for
    the GPU in tests). Quantized tensor subclasses refuse `copy=True`: moved, or cloned in place."""
    try:
        return tensor.to(device, non_blocking=non_blocking, copy=True)
    except (TypeError, RuntimeError):
        moved = tensor.to(device, non_blocking=non_blocking)
        return moved.clone() if moved is tensor else moved


def record_stream(tensor: torch.Tensor, stream: Any) -> None:
    """`Tensor.record_stream` for every plain tensor behind `tensor` (subclasses do not pass it on)."""
    for plain in plain_tensors(tensor):
        plain.record_stream(stream)


def same_data_key(tensor: torch.Tensor) -> tuple[int, ...]:
    """Equal for tensors over the same data (tied weights such as T5's shared embedding), so a
    move copies them once and they stay tied."""
    try:
        return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), *tensor.shape)
    except (RuntimeError, NotImplementedError, TypeError):
        return (id(tensor),)  # quantized subclasses: by object


def to_host(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """A host copy of `tensor`; pinned (page-locked) when a CUDA device will read it, so copies
    to the device can be asynchronous. Quantized subclasses that cannot be pinned stay pageable."""
    host = tensor.detach().to("cpu")
    if pin:
        try:
            host = host.pin_memory()
        except (RuntimeError, NotImplementedError, TypeError):
            pass
    return host


class DeviceLedger:
    """Bytes the placement code has put on the device, and the peak: what would live on the GPU.

    Every move of model weights to or from the device goes through `Placement` and
    `BlockOffloader`, which report here, so the figure is counted even on a CPU-only machine.
    """

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def add(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def remove(self, nbytes: int) -> None:
        self.current -= nbytes


@dataclass
class _Block:
    index: int  # position among all blocks (forward order)
    entries: list[tuple[nn.Module, str, str]]
    host: list[torch.Tensor] = field(default_factory=list)
    nbytes: int = 0
    resident: bool = False
    ready: Any = None  # CUDA event of a prefetch in flight


@dataclass(frozen=True)
class _SavedWeight:
    """Stands in for a saved offloaded weight (or a view of it) until backward unpacks it."""

    block: int
    position: int  # index into the block's entries
    view: tuple[tuple[int, ...], tuple[int, ...], int] | None  # size, stride, storage offset


class BlockOffloader:
    """Keeps the chosen blocks' frozen weights on the host; each comes to the device to run.

    `blocks`: the model's repeated blocks in forward order; `share`: the fraction offloaded;
    `root`: the module whose forward covers all blocks (the saved-tensor hook is installed
    around its forward).
    """

    def __init__(
        self,
        root: nn.Module,
        blocks: list[nn.Module],
        share: float,
        device: torch.device,
        ledger: DeviceLedger | None = None,
        name: str = "",
    ) -> None:
        self.device = torch.device(device)
        self.ledger = ledger or DeviceLedger()
        self.name = name
        self.block_count = len(blocks)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        chosen = offloaded_indices(len(blocks), share)
        self.blocks: list[_Block] = []
        self._by_module: dict[int, int] = {}
        for index in chosen:
            block = _Block(index, frozen_tensors(blocks[index]))
            # Offloading starts before the model is placed, so these are host tensors: they become
            # the (pinned) master copies the device copies are made from.
            hosts: dict[tuple[int, ...], torch.Tensor] = {}
            for entry in block.entries:
                value = get_entry(*entry)
                tied = same_data_key(value)
                if tied not in hosts:
                    hosts[tied] = to_host(value, self.cuda)
                    block.nbytes += tensor_bytes(value)
                block.host.append(hosts[tied])
            for entry, host in zip(block.entries, block.host):
                set_entry(*entry, self._parked(host))
            self._by_module[id(blocks[index])] = len(self.blocks)
            self.blocks.append(block)
        #: (id(owner), kind, name) of every offloaded entry: placement leaves these on the host
        self.entry_keys = {(id(o), k, n) for b in self.blocks for o, k, n in b.entries}
        # id of a device tensor -> (block, entry) and storage pointer -> (block, entry), for the
        # saved-tensor hook (only while the block is resident)
        self._device_ids: dict[int, tuple[int, int]] = {}
        self._device_storage: dict[int, tuple[int, int]] = {}
        self.resident_count = 0
        self.max_resident = 0
        self.fetches = 0
        #: performance_log_every: time the host->device copies (take_copy_seconds reads them)
        self.time_copies = False
        self._copy_seconds = 0.0
        self._copy_events: list[tuple[Any, Any]] = []  # CUDA: (start, end) on the copy stream
        self._handles = [blocks[b.index].register_forward_pre_hook(self._before_block) for b in self.blocks]
        self._hook_context: Any = None
        if self.blocks:
            self._handles.append(root.register_forward_pre_hook(self._enter_root))
            self._handles.append(root.register_forward_hook(self._exit_root, always_call=True))

    # --- what tests and the log read ----------------------------------------------------
    @property
    def offloaded_count(self) -> int:
        return len(self.blocks)

    @property
    def offloaded_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    def describe(self) -> str:
        return (
            f"{self.name}: {self.offloaded_count} of {self.block_count} blocks offloaded to host memory "
            f"({self.offloaded_bytes / 2**20:.0f} MiB), at most {min(WINDOW, self.offloaded_count)} on the "
            "device at a time"
        )

    def evict_all(self) -> None:
        for position in range(len(self.blocks)):
            self._evict(position)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.evict_all()

    # --- parking and fetching -----------------------------------------------------------
    @staticmethod
    def _parked(host: torch.Tensor) -> torch.Tensor:
        """What an evicted entry holds: its host master copy."""
        return host

    def _copy_in(self, position: int) -> None:
        block = self.blocks[position]
        if block.resident:
            return
        self.ledger.add(block.nbytes)
        stream = self.copy_stream
        context = torch.cuda.stream(stream) if stream is not None else nullcontext()
        copies: dict[tuple[int, ...], torch.Tensor] = {}
        timing = self._start_copy_timing() if self.time_copies else None
        with context:
            for i, ((owner, kind, key), host) in enumerate(zip(block.entries, block.host)):
                tied = same_data_key(host)
                copied = copies.get(tied)
                if copied is None:
                    copied = copies[tied] = device_copy(host, self.device, non_blocking=True)
                set_entry(owner, kind, key, copied)
                live = get_entry(owner, kind, key)
                self._device_ids[id(live)] = (position, i)
                self._remember_storage(copied, position, i)
            if stream is not None:
                block.ready = torch.cuda.Event()
                block.ready.record(stream)
        if timing is not None:
            self._end_copy_timing(timing)
        block.resident = True
        self.resident_count += 1
        self.max_resident = max(self.max_resident, self.resident_count)
        self.fetches += 1

    def _start_copy_timing(self) -> Any:
        """CUDA copies run on the side stream (overlapping compute): timed there by events, so
        timing does not stall the host; CPU copies are timed by the clock."""
        if self.copy_stream is None:
            return time.perf_counter()
        start = torch.cuda.Event(enable_timing=True)
        start.record(self.copy_stream)
        return start

    def _end_copy_timing(self, started: Any) -> None:
        if self.copy_stream is None:
            self._copy_seconds += time.perf_counter() - started
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(self.copy_stream)
        self._copy_events.append((started, end))

    def take_copy_seconds(self) -> float:
        """Seconds of host->device copies since the last call (waits for CUDA copies in flight)."""
        total, self._copy_seconds = self._copy_seconds, 0.0
        for start, end in self._copy_events:
            end.synchronize()
            total += start.elapsed_time(end) / 1000.0
        self._copy_events.clear()
        return total

    def _remember_storage(self, tensor: torch.Tensor, position: int, entry: int) -> None:
        try:
            self._device_storage[tensor.untyped_storage().data_ptr()] = (position, entry)
        except (RuntimeError, NotImplementedError, TypeError):
            pass  # tensor subclasses (quantized weights) have no storage of their own: ids suffice

    def _wait(self, position: int) -> None:
        block = self.blocks[position]
        if block.ready is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(block.ready)
        for owner, kind, key in block.entries:
            # made on the copy stream, used and freed on this one: the allocator must not reuse
            # the memory before this stream is done with it
            record_stream(get_entry(owner, kind, key), current)
        block.ready = None

    def _evict(self, position: int) -> None:
        block = self.blocks[position]
        if not block.resident:
            return
        for i, ((owner, kind, key), host) in enumerate(zip(block.entries, block.host)):
            live = get_entry(owner, kind, key)
            self._device_ids.pop(id(live), None)
            try:
                self._device_storage.pop(live.untyped_storage().data_ptr(), None)
            except (RuntimeError, NotImplementedError, TypeError):
                pass
            set_entry(owner, kind, key, self._parked(host))
        block.resident = False
        block.ready = None
        self.resident_count -= 1
        self.ledger.remove(block.nbytes)

    def fetch(self, position: int, direction: int) -> None:
        """Make block `position` resident (waiting for its prefetch), keep at most WINDOW
        offloaded blocks, and start copying the next one in `direction` (+1 forward, -1 backward)."""
        nxt = position + direction
        keep = {position} | ({nxt} if 0 <= nxt < len(self.blocks) else set())
        for other, block in enumerate(self.blocks):
            if block.resident and other not in keep:
                self._evict(other)
        self._copy_in(position)
        self._wait(position)
        if nxt in keep:
            self._copy_in(nxt)

    # --- hooks ----------------------------------------------------------------------------
    def _before_block(self, module: nn.Module, _args: Any) -> None:
        in_backward = torch._C._current_graph_task_id() != -1  # checkpoint recompute runs in backward
        self.fetch(self._by_module[id(module)], -1 if in_backward else 1)

    def _enter_root(self, _module: nn.Module, _args: Any) -> None:
        if torch.is_grad_enabled() and self._hook_context is None:
            self._hook_context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hook_context.__enter__()

    def _exit_root(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        if self._hook_context is not None:
            context, self._hook_context = self._hook_context, None
            context.__exit__(None, None, None)

    def _pack(self, tensor: torch.Tensor) -> Any:
        found = self._device_ids.get(id(tensor))
        if found is not None:
            return _SavedWeight(found[0], found[1], None)
        if type(tensor) is not torch.Tensor or not self._device_storage:
            return tensor
        try:
            found = self._device_storage.get(tensor.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            return tensor
        if found is None:
            return tensor
        return _SavedWeight(
            found[0], found[1], (tuple(tensor.size()), tuple(tensor.stride()), tensor.storage_offset())
        )

    def _unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _SavedWeight):
            return saved
        self.fetch(saved.block, -1)
        owner, kind, key = self.blocks[saved.block].entries[saved.position]
        tensor = get_entry(owner, kind, key)
        if saved.view is None:
            return tensor
        size, stride, offset = saved.view
        return tensor.detach().as_strided(size, stride, offset)

