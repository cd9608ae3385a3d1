"""Fast reads of a run's metrics_<name>.jsonl for the charts (format: docs/outputs.md).

A MetricsIndex reads the file once, incrementally: it remembers how many bytes it has consumed and
keeps, per line, its byte offset, step, expert and phase (as small codes) and every numeric field
as a float64 column (NaN for null). A request only reads what was appended since the last one, so
a live run costs a few lines per poll. A 1,000,000-line file is parsed once, in the background and
in chunks: a request never waits for more than the registry's time budget and says
`complete: false` while the rest is being read.

For each field and each series (all lines, and each expert's lines) the index also keeps block
statistics over runs of BLOCK lines (min and max with their positions, sum, count), so a
downsampled chart of a million lines is computed from ~16,000 blocks instead of a million values
(see metrics_query.py).

A rewritten file (a resumed run drops the lines after its checkpoint, with a new inode; a fresh run
empties it) is noticed by its identity, its size and the bytes just before the consumed position,
and is read again from the start.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CHUNK_BYTES = 512 << 10  # about 1,000 lines: a request over its budget overshoots by one chunk at most
TAIL_CHECK = 64
BLOCK = 64
MAX_TRANSITIONS = 10000
_DECODER = json.JSONDecoder()
ALL = -2  # series key of "every line" (expert codes are >= 0, -1 = no expert)


class _Column:
    """A growable numpy column. Views handed out stay valid: growing allocates a new buffer, and
    rewrites only touch positions at or after the last (partial) block."""

    def __init__(self, dtype: Any, fill: Any) -> None:
        self.fill = fill
        self.buf = np.full(1024, fill, dtype=dtype)
        self.n = 0

    def put(self, start: int, values: np.ndarray) -> None:
        end = start + len(values)
        if end > len(self.buf):
            bigger = np.full(max(end, 2 * len(self.buf)), self.fill, dtype=self.buf.dtype)
            bigger[: self.n] = self.buf[: self.n]
            self.buf = bigger
        self.buf[start:end] = values
        self.n = max(self.n, end)

    def pad(self, n: int) -> None:
        if n > self.n:
            self.put(self.n, np.full(n - self.n, self.fill, dtype=self.buf.dtype))

    def view(self, n: int | None = None) -> np.ndarray:
        return self.buf[: self.n if n is None else n]


class _Blocks:
    """Per block of BLOCK consecutive values of one series: min/max (ignoring NaN) with their
    positions in the series, sum and count of the finite values."""

    def __init__(self) -> None:
        self.low = _Column(np.float64, np.inf)
        self.low_at = _Column(np.int64, 0)
        self.high = _Column(np.float64, -np.inf)
        self.high_at = _Column(np.int64, 0)
        self.total = _Column(np.float64, 0.0)
        self.count = _Column(np.int64, 0)

    def update(self, first_block: int, values: np.ndarray) -> None:
        """`values`: the series from position first_block * BLOCK to its end."""
        nb = -(-len(values) // BLOCK)
        if nb == 0:
            return
        padded = np.full(nb * BLOCK, np.nan)
        padded[: len(values)] = values
        grid = padded.reshape(nb, BLOCK)
        finite = ~np.isnan(grid)
        lows = np.where(finite, grid, np.inf)
        highs = np.where(finite, grid, -np.inf)
        lo_i = lows.argmin(axis=1)
        hi_i = highs.argmax(axis=1)
        rows = np.arange(nb)
        base = (first_block + rows) * BLOCK
        self.low.put(first_block, lows[rows, lo_i])
        self.low_at.put(first_block, base + lo_i)
        self.high.put(first_block, highs[rows, hi_i])
        self.high_at.put(first_block, base + hi_i)
        self.total.put(first_block, np.where(finite, grid, 0.0).sum(axis=1))
        self.count.put(first_block, finite.sum(axis=1))


@dataclass
class Snapshot:
    """A consistent view of the index at one moment (arrays are views; nothing is copied)."""

    path: Path
    n: int
    steps: np.ndarray
    offsets: np.ndarray
    expert: np.ndarray
    phase: np.ndarray
    fields: dict[str, np.ndarray]
    available: list[str]
    expert_names: list[str]
    phase_names: list[str]
    steps_sorted: bool
    group_rows: dict[int, np.ndarray]  # expert code -> rows of that expert, in file order
    blocks: dict[tuple[str, int], dict[str, np.ndarray]]  # (field, series) -> full blocks only
    transitions: list[dict[str, Any]]

    def rows_of(self, series: int) -> np.ndarray | None:
        """Rows of a series; None for ALL (row == position, nothing to look up)."""
        return None if series == ALL else self.group_rows[series]

    def length(self, series: int) -> int:
        return self.n if series == ALL else len(self.group_rows[series])

    def step_at(self, series: int, position: int) -> int:
        rows = self.rows_of(series)
        return int(self.steps[position if rows is None else rows[position]])

    def position_after(self, series: int, step: int) -> int:
        """First position in the series whose step is > `step` (steps ascending, as a run writes them)."""
        rows = self.rows_of(series)
        if rows is None:
            return int(np.searchsorted(self.steps, step, side="right"))
        steps = self.steps
        return bisect.bisect_right(range(len(rows)), step, key=lambda p: steps[rows[p]])

    def read_lines(self, rows: list[int] | np.ndarray) -> list[dict[str, Any]]:
        out = []
        with open(self.path, "rb") as handle:
            for row in rows:
                handle.seek(int(self.offsets[int(row)]))
                try:
                    out.append(json.loads(handle.readline()))
                except ValueError:
                    out.append({})
        return out


class MetricsIndex:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._data_lock = threading.Lock()  # held briefly: appending parsed rows, taking snapshots
        self._read_lock = threading.Lock()  # one reader of the file at a time
        self._reset(None)

    def _reset(self, identity: tuple[int, int] | None) -> None:
        self.identity = identity
        self.consumed = 0
        self.tail = b""
        self.rows = 0
        self.offsets = _Column(np.int64, 0)
        self.steps = _Column(np.int64, 0)
        self.expert = _Column(np.int16, -1)
        self.phase = _Column(np.int16, -1)
        self.fields: dict[str, _Column] = {}
        self.groups: dict[int, _Column] = {}
        self.blocks: dict[tuple[str, int], _Blocks] = {}
        self.expert_names: list[str] = []
        self.phase_names: list[str] = []
        self._codes: dict[tuple[str, str], int] = {}
        self.steps_sorted = True
        self.transitions: list[dict[str, Any]] = []
        self._last_phase: dict[int, int] = {}

    # ------------------------------------------------------------------------- reading
    def refresh(self, budget_s: float | None = None) -> bool:
        """Read what was appended. True when everything in the file (but a half-written last
        line) is indexed; False when the budget ran out or another thread is reading."""
        if not self._read_lock.acquire(blocking=False):
            return False
        try:
            return self._refresh(budget_s)
        finally:
            self._read_lock.release()

    def _refresh(self, budget_s: float | None) -> bool:
        deadline = None if budget_s is None else time.perf_counter() + budget_s
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            with self._data_lock:
                self._reset(None)
            return True
        with handle:
            st = os.fstat(handle.fileno())
            identity = (st.st_dev, st.st_ino)
            rewritten = identity != self.identity or st.st_size < self.consumed
            if not rewritten and self.tail:
                handle.seek(self.consumed - len(self.tail))
                rewritten = handle.read(len(self.tail)) != self.tail
            if rewritten:
                with self._data_lock:
                    self._reset(identity)
            while self.consumed < st.st_size:
                handle.seek(self.consumed)
                chunk = handle.read(min(CHUNK_BYTES, st.st_size - self.consumed))
                cut = chunk.rfind(b"\n")
                if cut < 0:
                    if len(chunk) == CHUNK_BYTES:  # a chunk without a newline is no metrics line: skip
                        self.consumed += len(chunk)
                        continue
                    break  # a line still being written: wait for its newline
                data = chunk[: cut + 1]
                self._ingest(data, self.consumed)
                self.consumed += len(data)
                self.tail = data[-TAIL_CHECK:]
                if deadline is not None and time.perf_counter() > deadline:
                    break
            if self.consumed >= st.st_size:
                return True
            handle.seek(self.consumed)
            return b"\n" not in handle.read(min(st.st_size - self.consumed, 1 << 16))

    def _code(self, kind: str, name: Any, names: list[str]) -> int:
        if name is None:
            return -1
        name = str(name)
        code = self._codes.get((kind, name))
        if code is None:
            code = self._codes[(kind, name)] = len(names)
            names.append(name)
        return code

    def _ingest(self, data: bytes, base: int) -> None:
        raw_lines = data.split(b"\n")[:-1]
        lengths = np.fromiter(map(len, raw_lines), dtype=np.int64, count=len(raw_lines)) + 1
        starts = base + np.concatenate(([0], np.cumsum(lengths)[:-1]))
        # The writer emits ASCII JSON; decoding the chunk once is faster than per line.
        lines: list[Any] = data.decode("ascii").split("\n")[:-1] if data.isascii() else raw_lines
        decode = _DECODER.raw_decode
        records: list[dict[str, Any]] = []
        kept: list[int] = []
        for i, line in enumerate(lines):
            try:
                record = decode(line)[0] if type(line) is str else json.loads(line)
            except ValueError:
                continue  # a damaged line (a crash mid-write) is skipped, not fatal
            if type(record) is dict and type(record.get("step")) is int:
                records.append(record)
                kept.append(i)
        if not records:
            return
        columns: dict[str, np.ndarray] = {}
        for key in set().union(*records) - {"step", "expert", "phase"}:
            column = [r.get(key) for r in records]
            first = next((v for v in column if v is not None), None)
            if type(first) is int or type(first) is float:  # bool and str are not chart values
                try:
                    columns[key] = np.array(column, dtype=np.float64)  # None -> NaN
                except (TypeError, ValueError):
                    columns[key] = np.array([v if type(v) in (int, float) else np.nan for v in column])
        steps = [r["step"] for r in records]
        experts = [self._code("expert", r.get("expert"), self.expert_names) for r in records]
        phases = [self._code("phase", r.get("phase"), self.phase_names) for r in records]
        with self._data_lock:
            self._append(steps, starts[kept], experts, phases, columns)

    def _append(self, steps: list[int], offsets: np.ndarray, experts: list[int], phases: list[int],
                columns: dict[str, np.ndarray]) -> None:
        start, count = self.rows, len(steps)
        step_array = np.asarray(steps, dtype=np.int64)
        expert_array = np.asarray(experts, dtype=np.int16)
        if np.any(step_array[1:] < step_array[:-1]) or (start and step_array[0] < self.steps.buf[start - 1]):
            self.steps_sorted = False
        self.steps.put(start, step_array)
        self.offsets.put(start, np.asarray(offsets, dtype=np.int64))
        self.expert.put(start, expert_array)
        self.phase.put(start, np.asarray(phases, dtype=np.int16))
        new_fields = []
        for key, values in columns.items():
            column = self.fields.get(key)
            if column is None:
                column = self.fields[key] = _Column(np.float64, np.nan)
                column.pad(start)
                new_fields.append(key)
            column.put(start, values)
        for column in self.fields.values():
            column.pad(start + count)
        # Rows of each expert; remember where each series grew so only its last blocks are redone.
        grew: dict[int, int] = {ALL: start}
        for code in np.unique(expert_array[expert_array >= 0]).tolist():
            group = self.groups.setdefault(code, _Column(np.int64, 0))
            grew[code] = group.n
            group.put(group.n, start + np.flatnonzero(expert_array == code))
        self._note_transitions(step_array, expert_array, np.asarray(phases, dtype=np.int16))
        self.rows = start + count
        for key, column in self.fields.items():
            values = column.view(self.rows)
            for series in (ALL, *self.groups):
                first = 0 if key in new_fields or (key, series) not in self.blocks else grew.get(series)
                if first is None:
                    continue  # this expert got no rows in this chunk
                blocks = self.blocks.setdefault((key, series), _Blocks())
                first_block = first // BLOCK
                lo = first_block * BLOCK
                if series == ALL:
                    blocks.update(first_block, values[lo:])
                else:
                    blocks.update(first_block, values[self.groups[series].view()[lo:]])

    def _note_transitions(self, steps: np.ndarray, experts: np.ndarray, phases: np.ndarray) -> None:
        """Phase changes per expert, kept as they are read: the first step of each new phase
        (spec: a line describes its step as trained, so the change shows on the next line)."""
        for code in np.unique(experts).tolist():
            idx = np.flatnonzero((experts == code) & (phases >= 0))
            if not len(idx):
                continue
            seq = phases[idx]
            previous = self._last_phase.get(code, int(seq[0]))
            chain = np.concatenate(([previous], seq))
            for c in np.flatnonzero(chain[1:] != chain[:-1]).tolist():
                if len(self.transitions) < MAX_TRANSITIONS:
                    self.transitions.append({
                        "step": int(steps[idx[c]]),
                        "expert": self.expert_names[code] if code >= 0 else None,
                        "from_phase": self.phase_names[chain[c]],
                        "to_phase": self.phase_names[chain[c + 1]],
                    })
            self._last_phase[code] = int(seq[-1])

    def snapshot(self, fields: list[str] | None = None) -> Snapshot:
        with self._data_lock:
            n = self.rows
            wanted = list(self.fields) if fields is None else [f for f in fields if f in self.fields]
            group_rows = {code: g.view() for code, g in self.groups.items()}
            blocks = {}
            for key in wanted:
                for series in (ALL, *self.groups):
                    b = self.blocks.get((key, series))
                    if b is None:
                        continue
                    full = (n if series == ALL else len(group_rows[series])) // BLOCK
                    blocks[(key, series)] = {
                        name: getattr(b, name).view(full)
                        for name in ("low", "low_at", "high", "high_at", "total", "count")
                    }
            return Snapshot(
                path=self.path, n=n, steps=self.steps.view(n), offsets=self.offsets.view(n),
                expert=self.expert.view(n), phase=self.phase.view(n),
                fields={f: self.fields[f].view(n) for f in wanted}, available=sorted(self.fields),
                expert_names=list(self.expert_names), phase_names=list(self.phase_names),
                steps_sorted=self.steps_sorted, group_rows=group_rows, blocks=blocks,
                transitions=list(self.transitions),
            )


class MetricsRegistry:
    """One index per metrics file (the most recently used few kept), and a background reader that
    finishes what a request's time budget left unread."""

    def __init__(self, keep: int = 16, budget_s: float = 0.05) -> None:
        self.keep = keep
        self.budget_s = budget_s
        self._indexes: OrderedDict[str, MetricsIndex] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aitk-metrics")
        self._pending: set[str] = set()

    def get(self, path: Path) -> MetricsIndex:
        key = str(Path(path).absolute())
        with self._lock:
            index = self._indexes.pop(key, None) or MetricsIndex(Path(key))
            self._indexes[key] = index
            while len(self._indexes) > self.keep:
                self._indexes.popitem(last=False)
            return index

    def fresh(self, path: Path) -> tuple[MetricsIndex, bool]:
        """The index of `path`, caught up as far as the time budget allows; (index, complete)."""
        index = self.get(path)
        complete = index.refresh(self.budget_s)
        if not complete:
            self._finish_later(index)
        return index, complete

    def _finish_later(self, index: MetricsIndex) -> None:
        key = str(index.path)
        with self._lock:
            if key in self._pending:
                return
            self._pending.add(key)

        def run() -> None:
            try:
                for _ in range(600):
                    if index.refresh(None):
                        break
                    time.sleep(0.05)  # another reader held the lock; try again
            finally:
                with self._lock:
                    self._pending.discard(key)

        self._pool.submit(run)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
