"""What each optimizer step reports, and how often.

- metrics_<name>.jsonl: every step (the web UI's charts and resume's truncation read it per step);
- the `logging.log_every` window: the progress bar's loss, W&B and, with `logging.verbose`, a line
  in log.txt get the window's mean (ai-toolkit logs every log_every steps too);
- `performance_log_every`: a timing line in log.txt with the mean of the last N steps' phases
  (the per-step phase fields are in the metrics records).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aitk.trainer.reporting import MetricsWriter
from aitk.trainer.step_timer import performance_line

#: record fields that describe the step's position rather than a measurement: the window keeps the last
LAST_VALUE_FIELDS = ("learning_rate", "gradient_stability_avg", "alpha_enabled")
NOT_LOGGED = ("step", "timestamp")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def window_values(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The values a log_every window reports: the mean of each measured number over the window
    (finite values only: a skipped non-finite step does not turn the mean into NaN), the last
    value of learning rates and other settings, samples/s as all samples over all time."""
    if not records:
        return {}
    last = records[-1]
    out: dict[str, Any] = {}
    for key, value in last.items():
        if key in NOT_LOGGED:
            continue
        measured = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
        if key in LAST_VALUE_FIELDS or key.startswith("lr_") or not measured:
            out[key] = value
            continue
        finite = [r[key] for r in records if _number(r.get(key))]
        out[key] = sum(finite) / len(finite) if finite else None
    times = [r["step_time_s"] for r in records if _number(r.get("step_time_s"))]
    rates = [r["samples_per_s"] for r in records if _number(r.get("samples_per_s"))]
    if len(times) == len(rates) == len(records) and sum(times) > 0:
        out["samples_per_s"] = sum(t * s for t, s in zip(times, rates)) / sum(times)
    out["steps_in_window"] = len(records)
    return out


class StepReporter:
    """Takes each step's metrics record (main process); writes, averages and logs it."""

    def __init__(
        self,
        *,
        metrics: MetricsWriter | None,
        log: Callable[[str], None],
        show_loss: Callable[[float | None, float | None], None],
        total_steps: int,
        log_every: int,
        verbose: bool,
        performance_every: int | None,
        wandb: Any = None,
    ) -> None:
        self.metrics = metrics
        self.log = log
        self.show_loss = show_loss
        self.total_steps = total_steps
        self.log_every = max(1, log_every)
        self.verbose = verbose
        self.performance_every = performance_every
        self.wandb = wandb
        self.window: list[dict[str, Any]] = []
        self.performance_window: list[dict[str, Any]] = []

    def step_done(self, record: dict[str, Any], completed: int) -> None:
        """`record` of the step that made `completed` steps done."""
        if self.metrics is not None:
            self.metrics.write(record)
        self.window.append(record)
        if completed % self.log_every == 0:
            self._report_window(completed)
        if self.performance_every:
            self.performance_window.append(record)
            if completed % self.performance_every == 0:
                self._report_performance(completed)

    def finish(self, completed: int) -> None:
        """The run ends (completed or stopped): a partial window still reports."""
        if self.window:
            self._report_window(completed)
        if self.performance_window:
            self._report_performance(completed)

    def previews(self, paths: list[Path], captions: list[str], step: int) -> None:
        if self.wandb is not None:
            self.wandb.log_previews(paths, captions, step)

    def _report_window(self, completed: int) -> None:
        values = window_values(self.window)
        count = len(self.window)
        self.window = []
        self.show_loss(values.get("loss"), values.get("learning_rate"))
        if self.wandb is not None:
            self.wandb.log_metrics(
                {k: v for k, v in values.items() if k != "expert"}, step=completed
            )
        if self.verbose:
            self.log(self._loss_line(values, completed, count))

    def _loss_line(self, values: dict[str, Any], completed: int, count: int) -> str:
        def fmt(key: str, spec: str) -> str:
            value = values.get(key)
            return "n/a" if value is None else format(value, spec)

        mean = f" (mean of {count} steps)" if count > 1 else ""
        expert = f", expert {values['expert']}" if values.get("expert") else ""
        return (
            f"step {completed}/{self.total_steps}: loss {fmt('loss', '.4f')}{mean}, lr {fmt('learning_rate', '.2e')}, "
            f"grad_norm {fmt('grad_norm', '.4f')}, {fmt('step_time_s', '.3f')} s/step{expert}"
        )

    def _report_performance(self, completed: int) -> None:
        records, self.performance_window = self.performance_window, []
        self.log(performance_line(records, completed - len(records) + 1, completed))
