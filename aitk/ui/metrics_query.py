"""Chart data from a metrics index: per expert, downsampled to a number of points keeping extremes,
optionally only what came after `since_step` or inside a step range.

Downsampling: the visible part of a series is cut into points/2 buckets and each bucket gives its
minimum and its maximum (in step order), so a spike survives any zoom level. Buckets made of whole
index blocks are answered from the block statistics (metrics_index.BLOCK lines each); only the
partial blocks at the edges are read value by value. The trend line is the mean of each of
`trend_points` equal buckets (default 50) over the same range.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from aitk.ui.metrics_index import ALL, BLOCK, Snapshot

DEFAULT_FIELDS = (
    "loss", "grad_norm", "gradient_stability", "gradient_stability_avg", "learning_rate",
    "linear_alpha", "conv_alpha", "phase_idx", "steps_in_phase", "loss_slope", "loss_r2", "loss_cv",
    "loss_samples", "step_time_s", "samples_per_s",
)
MAX_POINTS = 20000


@dataclass
class Buckets:
    """Per non-empty bucket: positions and values of min and max, sum and count, centre position."""

    low_at: np.ndarray
    low: np.ndarray
    high_at: np.ndarray
    high: np.ndarray
    total: np.ndarray
    count: np.ndarray
    centre: np.ndarray

    @staticmethod
    def join(parts: list["Buckets"]) -> "Buckets":
        parts = [p for p in parts if len(p.count)]
        if not parts:
            e = np.zeros(0, dtype=np.int64)
            return Buckets(e, e.astype(float), e, e.astype(float), e.astype(float), e, e)
        return Buckets(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                         ("low_at", "low", "high_at", "high", "total", "count", "centre")))

    def nonempty(self) -> "Buckets":
        keep = self.count > 0
        return Buckets(*(getattr(self, f)[keep] for f in
                         ("low_at", "low", "high_at", "high", "total", "count", "centre")))


def _raw_buckets(positions: np.ndarray, values: np.ndarray, nbuckets: int) -> Buckets:
    """Buckets of consecutive values (`positions` label them)."""
    n = len(values)
    if n == 0:
        return Buckets.join([])
    size = -(-n // max(1, nbuckets))
    nb = -(-n // size)
    grid = np.full(nb * size, np.nan)
    grid[:n] = values
    grid = grid.reshape(nb, size)
    labels = np.full(nb * size, -1, dtype=np.int64)
    labels[:n] = positions
    labels = labels.reshape(nb, size)
    finite = ~np.isnan(grid)
    lows = np.where(finite, grid, np.inf)
    highs = np.where(finite, grid, -np.inf)
    rows = np.arange(nb)
    lo_i, hi_i = lows.argmin(axis=1), highs.argmax(axis=1)
    count = finite.sum(axis=1)
    filled = np.minimum(size, n - rows * size)
    centre_i = (filled - 1) // 2
    return Buckets(
        labels[rows, lo_i], lows[rows, lo_i], labels[rows, hi_i], highs[rows, hi_i],
        np.where(finite, grid, 0.0).sum(axis=1), count, labels[rows, centre_i],
    ).nonempty()


def bucket_range(snap: Snapshot, field: str, series: int, a: int, b: int, nbuckets: int) -> Buckets:
    """Buckets over positions [a, b) of a series, from block statistics where buckets are large."""
    values = snap.fields[field]
    rows = snap.rows_of(series)

    def raw(lo: int, hi: int, nb: int) -> Buckets:
        positions = np.arange(lo, hi)
        return _raw_buckets(positions, values[positions if rows is None else rows[positions]], nb)

    n = b - a
    size = -(-n // max(1, nbuckets)) if n else 0
    blocks = snap.blocks.get((field, series))
    if blocks is None or size < 2 * BLOCK:
        return raw(a, b, nbuckets)
    per = -(-size // BLOCK)
    j0 = -(-a // BLOCK)
    j1 = min(b // BLOCK, len(blocks["low"]))
    if j1 <= j0:
        return raw(a, b, nbuckets)
    head = raw(a, j0 * BLOCK, 1)
    tail = raw(j1 * BLOCK, b, 1)
    nblocks = j1 - j0
    chunks = -(-nblocks // per)
    pad = chunks * per - nblocks

    def grid(name: str, fill: Any) -> np.ndarray:
        part = blocks[name][j0:j1]
        if pad:
            part = np.concatenate([part, np.full(pad, fill, dtype=part.dtype)])
        return part.reshape(chunks, per)

    low, high = grid("low", np.inf), grid("high", -np.inf)
    low_at, high_at = grid("low_at", 0), grid("high_at", 0)
    r = np.arange(chunks)
    lo_i, hi_i = low.argmin(axis=1), high.argmax(axis=1)
    starts = (j0 + r * per) * BLOCK
    ends = np.minimum(starts + per * BLOCK, j1 * BLOCK)
    middle = Buckets(
        low_at[r, lo_i], low[r, lo_i], high_at[r, hi_i], high[r, hi_i],
        grid("total", 0.0).sum(axis=1), grid("count", 0).sum(axis=1), (starts + ends - 1) // 2,
    ).nonempty()
    return Buckets.join([head, middle, tail])


def _floats(values: np.ndarray) -> list[float | None]:
    return [x if math.isfinite(x) else None for x in values.tolist()]


def _series_range(snap: Snapshot, series: int, lo: int | None, hi: int | None) -> tuple[int, int] | np.ndarray:
    """Positions of a series with lo <= step <= hi: a range (a, b) when steps ascend, as a run
    writes them; an explicit array of positions otherwise."""
    length = snap.length(series)
    if snap.steps_sorted:
        a = 0 if lo is None else snap.position_after(series, lo - 1)
        b = length if hi is None else snap.position_after(series, hi)
        return a, max(a, b)
    rows = snap.rows_of(series)
    steps = snap.steps if rows is None else snap.steps[rows]
    mask = np.ones(length, dtype=bool)
    if lo is not None:
        mask &= steps >= lo
    if hi is not None:
        mask &= steps <= hi
    return np.flatnonzero(mask)


def _steps_of(snap: Snapshot, series: int, positions: np.ndarray) -> list[int]:
    rows = snap.rows_of(series)
    return snap.steps[positions if rows is None else rows[positions]].tolist()


def one_series(snap: Snapshot, field: str, series: int, lo: int | None, hi: int | None,
               points: int, trend_points: int) -> dict[str, Any]:
    span = _series_range(snap, series, lo, hi)
    if isinstance(span, tuple):
        a, b = span
        # few enough values: every one of them (buckets of one), else min and max per bucket
        extremes = bucket_range(snap, field, series, a, b, max(1, b - a) if b - a <= points else points // 2)
        trend = bucket_range(snap, field, series, a, b, trend_points)
    else:  # unsorted steps (a hand-edited file): value by value
        rows = snap.rows_of(series)
        values = snap.fields[field][span if rows is None else rows[span]]
        extremes = _raw_buckets(span, values, len(span) if len(span) <= points else max(1, points // 2))
        trend = _raw_buckets(span, values, trend_points)
    pairs = np.stack([np.minimum(extremes.low_at, extremes.high_at),
                      np.maximum(extremes.low_at, extremes.high_at)], axis=1).reshape(-1)
    values = np.stack([np.where(extremes.low_at <= extremes.high_at, extremes.low, extremes.high),
                       np.where(extremes.low_at <= extremes.high_at, extremes.high, extremes.low)],
                      axis=1).reshape(-1)
    keep = np.concatenate(([True], pairs[1:] != pairs[:-1])) if len(pairs) else np.zeros(0, dtype=bool)
    pairs, values = pairs[keep], values[keep]
    means = trend.total / np.maximum(trend.count, 1)
    return {
        "field": field,
        "expert": None if series == ALL else snap.expert_names[series],
        "count": int(extremes.count.sum()),
        "step": _steps_of(snap, series, pairs),
        "value": _floats(values),
        "trend": {"step": _steps_of(snap, series, trend.centre), "value": _floats(means)},
    }


def query(
    snap: Snapshot,
    fields: list[str] | None = None,
    points: int = 1000,
    since_step: int | None = None,
    step_min: int | None = None,
    step_max: int | None = None,
    trend_points: int = 50,
) -> dict[str, Any]:
    """The metrics endpoint's answer. Series: every line (expert null) and, for multi-expert
    runs, each expert's lines; `latest` holds the last line of each (for the statistics cards)."""
    points = max(2, min(int(points), MAX_POINTS))
    trend_points = max(1, min(int(trend_points), points))
    lo = None if since_step is None else since_step + 1
    if step_min is not None:
        lo = step_min if lo is None else max(lo, step_min)
    wanted = [f for f in (fields or DEFAULT_FIELDS) if f in snap.fields]
    series_keys = [ALL, *range(len(snap.expert_names))]
    series_keys = [k for k in series_keys if k == ALL or k in snap.group_rows]
    out = [one_series(snap, f, k, lo, step_max, points, trend_points) for f in wanted for k in series_keys]
    latest: dict[str, Any] = {}
    if snap.n:
        last = {"all": snap.n - 1}
        for k in series_keys[1:]:
            last[snap.expert_names[k]] = int(snap.group_rows[k][-1])
        latest = dict(zip(last, snap.read_lines(list(last.values()))))
    return {
        "rows": snap.n,
        "first_step": int(snap.steps[0]) if snap.n else None,
        "last_step": int(snap.steps.max()) if snap.n else None,
        "experts": snap.expert_names,
        "fields": snap.available,
        "series": out,
        "transitions": snap.transitions,
        "latest": latest,
    }


def lines(snap: Snapshot, since_step: int | None, limit: int) -> list[dict[str, Any]]:
    """Raw lines after `since_step` (all from the start when None), at most `limit`, read through
    the byte offsets of the index (one contiguous read)."""
    if snap.n == 0:
        return []
    if since_step is None:
        first = 0
    elif snap.steps_sorted:
        first = snap.position_after(ALL, since_step)
    else:
        hits = np.flatnonzero(snap.steps > since_step)
        return snap.read_lines(hits[:limit])
    last = min(first + limit, snap.n)
    if first >= last:
        return []
    start = int(snap.offsets[first])
    end = int(snap.offsets[last]) if last < snap.n else None
    with open(snap.path, "rb") as handle:
        handle.seek(start)
        blob = handle.read(end - start) if end is not None else handle.read()
    out = []
    for line in blob.split(b"\n"):
        if len(out) >= last - first:
            break
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
