"""`aitk schedule replay metrics.jsonl --config job.yaml`: when would this schedule have moved on?

Feeds a run's logged losses and gradient stabilities (metrics.md) through a fresh AlphaScheduler
built from a job's `network.alpha_schedule`, exactly as the trainer would have, and prints each
transition. For every expert that ends in a phase it never left, it counts, over the steps after
min_steps was reached, how often each criterion failed: the one that failed most is what held the
phase back. This answers "why does my run never change phase?" without retraining.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from aitk.schedule.alpha import CRITERIA, AlphaScheduler, Transition

EXIT_OK, EXIT_ERROR = 0, 1

#: what to change when a criterion holds a phase back (printed under the replay's verdict)
HINTS = {
    "min_samples": "too few finite losses reached the window (non-finite losses are skipped)",
    "loss_improvement_rate_below": "the loss still moves faster than T per step; raise "
                                   "loss_improvement_rate_below if that movement is noise",
    "min_gradient_stability": "the update signs flip too often; lower min_gradient_stability towards "
                              "the run's average",
    "max_loss_cv": "the loss is noisier than max_loss_cv allows; raise it or leave it unset",
    "min_loss_r2": "the trend is neither confident (R²) nor flat (|slope| <= T/10); lower min_loss_r2 "
                   "or leave it unset",
}


class ReplayError(Exception):
    """A problem with the replay's input; the message is complete and user-facing."""


@dataclass
class StepRecord:
    line: int
    step: int
    expert: str | None
    loss: float | None
    stability: float | None


@dataclass
class Holdup:
    """Criterion failure counts of one expert's current phase, after its min_steps passed."""

    steps_after_min: int = 0
    failures: Counter = field(default_factory=Counter)


@dataclass
class ReplayResult:
    scheduler: AlphaScheduler
    steps: int
    transitions: list[Transition]
    holdups: dict[str | None, Holdup]


