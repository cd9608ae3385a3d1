"""Diffusers module paths <-> a checkpoint's original layer names, for the families whose LoRA files
name layers `diffusion_model.<original path>` (what ComfyUI loads).

A family's keys.py describes its transformer once: the repeated block lists (diffusers list ->
original list, with one inner table diffusers path -> original path each) and the layers outside
the blocks. `OriginalNames` then answers both directions, the file-key stems and the default
targets; the family keeps only what is its own (fused weights, file recognition).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

PREFIX = "diffusion_model."


@dataclass(frozen=True)
class BlockList:
    """One repeated block list: `<diffusers>.N.<inner>` <-> `<original>.N.<names[inner]>`."""

    diffusers: str
    original: str
    names: Mapping[str, str]
    #: its layers are default LoRA targets (`OriginalNames.is_block_target`)
    default_target: bool = True


def _list_pattern(lists: Sequence[str]) -> re.Pattern[str]:
    return re.compile(rf"^({'|'.join(re.escape(name) for name in lists)})\.(\d+)\.(.+)$")


class OriginalNames:
    """The name tables of one transformer. `unnamed_error` is the ValueError message for a wrapped
    module without an original name; `{module!r}` stands for its diffusers path."""

    def __init__(
        self, blocks: Sequence[BlockList], other: Mapping[str, str], unnamed_error: str, prefix: str = PREFIX
    ) -> None:
        self.blocks = tuple(blocks)
        self.other = dict(other)
        self.unnamed_error = unnamed_error
        self.prefix = prefix
        self._by_diffusers = {b.diffusers: b for b in self.blocks}
        self._by_original = {b.original: (b, {v: k for k, v in b.names.items()}) for b in self.blocks}
        self._other_back = {v: k for k, v in self.other.items()}
        self._block = _list_pattern([b.diffusers for b in self.blocks])
        self._original_block = _list_pattern([b.original for b in self.blocks])

    def original_name(self, module_name: str) -> str | None:
        """The original path of a diffusers Linear layer, None if the original has no such layer."""
        if m := self._block.match(module_name):
            block = self._by_diffusers[m.group(1)]
            inner = block.names.get(m.group(3))
            return f"{block.original}.{m.group(2)}.{inner}" if inner else None
        return self.other.get(module_name)

    def lora_key_stem(self, module_name: str) -> str:
        """`<prefix><original path>` of one wrapped module; ValueError for a layer without one."""
        name = self.original_name(module_name)
        if name is None:
            raise ValueError(self.unnamed_error.format(module=module_name))
        return self.prefix + name

    def module_for_stem(self, stem: str) -> str | None:
        """Inverse of `lora_key_stem`: the diffusers module path of a key stem, None if none."""
        if not stem.startswith(self.prefix):
            return None
        rest = stem[len(self.prefix):]
        if m := self._original_block.match(rest):
            block, back = self._by_original[m.group(1)]
            inner = back.get(m.group(3))
            return f"{block.diffusers}.{m.group(2)}.{inner}" if inner else None
        return self._other_back.get(rest)

    def is_block_target(self, module_name: str) -> bool:
        """A named Linear inside a block list whose layers are default targets."""
        m = self._block.match(module_name)
        if not m:
            return False
        block = self._by_diffusers[m.group(1)]
        return block.default_target and m.group(3) in block.names

    def lora_candidates(self, transformer: torch.nn.Module) -> list[str]:
        """The default LoRA targets of `transformer`, in model order."""
        from aitk.networks.lora import eligible_modules

        return [name for name in eligible_modules(transformer) if self.is_block_target(name)]


def lora_down_up_pairs(
    tensors: Mapping[str, torch.Tensor], stem_matches: Callable[[str], object]
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(stem, down, up) of each 2-D LoRA in a file whose stem `stem_matches`, in kohya
    (`lora_down` / `lora_up`) or peft (`lora_A` / `lora_B`) names: for telling families apart by
    the shapes of a layer they name alike."""
    for key, down in tensors.items():
        stem = key.rsplit(".", 2)[0]
        if stem_matches(stem) and key.endswith((".lora_A.weight", ".lora_down.weight")):
            up = tensors.get(f"{stem}.lora_B.weight", tensors.get(f"{stem}.lora_up.weight"))
            if up is not None and down.dim() == 2:
                yield stem, down, up


#: diffusers' split q / k / v projections of the image and the text stream -> their part of a fused qkv
QKV_PARTS = {"to_q": "q", "to_k": "k", "to_v": "v"}
ADDED_QKV_PARTS = {"add_q_proj": "q", "add_k_proj": "k", "add_v_proj": "v"}
#: a FLUX-style double block's joint attention: diffusers path -> original path (q / k / v as parts
#: of the fused `img_attn.qkv` / `txt_attn.qkv`)
DOUBLE_BLOCK_ATTENTION = {
    **{f"attn.{name}": f"img_attn.qkv.{part}" for name, part in QKV_PARTS.items()},
    **{f"attn.{name}": f"txt_attn.qkv.{part}" for name, part in ADDED_QKV_PARTS.items()},
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
}
