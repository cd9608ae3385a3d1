"""LoRA files for layers a family's diffusers model splits but its original checkpoint fuses.

Lumina 2's `attention.qkv` and FLUX.2's `img_attn.qkv` / `txt_attn.qkv` are one weight in the
original layout (and in ComfyUI's model), three Linear layers (q, k, v) in diffusers'. aitk trains
one LoRA per split layer. ComfyUI maps a LoRA key only onto a weight of its own model and skips
split names, so the comfyui layout writes each complete group as one LoRA on the fused weight:

    down  = [down_q; down_k; down_v]              (R = r_q + r_k + r_v rows)
    up    = blockdiag(up_q, up_k, up_v)            (rows_q + rows_k + rows_v, R)
    alpha = alpha_q * R / r_q                      (the parts' own alpha / rank)
    dora_scale = [m_q; m_k; m_v]                   (DoRA normalises each output row on its own)

up @ down is then exactly the three updates stacked, and so is DoRA's per-row normalisation.
That holds when the parts share one alpha / rank (always, unless alpha_pattern / rank_pattern
tell them apart); a group that does not, or misses a part, keeps its split names. LoKr cannot
fuse (a block-diagonal matrix is no Kronecker product), LoHa is not fused: both keep split names.

The header entry `aitk_fused_lora` records each fused group's parts ([stem, rows, rank, alpha]),
so that aitk reads the file back into the very same split tensors. Files fused by other tools
carry no record: the family's `FusedWeights.part_rows` gives the real model's rows per part; an up
that is block-diagonal for equal ranks splits into them, any other up into rank-R LoRAs that
share the fused down (exact as well, what diffusers' reader of original Lumina 2 files does),
which diffusers loads but an aitk network of rank r cannot take.

Families that fold alpha into the weights (aitk.networks.folded_alpha) fold each part first
(up * a / r, scale 1): the group then fuses whatever the parts' alpha / rank, the fused LoRA has
alpha R over rank R (no `.alpha` written) and the record gives each part alpha = rank. For parts
sharing a / r that is the same product as fusing first (alpha 3a over rank 3r) and folding a / r.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "FUSED_RECORD_KEY",
    "FusedFileError",
    "FusedWeights",
    "fuse_lora_tensors",
    "split_fused_lora",
    "fused_record",
]

#: header entry: JSON {fused stem: [[split stem, rows, rank, alpha], ...]} in the fused weight's row order
FUSED_RECORD_KEY = "aitk_fused_lora"
_DOWN = ("lora_A", "lora_down")
_UP = ("lora_B", "lora_up")


class FusedFileError(ValueError):
    """A fused LoRA group that cannot be read back into its split layers; the message says why."""


@dataclass(frozen=True)
class FusedWeights:
    """One family's fused weights: a fused key stem matches `pattern` in full; its split parts'
    stems are `<fused stem>.<part>` for `parts`, stacked in that order along the weight's rows.
    `part_rows(total rows)` gives the parts' rows for files without aitk's record (None: the
    parts are equal); it returns None for a size it does not know."""

    pattern: str
    parts: tuple[str, ...] = ("q", "k", "v")
    part_rows: Callable[[int], tuple[int, ...] | None] | None = None

    def fused_stem(self, stem: str) -> str | None:
        """The fused weight's stem of one split part's stem, None for any other stem."""
        base, _, part = stem.rpartition(".")
        return base if part in self.parts and re.fullmatch(self.pattern, base) else None

    def part_stems(self, fused_stem: str) -> tuple[str, ...] | None:
        if not re.fullmatch(self.pattern, fused_stem):
            return None
        return tuple(f"{fused_stem}.{p}" for p in self.parts)

    def rows(self, total: int) -> tuple[int, ...] | None:
        if self.part_rows is not None:
            return self.part_rows(total)
        n = len(self.parts)
        return (total // n,) * n if total % n == 0 else None


def _weight_keys(tensors: Mapping[str, torch.Tensor], stem: str) -> tuple[str, str] | None:
    for down, up in zip(_DOWN, _UP):
        if f"{stem}.{down}.weight" in tensors and f"{stem}.{up}.weight" in tensors:
            return f"{stem}.{down}.weight", f"{stem}.{up}.weight"
    return None


def _stems(tensors: Mapping[str, torch.Tensor]) -> set[str]:
    """Stems with a LoRA down / up pair (either naming)."""
    found = set()
    for key in tensors:
        for name in _DOWN:
            if key.endswith(f".{name}.weight"):
                found.add(key[: -len(f".{name}.weight")])
    return {s for s in found if _weight_keys(tensors, s)}


def fuse_lora_tensors(
    tensors: Mapping[str, torch.Tensor], fused: FusedWeights, *, fold_scales: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, list], dict[str, str]]:
    """(tensors with each complete group fused, the record of the fused groups, {fused stem: why
    it stayed split}). `fold_scales`: each up block scaled by its part's alpha / rank and alpha =
    R (scale 1: what readers that ignore `.alpha` need), so parts of different alpha / rank fuse
    too; exact for the update, but the record then gives each part alpha = rank."""
    out = dict(tensors)
    stems = _stems(tensors)
    record: dict[str, list] = {}
    left: dict[str, str] = {}
    for base in sorted({f for s in stems if (f := fused.fused_stem(s))}):
        parts = fused.part_stems(base) or ()
        missing = [p.rsplit(".", 1)[1] for p in parts if p not in stems]
        if missing:
            left[base] = f"no LoRA on {'/'.join(missing)}"
            continue
        keys = [_weight_keys(tensors, p) for p in parts]
        downs = [tensors[d] for d, _ in keys]  # type: ignore[misc]
        ups = [tensors[u] for _, u in keys]  # type: ignore[misc]
        ranks = [int(d.shape[0]) for d in downs]
        alphas = [float(tensors[f"{p}.alpha"].item()) if f"{p}.alpha" in tensors else float(r)
                  for p, r in zip(parts, ranks)]
        doras = [tensors.get(f"{p}.dora_scale") for p in parts]
        if any(d.dim() != 2 for d in downs) or any(u.dim() != 2 for u in ups):
            left[base] = "not a linear LoRA"
            continue
        if any(d is None for d in doras) and not all(d is None for d in doras):
            left[base] = "DoRA on some parts only"
            continue
        same = all(a * ranks[0] == alphas[0] * r for a, r in zip(alphas, ranks))
        if not same and not fold_scales:
            left[base] = f"the parts' alpha / rank differ ({', '.join(f'{a:g}/{r}' for a, r in zip(alphas, ranks))})"
            continue
        total = sum(ranks)
        up = torch.zeros(sum(int(u.shape[0]) for u in ups), total, dtype=ups[0].dtype)
        row = col = 0
        for u, r, a in zip(ups, ranks, alphas):
            up[row: row + u.shape[0], col: col + r] = (u.float() * (a / r)).to(u.dtype) if fold_scales else u
            row, col = row + int(u.shape[0]), col + r
        for p, (d, u) in zip(parts, keys):  # type: ignore[misc]
            for key in (d, u, f"{p}.alpha", f"{p}.dora_scale"):
                out.pop(key, None)
        down_name = keys[0][0][len(parts[0]) + 1:]  # type: ignore[index]
        up_name = keys[0][1][len(parts[0]) + 1:]  # type: ignore[index]
        out[f"{base}.{down_name}"] = torch.cat(downs, dim=0)
        out[f"{base}.{up_name}"] = up
        alpha = float(total) if fold_scales else alphas[0] * total / ranks[0]
        out[f"{base}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if doras[0] is not None:
            out[f"{base}.dora_scale"] = torch.cat(doras, dim=0)  # type: ignore[arg-type]
        record[base] = [[p, int(u.shape[0]), r, float(r) if fold_scales else a]
                        for p, u, r, a in zip(parts, ups, ranks, alphas)]
    return out, record, left


def fused_record(metadata: Mapping[str, str]) -> dict[str, list]:
    """The header's record of fused groups ({} when there is none)."""
    raw = metadata.get(FUSED_RECORD_KEY)
    if not raw:
        return {}
    try:
        record = json.loads(raw)
        return {str(k): [[str(s), int(n), int(r), float(a)] for s, n, r, a in v] for k, v in record.items()}
    except (ValueError, TypeError) as exc:
        raise FusedFileError(f"the header entry {FUSED_RECORD_KEY} is damaged ({exc}); the fused q/k/v LoRAs "
                             "cannot be split without it") from None


