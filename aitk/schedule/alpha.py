"""Alpha scheduling: phases of LoRA alpha that advance when the loss has plateaued.

Behaviour: docs/alpha-scheduling.md. The trainer builds one AlphaScheduler per process with
`AlphaScheduler.from_config`, calls `observe` after every optimizer step, applies `alphas()` to the
network when a Transition comes back, writes `metrics_fields()` into the metrics line and saves
`state_dict()` with each checkpoint. Nothing here touches torch, so `aitk schedule replay` can run
the same rule over a logged metrics file without a model.

Each expert (WAN 2.2 high_noise / low_noise; `None` for single-model training) has its own phase
list, phase position, loss window and stability EMA: one expert's plateau says nothing about the
other's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from aitk.config.schema import AlphaPhase, AlphaSchedule, ExpertAlphaSchedule, NetworkConfig
from aitk.schedule.stats import MIN_TREND_SAMPLES, WINDOW_SIZE, LossWindow, StabilityEMA

STATE_VERSION = 1
#: the phase maps, in precedence order when more than one is given
PHASE_KEYS = ("conv_alpha_phases", "alpha_phases", "linear_alpha_phases")
#: stands in when the schedule is enabled but lists no phases, so alphas() still answers
IMPLICIT_PHASE = "constant"
#: criterion names = the config keys a user would change (blocking_criteria, replay, banners)
CRITERIA = (
    "min_steps",
    "min_samples",
    "loss_improvement_rate_below",
    "min_gradient_stability",
    "max_loss_cv",
    "min_loss_r2",
)


def _first(*values: float | None) -> float | None:
    return next((float(v) for v in values if v is not None), None)


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def _deep_update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


@dataclass(frozen=True)
class Criteria:
    """A phase's exit criteria, resolved (min_samples already capped at the window size)."""

    plateau: float                    # T = loss_improvement_rate_below
    min_gradient_stability: float
    min_loss_r2: float | None
    max_loss_cv: float | None
    min_samples: int


@dataclass(frozen=True)
class Phase:
    """One phase of one expert with the alphas it puts in effect."""

    name: str
    linear_alpha: float
    conv_alpha: float | None
    min_steps: int
    criteria: Criteria
    configured_min_samples: int       # as written, for the warning when it exceeds the window


@dataclass
class Plan:
    """The phases one expert runs through and where they came from (for messages)."""

    source: str | None                # e.g. "alpha_schedule.per_expert.high_noise.alpha_phases"
    kind: str | None                  # which PHASE_KEYS entry; None for the implicit phase
    phases: list[Phase]
    ignored: list[str] = field(default_factory=list)  # phase maps given but not used


@dataclass
class Check:
    """One criterion of the transition rule evaluated now."""

    name: str
    passed: bool
    detail: str


@dataclass
class Transition:
    step: int
    expert: str | None
    from_phase: str
    to_phase: str
    old_linear: float
    new_linear: float
    old_conv: float | None
    new_conv: float | None
    steps_in_phase: int
    stats: dict

    def banner(self) -> str:
        """A block that stands out in a scrolling terminal and in log.txt."""
        rule = "=" * 72
        who = f" (expert {self.expert})" if self.expert is not None else ""
        lines = [
            rule,
            f"  ALPHA PHASE TRANSITION at step {self.step}{who}",
            f"  {self.from_phase} -> {self.to_phase} after {self.steps_in_phase} steps in {self.from_phase}",
            f"  linear alpha {self.old_linear:g} -> {self.new_linear:g}"
            + (f", conv alpha {_fmt(self.old_conv, 'g')} -> {_fmt(self.new_conv, 'g')}"
               if self.old_conv is not None or self.new_conv is not None else ""),
            "  criteria passed:",
        ]
        for name, detail in self.stats.get("criteria", {}).items():
            lines.append(f"    {name}: {detail}")
        lines.append(rule)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Transition":
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


