"""Live bytes of the tensors a traced training step creates, by kind, and their peak.

The technique is torch.distributed._tools.mem_tracker.MemTracker's: a TorchDispatchMode sees
every op's outputs, each distinct storage is counted once when it appears and uncounted when it
is freed (a weakref finalizer), and what a storage is depends on when it appeared (forward:
activation, backward: workspace; a parameter's .grad: gradient). MemTracker itself is not used
because (1) it registers gradient hooks on every parameter of every module it sees and raises on
frozen ones ("cannot register a hook on a tensor that doesn't require gradient"), which is the
whole base model in LoRA training, and (2) it attributes every op's memory to every active module,
O(modules) per op, minutes for a FLUX-size step. This tracker keeps only what a plan needs.

FLOPs are counted here too, with torch.utils.flop_counter's own formulas, rather than by nesting
FlopCounterMode: its module tracking keeps tensors alive through backward (a FLUX step's
workspace measured 4x larger under it), and its table lacks the CPU flash-attention ops the
fake CPU step runs, which are given the CUDA flash kernels' formulas (same arguments).
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any

import torch
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


def flop_formulas() -> dict[Any, Any]:
    """torch.utils.flop_counter's formula table (what FlopCounterMode uses), with the CPU
    flash-attention ops given the CUDA flash kernels' formulas (same arguments)."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    formulas = dict(flop_registry)
    formulas[aten._scaled_dot_product_flash_attention_for_cpu] = flop_registry[aten._scaled_dot_product_flash_attention]
    formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = flop_registry[
        aten._scaled_dot_product_flash_attention_backward
    ]
    return formulas


ACTIVATIONS = "activations"
WORKSPACE = "workspace"
GRADIENTS = "gradients"


class StepMemoryTracker(TorchDispatchMode):
    """Counts storages created inside the mode; `phase` names what new ones are (set it to
    WORKSPACE before backward). `peak` is the most bytes alive at once, `at_peak` their kinds."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = ACTIVATIONS
        self.live: Counter[str] = Counter()
        self.peak = 0
        self.at_peak: dict[str, int] = {}
        self.flops = 0
        self._kinds: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> [kind, bytes]
        self._formulas = flop_formulas()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self._formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                self.track(leaf, self.phase)
        return out

    def track(self, tensor: torch.Tensor, kind: str) -> None:
        """Count `tensor`'s storages as `kind` unless they are counted already."""
        for storage in get_untyped_storages(tensor):
            if storage in self._kinds:
                continue
            entry = [kind, storage.nbytes()]
            self._kinds[storage] = entry
            weakref.finalize(storage, self._release, entry)
            self.live[kind] += entry[1]
            self._note_peak()

    def known(self, tensors: list[torch.Tensor]) -> None:
        """Storages that exist before the step (weights, network): never counted, so that a view of
        a weight made inside the step (F.linear's transpose) is not taken for a new tensor."""
        for tensor in tensors:
            for storage in get_untyped_storages(tensor):
                self._kinds.setdefault(storage, ["known", 0])

    def reclassify(self, tensor: torch.Tensor, kind: str) -> None:
        """Count `tensor`'s storages as `kind` from now on (a gradient made in backward)."""
        for storage in get_untyped_storages(tensor):
            entry = self._kinds.get(storage)
            if entry is not None and entry[0] == "known":
                continue
            if entry is None:
                self.track(tensor, kind)
            elif entry[0] != kind:
                self.live[entry[0]] -= entry[1]
                self.live[kind] += entry[1]
                entry[0] = kind

    def watch_gradients(self, params: list[torch.nn.Parameter]) -> list[Any]:
        """Count each parameter's .grad as a gradient once autograd has accumulated it."""
        return [p.register_post_accumulate_grad_hook(lambda p: self.reclassify(p.grad, GRADIENTS)) for p in params]

    def _release(self, entry: list[Any]) -> None:
        self.live[entry[0]] -= entry[1]

    def _note_peak(self) -> None:
        total = sum(self.live.values())
        if total > self.peak:
            self.peak = total
            self.at_peak = {k: v for k, v in self.live.items() if v}