def _block_diagonal(up: torch.Tensor, rows: list[int], ranks: list[int]) -> bool:
    row = col = 0
    for n, r in zip(rows, ranks):
        band = up[row: row + n]
        if band[:, :col].any() or band[:, col + r:].any():
            return False
        row, col = row + n, col + r
    return True


def _plan(stem: str, tensors: Mapping[str, torch.Tensor], record: dict[str, list],
          fused: FusedWeights | None) -> tuple[list[str], list[int], list[int] | None, list[float] | None]:
    """(part stems, rows, ranks or None, alphas or None) of one fused stem."""
    if stem in record:
        entries = record[stem]
        return [e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries], [e[3] for e in entries]
    parts = fused.part_stems(stem) if fused else None
    total = int(tensors[_weight_keys(tensors, stem)[1]].shape[0])  # type: ignore[index]
    rows = fused.rows(total) if fused else None
    if not parts or not rows or len(rows) != len(parts) or sum(rows) != total:
        raise FusedFileError(
            f"{stem}: one LoRA for the fused weight of {total} rows, and the file does not say how those rows "
            "split into the model's separate layers (no aitk_fused_lora header, a size this family does not "
            "know); a file for another model size?"
        )
    return list(parts), list(rows), None, None


def split_fused_lora(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], fused: FusedWeights | None = None
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(the file's tensors with every fused group back as its split LoRAs, the fused stems split,
    those of them whose up is not block-diagonal: split into rank-R parts sharing the down). Groups
    come from the header's record, or from `fused` (the family's pattern) in files without one;
    other keys are kept."""
    record = fused_record(metadata)
    stems = _stems(tensors)
    lost = sorted(set(record) - stems)
    if lost:
        raise FusedFileError(f"the header lists fused q/k/v LoRAs the file does not hold (e.g. {lost[:2]}); "
                             "a damaged or edited file")
    targets = sorted(s for s in stems if s in record or (fused is not None and fused.part_stems(s) is not None))
    out = dict(tensors)
    shared: list[str] = []
    for stem in targets:
        parts, rows, ranks, alphas = _plan(stem, tensors, record, fused)
        down_key, up_key = _weight_keys(tensors, stem)  # type: ignore[misc]
        down, up = tensors[down_key], tensors[up_key]
        total = int(down.shape[0])
        alpha_key = f"{stem}.alpha"
        alpha = float(tensors[alpha_key].item()) if alpha_key in tensors else float(total)
        dora = tensors.get(f"{stem}.dora_scale")
        if up.dim() != 2 or up.shape[0] != sum(rows) or up.shape[1] != total:
            raise FusedFileError(f"{stem}: up of shape {tuple(up.shape)} does not match rows {rows} and rank {total}")
        if ranks is None and total % len(parts) == 0:
            ranks = [total // len(parts)] * len(parts)
            alphas = [alpha * r / total for r in ranks]
        compact = ranks is not None and sum(ranks) == total and _block_diagonal(up, rows, ranks)
        if not compact:
            shared.append(stem)
        for key in (down_key, up_key, alpha_key, f"{stem}.dora_scale"):
            out.pop(key, None)
        down_name, up_name = down_key[len(stem) + 1:], up_key[len(stem) + 1:]
        row = col = 0
        for i, (part, n) in enumerate(zip(parts, rows)):
            r = ranks[i] if compact else total  # type: ignore[index]
            cols = slice(col, col + r) if compact else slice(None)
            out[f"{part}.{down_name}"] = down[cols].clone()
            out[f"{part}.{up_name}"] = up[row: row + n, cols].clone()
            out[f"{part}.alpha"] = torch.tensor(alphas[i] if compact else alpha, dtype=torch.float32)  # type: ignore[index]
            if dora is not None:
                out[f"{part}.dora_scale"] = dora[row: row + n].clone()
            row, col = row + n, col + (r if compact else 0)
    return out, targets, shared