class _ExpertState:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.phase_idx = 0
        self.steps_in_phase = 0
        self.window = LossWindow()
        self.stability = StabilityEMA()

    @property
    def phase(self) -> Phase:
        return self.plan.phases[self.phase_idx]

    @property
    def is_last(self) -> bool:
        return self.phase_idx >= len(self.plan.phases) - 1


class AlphaScheduler:
    """Phase state per expert and the transition rule (module docstring)."""

    def __init__(self, schedule: AlphaSchedule, network_cfg: NetworkConfig, experts: list[str] | None = None) -> None:
        self.schedule = schedule
        self.network_cfg = network_cfg
        self.experts = list(experts) if experts else None
        self.enabled = bool(schedule.enabled)
        self.total_steps = 0
        self.transition_history: list[Transition] = []
        self.load_warnings: list[str] = []
        self._states: dict[str | None, _ExpertState] = {}
        for name in self.experts or [None]:
            self._state(name)

    @classmethod
    def from_config(cls, network_cfg: NetworkConfig | None, experts: list[str] | None) -> "AlphaScheduler | None":
        """The scheduler of `network.alpha_schedule`; None when it is missing or disabled."""
        schedule = network_cfg.alpha_schedule if network_cfg is not None else None
        if schedule is None or not schedule.enabled:
            return None
        return cls(schedule, network_cfg, experts)

    # ------------------------------------------------------------------ plans

    def _plan(self, expert: str | None) -> Plan:
        """The expert's phases: its own phase map if per_expert gives one, else the global one.

        A per-expert phase map replaces the global list (its names and order win); inside a phase
        of the same name, keys the expert leaves out fall back to the global phase's keys.
        """
        schedule = self.schedule
        override: ExpertAlphaSchedule | None = (schedule.per_expert or {}).get(expert) if expert else None
        glob = [k for k in PHASE_KEYS if getattr(schedule, k)]
        own = [k for k in PHASE_KEYS if override is not None and getattr(override, k)]
        if own:
            kind = own[0]
            base: dict[str, AlphaPhase] = getattr(schedule, kind) or {}
            phases = {name: self._merged(base.get(name), p) for name, p in getattr(override, kind).items()}
            source = f"alpha_schedule.per_expert.{expert}.{kind}"
            ignored = [f"alpha_schedule.per_expert.{expert}.{k}" for k in own[1:]]
        elif glob:
            kind = glob[0]
            phases = dict(getattr(schedule, kind))
            source = f"alpha_schedule.{kind}"
            ignored = [f"alpha_schedule.{k}" for k in glob[1:]]
        else:
            kind, source, ignored = None, None, []
            phases = {IMPLICIT_PHASE: AlphaPhase()}
        linear_default = _first(override.linear_alpha if override is not None else None, schedule.linear_alpha)
        resolved = [self._resolve(name, p, kind, linear_default) for name, p in phases.items()]
        return Plan(source=source, kind=kind, phases=resolved, ignored=ignored)

    @staticmethod
    def _merged(base: AlphaPhase | None, own: AlphaPhase) -> AlphaPhase:
        if base is None:
            return own
        data = _deep_update(base.model_dump(exclude_unset=True), own.model_dump(exclude_unset=True))
        return AlphaPhase.model_validate(data)

    def _resolve(self, name: str, phase: AlphaPhase, kind: str | None, linear_default: float | None) -> Phase:
        net = self.network_cfg
        if kind == "conv_alpha_phases":
            conv = _first(phase.alpha, net.conv_alpha_value)
            linear = _first(phase.linear_alpha, linear_default, net.linear_alpha_value)
        else:
            # alpha_phases / linear_alpha_phases: `alpha` is the linear alpha (transformers have
            # no conv layers to schedule); conv layers, if any, keep network.conv_alpha.
            conv = net.conv_alpha_value
            linear = _first(phase.alpha, phase.linear_alpha, linear_default, net.linear_alpha_value)
        if net.conv_rank is None:
            conv = None  # no conv layers are wrapped: report no conv alpha rather than an inert one
        ec = phase.exit_criteria
        criteria = Criteria(
            plateau=float(ec.loss_improvement_rate_below),
            min_gradient_stability=float(ec.min_gradient_stability),
            min_loss_r2=ec.min_loss_r2,
            max_loss_cv=ec.max_loss_cv,
            # the window never holds more than WINDOW_SIZE losses, so a larger requirement could
            # never be met; it counts as a full window (and startup_warnings says so)
            min_samples=min(int(ec.min_samples), WINDOW_SIZE),
        )
        assert linear is not None  # network.linear_alpha_value always has a value
        return Phase(name, linear, conv, int(phase.min_steps), criteria, int(ec.min_samples))

    def _state(self, expert: str | None) -> _ExpertState:
        # Created on first use, so an expert the trainer did not announce still gets its schedule.
        state = self._states.get(expert)
        if state is None:
            state = self._states[expert] = _ExpertState(self._plan(expert))
        return state

    # ------------------------------------------------------------------ queries

    def phases(self, expert: str | None) -> list[Phase]:
        return list(self._state(expert).plan.phases)

    def plan(self, expert: str | None) -> Plan:
        return self._state(expert).plan

    def known_experts(self) -> list[str | None]:
        return list(self._states)

    def phase(self, expert: str | None) -> Phase:
        return self._state(expert).phase

    def alphas(self, expert: str | None) -> tuple[float, float | None]:
        """(linear_alpha, conv_alpha) in effect now for that expert; conv None without conv layers."""
        phase = self._state(expert).phase
        return phase.linear_alpha, phase.conv_alpha

    def checks(self, expert: str | None) -> list[Check]:
        """Every criterion of the current phase's exit rule as it stands now (spec rules 1-5)."""
        st = self._state(expert)
        phase, window = st.phase, st.window
        c = phase.criteria
        slope, r2, cv, n = window.slope, window.r2, window.cv, window.samples
        t = c.plateau
        out = [
            Check("min_steps", st.steps_in_phase >= phase.min_steps,
                  f"{st.steps_in_phase} steps in phase (needs >= {phase.min_steps})"),
            Check("min_samples", n >= c.min_samples, f"{n} losses in the window (needs >= {c.min_samples})"),
        ]
        if slope is None:
            out.append(Check("loss_improvement_rate_below", False,
                             f"slope undefined ({n} losses; needs {MIN_TREND_SAMPLES})"))
        else:
            out.append(Check("loss_improvement_rate_below", -t <= slope <= t,
                             f"slope {slope:+.3g}/step (needs between -{t:g} and {t:g})"))
        ema = st.stability.value
        if ema is None:
            out.append(Check("min_gradient_stability", True, "no stability values yet (criterion skipped)"))
        else:
            out.append(Check("min_gradient_stability", ema >= c.min_gradient_stability,
                             f"stability avg {ema:.3f} (needs >= {c.min_gradient_stability:g})"))
        if c.max_loss_cv is not None:
            out.append(Check("max_loss_cv", cv is not None and cv < c.max_loss_cv,
                             f"loss CV {_fmt(cv, '.3f')} (needs < {c.max_loss_cv:g})"))
        if c.min_loss_r2 is not None:
            # A confident trend, or a slope so flat that there is no trend for R² to measure.
            confident = r2 is not None and r2 >= c.min_loss_r2
            flat = slope is not None and abs(slope) <= t / 10
            why = "R² passes" if confident else ("flat: |slope| <= T/10" if flat else "neither holds")
            out.append(Check("min_loss_r2", confident or flat,
                             f"R² {_fmt(r2, '.3f')} (needs >= {c.min_loss_r2:g}) or |slope| "
                             f"{_fmt(abs(slope) if slope is not None else None, '.3g')} <= {t / 10:g}; {why}"))
        return out

    def blocking_criteria(self, expert: str | None) -> list[str]:
        """Names (config keys) of the criteria holding the current phase back; [] in the last phase."""
        if self._state(expert).is_last:
            return []
        return [c.name for c in self.checks(expert) if not c.passed]

    def metrics_fields(self, expert: str | None) -> dict[str, Any]:
        """The alpha fields of a metrics line (metrics.md); JSON-safe, None where undefined."""
        st = self._state(expert)
        linear, conv = self.alphas(expert)
        return {
            "alpha_enabled": True,
            "phase": st.phase.name,
            "phase_idx": st.phase_idx,
            "steps_in_phase": st.steps_in_phase,
            "conv_alpha": conv,
            "linear_alpha": linear,
            "loss_slope": st.window.slope,
            "loss_r2": st.window.r2,
            "loss_cv": st.window.cv,
            "loss_samples": st.window.samples,
            "gradient_stability_avg": st.stability.value,
        }

    # ------------------------------------------------------------------ the rule

    def observe(self, expert: str | None, step: int, loss: float, stability: float | None) -> Transition | None:
        """Record one optimizer step of `expert` and advance its phase when the rule says so."""
        st = self._state(expert)
        self.total_steps += 1
        st.steps_in_phase += 1
        st.window.add(step, loss)
        st.stability.update(stability)
        if st.is_last:
            return None
        checks = self.checks(expert)
        if not all(c.passed for c in checks):
            return None
        old = st.phase
        new = st.plan.phases[st.phase_idx + 1]
        transition = Transition(
            step=int(step), expert=expert, from_phase=old.name, to_phase=new.name,
            old_linear=old.linear_alpha, new_linear=new.linear_alpha,
            old_conv=old.conv_alpha, new_conv=new.conv_alpha,
            steps_in_phase=st.steps_in_phase,
            stats={
                "loss_slope": st.window.slope, "loss_r2": st.window.r2, "loss_cv": st.window.cv,
                "loss_samples": st.window.samples, "gradient_stability_avg": st.stability.value,
                "criteria": {c.name: c.detail for c in checks},
            },
        )
        st.phase_idx += 1
        st.steps_in_phase = 0
        st.window.reset()  # each phase proves its own plateau; the stability EMA carries on
        self.transition_history.append(transition)
        return transition

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable; floats survive json round trips exactly (repr), so resume is exact."""
        return {
            "version": STATE_VERSION,
            "enabled": self.enabled,
            "total_steps": self.total_steps,
            "experts": [
                {
                    "expert": name,
                    "phase_idx": st.phase_idx,
                    "phase": st.phase.name,
                    "steps_in_phase": st.steps_in_phase,
                    "window": st.window.state_dict(),
                    "stability": st.stability.state_dict(),
                }
                for name, st in self._states.items()
            ],
            "transition_history": [t.to_dict() for t in self.transition_history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output. If the job's phases changed since it was saved, a saved
        phase is found again by name, else its index is kept within range (see load_warnings)."""
        version = state.get("version", STATE_VERSION)
        if version != STATE_VERSION:
            raise ValueError(f"alpha scheduler state version {version} is not supported (expected {STATE_VERSION})")
        self.load_warnings = []
        self._states = {}
        for name in self.experts or [None]:
            self._state(name)
        for entry in state.get("experts", []):
            name = entry.get("expert")
            st = self._state(name)
            names = [p.name for p in st.plan.phases]
            idx, saved_name = int(entry.get("phase_idx", 0)), entry.get("phase")
            if saved_name is not None and saved_name in names:
                if names.index(saved_name) != idx:
                    self.load_warnings.append(
                        f"expert {name}: phase {saved_name!r} moved from position {idx} to {names.index(saved_name)}")
                idx = names.index(saved_name)
            elif saved_name is not None:
                clamped = min(max(idx, 0), len(names) - 1)
                self.load_warnings.append(
                    f"expert {name}: the saved phase {saved_name!r} is no longer in the schedule; "
                    f"continuing in {names[clamped]!r}")
                idx = clamped
            st.phase_idx = idx
            st.steps_in_phase = int(entry.get("steps_in_phase", 0))
            st.window.load_state_dict(entry.get("window", {}))
            st.stability.load_state_dict(entry.get("stability", {}))
        self.total_steps = int(state.get("total_steps", 0))
        self.transition_history = [Transition.from_dict(t) for t in state.get("transition_history", [])]

    # ------------------------------------------------------------------ start-up

    def startup_warnings(self, has_conv: bool, has_linear: bool) -> list[str]:
        """Problems worth a warning before training: phases that change nothing on this model,
        phase maps that are ignored, unreachable min_samples, per_expert names that match no expert."""
        out: list[str] = []

        def add(message: str) -> None:
            if message not in out:
                out.append(message)

        if self.experts and self.schedule.per_expert:
            for name in self.schedule.per_expert:
                if name not in self.experts:
                    add(f"alpha_schedule.per_expert.{name} matches no expert of this model "
                        f"({', '.join(self.experts)}); it is not used")
        for expert, st in self._states.items():
            plan = st.plan
            for key in plan.ignored:
                add(f"{key} is ignored because {plan.source} is also given; "
                    "put all phases in one map (conv_alpha_phases for conv alphas, alpha_phases for linear)")
            if plan.kind is None:
                add("alpha_schedule is enabled but lists no phases (conv_alpha_phases or alpha_phases), "
                    f"so the alphas stay at linear {plan.phases[0].linear_alpha:g}"
                    + (f", conv {plan.phases[0].conv_alpha:g}" if plan.phases[0].conv_alpha is not None else ""))
                continue
            for p in plan.phases[:-1]:
                if p.configured_min_samples > WINDOW_SIZE:
                    add(f"{plan.source}.{p.name}.exit_criteria.min_samples is {p.configured_min_samples}, but the "
                        f"loss window holds {WINDOW_SIZE} losses; it counts as {WINDOW_SIZE}")
            if len(plan.phases) == 1:
                add(f"{plan.source} has one phase ({plan.phases[0].name}); the last phase never exits, "
                    "so the alpha never changes; add a second phase")
                continue
            seen = {(p.linear_alpha if has_linear else None, p.conv_alpha if has_conv else None)
                    for p in plan.phases}
            if len(seen) > 1:
                continue
            if plan.kind == "conv_alpha_phases" and not has_conv:
                add(f"{plan.source} sets conv alphas, but no conv layer of this model is wrapped "
                    "(e.g. a transformer such as FLUX or WAN), so its phases change nothing. Fix: rename "
                    "conv_alpha_phases to alpha_phases, whose `alpha` sets the linear alpha"
                    + ("" if self.network_cfg.conv_rank is not None
                       else "; or, for a model with conv layers, set network.conv to train them (LoCon)"))
            elif plan.kind != "conv_alpha_phases" and not has_linear:
                add(f"{plan.source} sets linear alphas, but no linear layer of this model is wrapped, so its "
                    "phases change nothing. Fix: use conv_alpha_phases")
            else:
                p = plan.phases[0]
                add(f"every phase of {plan.source} puts the same alpha in effect (linear {p.linear_alpha:g}"
                    + (f", conv {p.conv_alpha:g}" if p.conv_alpha is not None else "")
                    + "), so transitions change nothing; give the phases different `alpha` values")
        return out

    def describe(self) -> list[str]:
        """One line per expert: its phases with their alphas and min_steps (replay, start-up log)."""
        lines = []
        for expert, st in self._states.items():
            who = f"expert {expert}" if expert is not None else "model"
            parts = []
            for i, p in enumerate(st.plan.phases):
                alphas = f"linear {p.linear_alpha:g}" + (f", conv {p.conv_alpha:g}" if p.conv_alpha is not None else "")
                last = i == len(st.plan.phases) - 1
                parts.append(f"{p.name} ({alphas}; {'last' if last else f'min_steps {p.min_steps}'})")
            lines.append(f"{who} [{st.plan.source or 'no phases'}]: " + " -> ".join(parts))
        return lines