def _number(value: Any) -> float | None:
    """A finite float, or None for null, missing, NaN or non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_metrics(path: str | Path) -> list[StepRecord]:
    """The steps of a metrics JSONL file. Raises ReplayError with the line number on bad input."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReplayError(f"{path}: file not found (looked for {p.absolute()}); give the run's "
                          "metrics_<name>.jsonl") from None
    except IsADirectoryError:
        raise ReplayError(f"{path}: is a folder; give the run's metrics_<name>.jsonl file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReplayError(f"{path}: cannot be read: {exc}") from None
    records: list[StepRecord] = []
    previous = -1
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ReplayError(f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise ReplayError(f"{path} line {number}: expected a JSON object (one metrics record per line)")
        step = obj.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            step = previous + 1  # the fork's older files lack `step`; the line order is the step order
        expert = obj.get("expert")
        records.append(StepRecord(
            line=number, step=step, expert=None if expert is None else str(expert),
            loss=_number(obj.get("loss")), stability=_number(obj.get("gradient_stability")),
        ))
        previous = step
    if not records:
        raise ReplayError(f"{path}: has no metrics lines; nothing to replay")
    if all(r.loss is None for r in records):
        raise ReplayError(f"{path}: no line has a numeric `loss`; is this a metrics_<name>.jsonl file?")
    return records


def replay(records: list[StepRecord], scheduler: AlphaScheduler) -> ReplayResult:
    """Run the records through `scheduler` (one observe per record, as the trainer does)."""
    holdups: dict[str | None, Holdup] = {}
    transitions: list[Transition] = []
    for r in records:
        transition = scheduler.observe(r.expert, r.step, r.loss if r.loss is not None else math.nan, r.stability)
        if transition is not None:
            transitions.append(transition)
            holdups[r.expert] = Holdup()  # a new phase starts with a clean count
            continue
        holdup = holdups.setdefault(r.expert, Holdup())
        fields = scheduler.metrics_fields(r.expert)
        is_last = fields["phase_idx"] == len(scheduler.phases(r.expert)) - 1
        if not is_last and fields["steps_in_phase"] >= scheduler.phase(r.expert).min_steps:
            holdup.steps_after_min += 1
            holdup.failures.update(scheduler.blocking_criteria(r.expert))
    return ReplayResult(scheduler, len(records), transitions, holdups)


def _alpha_text(linear_old: float, linear_new: float, conv_old: float | None, conv_new: float | None) -> str:
    text = f"linear {linear_old:g} -> {linear_new:g}"
    if conv_old is not None or conv_new is not None:
        text += f", conv {conv_old if conv_old is None else format(conv_old, 'g')} -> " \
                f"{conv_new if conv_new is None else format(conv_new, 'g')}"
    return text


def format_report(result: ReplayResult) -> list[str]:
    sched = result.scheduler
    lines = ["schedule:"] + [f"  {line}" for line in sched.describe()]
    lines.append(f"transitions ({len(result.transitions)}):" if result.transitions else "transitions: none")
    for t in result.transitions:
        who = f"expert {t.expert}: " if t.expert is not None else ""
        stats = t.stats
        lines.append(
            f"  step {t.step}: {who}{t.from_phase} -> {t.to_phase}, "
            f"{_alpha_text(t.old_linear, t.new_linear, t.old_conv, t.new_conv)} "
            f"(after {t.steps_in_phase} steps; slope {stats.get('loss_slope'):+.3g}/step, "
            f"stability avg {'n/a' if stats.get('gradient_stability_avg') is None else format(stats['gradient_stability_avg'], '.3f')})"
        )
    lines.append("at the end of the file:")
    for expert in sched.known_experts():
        fields = sched.metrics_fields(expert)
        phases = sched.phases(expert)
        phase = phases[fields["phase_idx"]]
        who = f"expert {expert}" if expert is not None else "model"
        where = f"{who}: in {phase.name} (phase {fields['phase_idx'] + 1} of {len(phases)}) for {fields['steps_in_phase']} steps"
        if fields["phase_idx"] == len(phases) - 1:
            lines.append(f"  {where}; the last phase, which never exits")
            continue
        lines.append(f"  {where}; it never exited")
        holdup = result.holdups.get(expert, None)
        if fields["steps_in_phase"] < phase.min_steps or holdup is None or not holdup.steps_after_min:
            lines.append(f"    held back by min_steps: {fields['steps_in_phase']} of {phase.min_steps} steps done")
        else:
            order = {name: i for i, name in enumerate(CRITERIA)}
            ranked = sorted(holdup.failures.items(), key=lambda kv: (-kv[1], order.get(kv[0], 99)))
            top, count = ranked[0]
            lines.append(f"    held back longest by {top}: failed {count} of the {holdup.steps_after_min} "
                         f"steps after min_steps ({phase.min_steps})")
            if top in HINTS:
                lines.append(f"      ({HINTS[top]})")
            if len(ranked) > 1:
                lines.append("    also failed: " + ", ".join(f"{n} ({c} steps)" for n, c in ranked[1:]))
        lines.append("    criteria now:")
        for check in sched.checks(expert):
            lines.append(f"      {'pass' if check.passed else 'FAIL'} {check.name}: {check.detail}")
    return lines


def _scheduler_for(config: str | Path, process_index: int, experts: list[str] | None) -> tuple[AlphaScheduler, list[str]]:
    from aitk.config.loader import JobFileError, load_job_file

    try:
        loaded = load_job_file(config)
    except JobFileError as exc:
        raise ReplayError(str(exc)) from None
    processes = loaded.job.config.process
    if not 0 <= process_index < len(processes):
        raise ReplayError(f"{config}: has {len(processes)} process entr{'y' if len(processes) == 1 else 'ies'}; "
                          f"--process {process_index} is out of range (use 0..{len(processes) - 1})")
    network = processes[process_index].network
    schedule = network.alpha_schedule if network is not None else None
    if schedule is None:
        raise ReplayError(f"{config} (process {process_index}): has no network.alpha_schedule, so there is no "
                          "schedule to replay; add one (see docs/alpha-scheduling.md)")
    if not schedule.enabled:
        raise ReplayError(f"{config} (process {process_index}): network.alpha_schedule is disabled "
                          "(enabled: false), so training keeps the alphas constant; set enabled: true to "
                          "replay what it would do")
    scheduler = AlphaScheduler.from_config(network, experts)
    assert scheduler is not None
    # Misspelt schedule keys (`min_step`) silently fall back to defaults and are a classic reason
    # for a surprising replay, so those loader warnings are shown; the job's others are not ours.
    warnings = [w for w in loaded.warnings if ".alpha_schedule" in w and "unknown key" in w]
    warnings += scheduler.startup_warnings(has_conv=network.conv_rank is not None, has_linear=True)
    if network.conv_rank is not None and any(
        scheduler.plan(e).kind == "conv_alpha_phases" for e in scheduler.known_experts()
    ):
        # Which modules get wrapped is only known once the model is built, which replay avoids.
        warnings.append("conv_alpha_phases change only wrapped conv layers; transformer models (FLUX, WAN) "
                        "have none, so there the phases change nothing unless they set linear_alpha: "
                        "use alpha_phases for them")
    return scheduler, warnings


def replay_command(metrics: str | Path, config: str | Path, process_index: int = 0,
                   out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The CLI entry: prints the report; 0 on success, 1 with a message (no traceback) on bad input."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        records = read_metrics(metrics)
        names = list(dict.fromkeys(r.expert for r in records if r.expert is not None))
        scheduler, warnings = _scheduler_for(config, process_index, names or None)
    except ReplayError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_ERROR
    for warning in warnings:
        print(f"warning: {warning}", file=err)
    result = replay(records, scheduler)
    print(f"replayed {result.steps} steps of {metrics} (steps {records[0].step}..{records[-1].step}) "
          f"through network.alpha_schedule of {config} (process {process_index})", file=out)
    skipped = sum(1 for r in records if r.loss is None)
    if skipped:
        print(f"note: {skipped} lines had no finite loss; they count as steps but add nothing to the window", file=out)
    for line in format_report(result):
        print(line, file=out)
    return EXIT_OK
