"""Alpha scheduler: statistics, the transition rule, per-expert schedules, alphas, state, configs.

Everything runs on synthetic loss / stability streams; no model is built.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

import numpy as np
import pytest

from aitk.config.loader import parse_job_text
from aitk.config.schema import NetworkConfig
from aitk.schedule import AlphaScheduler, LossWindow, StabilityEMA, Transition, ols_slope_r2
from aitk.schedule.stats import coefficient_of_variation

# ---------------------------------------------------------------------------------------------
# helpers


def make(schedule: dict[str, Any], experts: list[str] | None = None, **network: Any) -> AlphaScheduler:
    net = {"type": "lora", "linear": 16, "linear_alpha": 16, **network}
    cfg = NetworkConfig.model_validate({**net, "alpha_schedule": {"enabled": True, **schedule}})
    scheduler = AlphaScheduler.from_config(cfg, experts)
    assert scheduler is not None
    return scheduler


def two_phases(min_steps: int = 100, **criteria: Any) -> dict[str, Any]:
    return {
        "alpha_phases": {
            "foundation": {"alpha": 8, "min_steps": min_steps, "exit_criteria": criteria},
            "emphasis": {"alpha": 20},
        }
    }


def run(scheduler: AlphaScheduler, losses, stability=0.8, expert: str | None = None, start: int = 0) -> list[Transition]:
    """Observe one loss per step; `stability` is a constant or a per-step sequence."""
    out = []
    for i, loss in enumerate(losses):
        stab = stability[i] if isinstance(stability, (list, tuple)) else stability
        t = scheduler.observe(expert, start + i, float(loss), stab)
        if t is not None:
            out.append(t)
    return out


FLAT = [0.25] * 1000

# ---------------------------------------------------------------------------------------------
# statistics


def test_ols_slope_r2_definitions():
    assert ols_slope_r2(list(range(19)), [1.0] * 19) == (None, None)  # below 20 samples
    assert ols_slope_r2(list(range(20)), [0.3] * 20) == (0.0, 0.0)    # constant: R² 0, not NaN
    steps = list(range(100, 160))
    slope, r2 = ols_slope_r2(steps, [2.0 - 0.01 * s for s in steps])
    assert slope == pytest.approx(-0.01) and r2 == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    y = 1.0 - 0.002 * np.arange(200) + rng.normal(0, 0.1, 200)
    slope, r2 = ols_slope_r2(list(range(200)), list(y))
    ref_slope, ref_icpt = np.polyfit(np.arange(200), y, 1)
    resid = y - (ref_slope * np.arange(200) + ref_icpt)
    assert slope == pytest.approx(ref_slope, rel=1e-9)
    assert r2 == pytest.approx(1 - resid @ resid / ((y - y.mean()) @ (y - y.mean())), rel=1e-9)


def test_loss_window_keeps_last_200_and_cv_over_last_50():
    w = LossWindow()
    for s in range(250):
        w.add(s, 1.0 + s)
    assert w.samples == 200 and w.steps[0] == 50 and w.losses[-1] == 250.0
    last50 = np.array([1.0 + s for s in range(200, 250)])
    assert w.cv == pytest.approx(last50.std() / last50.mean())  # population std
    assert not w.add(250, math.nan) and w.samples == 200          # non-finite losses are dropped
    w.reset()
    assert (w.samples, w.slope, w.r2, w.cv) == (0, None, None, None)
    assert coefficient_of_variation([0.5] * 30) == 0.0


def test_stability_ema_span_50():
    ema = StabilityEMA()
    assert ema.value is None
    assert ema.update(None) is None
    assert ema.update(0.6) == 0.6  # the first sample starts the average
    assert ema.update(0.9) == pytest.approx(0.6 + (2 / 51) * 0.3)
    ema.update(math.nan)
    assert ema.count == 2
    again = StabilityEMA()
    again.load_state_dict(json.loads(json.dumps(ema.state_dict())))
    assert (again.value, again.count, list(again.history)) == (ema.value, 2, [0.6, 0.9])


# ---------------------------------------------------------------------------------------------
# the transition rule


@pytest.mark.parametrize("min_steps,min_samples,expected", [(150, 100, 150), (30, 120, 120), (0, 20, 20), (0, 5, 20)])
def test_flat_loss_exits_at_max_of_min_steps_and_min_samples(min_steps, min_samples, expected):
    # (0, 5): the slope is undefined below 20 losses, so the plateau test cannot pass earlier.
    s = make(two_phases(min_steps, min_samples=min_samples))
    transitions = run(s, FLAT[:400])
    assert len(transitions) == 1
    t = transitions[0]
    assert (t.step, t.steps_in_phase, t.from_phase, t.to_phase) == (expected - 1, expected, "foundation", "emphasis")
    assert (t.old_linear, t.new_linear) == (8.0, 20.0)
    assert s.alphas(None) == (20.0, None)


def test_rising_and_fast_falling_loss_hold_slow_drift_passes():
    rising = make(two_phases(50, loss_improvement_rate_below=0.001))
    assert run(rising, [1.0 + 0.002 * i for i in range(600)]) == []
    assert rising.blocking_criteria(None) == ["loss_improvement_rate_below"]
    falling = make(two_phases(50, loss_improvement_rate_below=0.001))
    assert run(falling, [5.0 - 0.002 * i for i in range(600)]) == []
    assert falling.blocking_criteria(None) == ["loss_improvement_rate_below"]
    assert falling.metrics_fields(None)["loss_slope"] == pytest.approx(-0.002)
    # slower than T either way is a plateau: -T <= slope <= T
    for sign in (1, -1):
        drift = make(two_phases(50, loss_improvement_rate_below=0.001))
        assert [t.step for t in run(drift, [2.0 + sign * 0.0009 * i for i in range(600)])] == [99]


def test_gradient_stability_holds_and_is_skipped_without_values():
    low = make(two_phases(50, min_gradient_stability=0.55))
    assert run(low, FLAT[:500], stability=0.4) == []
    assert low.blocking_criteria(None) == ["min_gradient_stability"]
    unknown = make(two_phases(50, min_gradient_stability=0.55))
    assert [t.step for t in run(unknown, FLAT[:500], stability=None)] == [99]
    # the EMA, not the step's value, decides: stability jumps to 0.9 at step 100 and the EMA
    # crosses 0.55 at the step the closed form predicts
    rising = make(two_phases(50, min_gradient_stability=0.55))
    stab = [0.3] * 100 + [0.9] * 400
    a, ema, expected = 2 / 51, 0.3, None
    for i in range(100, 500):
        ema += a * (0.9 - ema)
        if ema >= 0.55:
            expected = i
            break
    assert [t.step for t in run(rising, FLAT[:500], stability=stab)] == [expected]


def test_min_steps_holds_a_plateau():
    s = make(two_phases(500))
    assert run(s, FLAT[:499]) == []
    assert s.blocking_criteria(None) == ["min_steps"]
    assert [t.step for t in run(s, FLAT[:1], start=499)] == [499]


def test_max_loss_cv():
    noisy = [1.0 + (0.2 if i % 2 else -0.2) for i in range(600)]  # CV 0.2, no trend
    held = make(two_phases(100, max_loss_cv=0.1))
    assert run(held, noisy) == []
    assert held.blocking_criteria(None) == ["max_loss_cv"]
    assert held.metrics_fields(None)["loss_cv"] == pytest.approx(0.2)
    passes = make(two_phases(100, max_loss_cv=0.25))
    assert [t.step for t in run(passes, noisy)] == [99]


def test_min_loss_r2_with_flat_escape():
    t_plateau = 0.001
    # no trend at all: R² is ~0 but |slope| <= T/10, so rule 5 passes (flat enough to call it)
    flat_noisy = [1.0 + (0.05 if i % 2 else -0.05) for i in range(600)]
    s = make(two_phases(100, loss_improvement_rate_below=t_plateau, min_loss_r2=0.5))
    assert [t.step for t in run(s, flat_noisy)] == [99]
    assert s.transition_history[0].stats["loss_r2"] < 0.5
    # a slow decline (within T, above T/10) buried in noise: R² ~0.25, no confident trend -> held
    noisy_drift = [1.0 - 0.0005 * i + (0.05 if i % 2 else -0.05) for i in range(600)]
    s = make(two_phases(100, loss_improvement_rate_below=t_plateau, min_loss_r2=0.5))
    assert run(s, noisy_drift) == []
    assert s.blocking_criteria(None) == ["min_loss_r2"]
    # the same decline without noise: R² 1 -> passes
    s = make(two_phases(100, loss_improvement_rate_below=t_plateau, min_loss_r2=0.5))
    assert [t.step for t in run(s, [1.0 - 0.0005 * i for i in range(600)])] == [99]


def test_last_phase_never_exits_and_window_resets():
    s = make({"conv_alpha_phases": {
        "foundation": {"alpha": 8, "min_steps": 100},
        "balance": {"alpha": 14, "min_steps": 0, "exit_criteria": {"min_samples": 50}},
        "emphasis": {"alpha": 20, "min_steps": 0, "exit_criteria": {"min_samples": 20}},
    }}, conv=8, conv_alpha=4)
    assert run(s, FLAT[:99]) == []
    [t1] = run(s, FLAT[:1], start=99)
    assert (t1.step, t1.old_conv, t1.new_conv) == (99, 8.0, 14.0)
    fields = s.metrics_fields(None)
    # a fresh window: the new phase must prove its own plateau with its own samples
    assert (fields["phase"], fields["steps_in_phase"], fields["loss_samples"], fields["loss_slope"]) == ("balance", 0, 0, None)
    assert fields["gradient_stability_avg"] == pytest.approx(0.8)  # the EMA carries on
    [t2] = run(s, FLAT[:200], start=100)
    assert (t2.step, t2.steps_in_phase, t2.old_conv, t2.new_conv) == (149, 50, 14.0, 20.0)
    assert run(s, FLAT * 3, start=300) == []  # emphasis is last: never exits
    assert s.blocking_criteria(None) == []
    assert s.metrics_fields(None)["phase_idx"] == 2 and len(s.transition_history) == 2


def test_non_finite_loss_counts_as_a_step_but_not_a_sample():
    s = make(two_phases(0, min_samples=100))
    assert run(s, [math.nan] * 10 + FLAT[:99]) == []
    assert s.metrics_fields(None)["loss_samples"] == 99
    assert [t.step for t in run(s, FLAT[:1], start=109)] == [109]


def test_transition_banner():
    s = make({"conv_alpha_phases": {"foundation": {"alpha": 8, "min_steps": 100}, "balance": {"alpha": 14}}},
             experts=["high_noise", "low_noise"], conv=8)
    [t] = run(s, FLAT[:100], expert="high_noise", start=1000)
    text = t.banner()
    for needed in ("step 1099", "expert high_noise", "foundation -> balance", "after 100 steps",
                   "linear alpha 16 -> 16", "conv alpha 8 -> 14", "loss_improvement_rate_below",
                   "min_gradient_stability", "min_samples"):
        assert needed in text, needed
    assert len(text.splitlines()) >= 6


# ---------------------------------------------------------------------------------------------
# experts


def test_experts_have_their_own_state():
    s = make(two_phases(100), experts=["high_noise", "low_noise"])
    alone = make(two_phases(100))  # low_noise's stream on its own, as the reference
    transitions, alone_steps = [], []
    # rotation every 10 steps: high_noise is flat, low_noise falls fast for its first 150 steps
    low_losses = [3.0 - 0.01 * i for i in range(150)] + [1.5] * 500
    lo = 0
    for step in range(1200):
        if (step // 10) % 2 == 0:
            t = s.observe("high_noise", step, 0.2, 0.8)
        else:
            t = s.observe("low_noise", step, low_losses[lo], 0.8)
            ref = alone.observe(None, step, low_losses[lo], 0.8)
            alone_steps += [ref.step] if ref else []
            lo += 1
        if t:
            transitions.append((t.expert, t.step))
    # each expert counts its own steps: high_noise's 100th step is global step 189; low_noise
    # moves exactly when its own stream alone would, long after high_noise
    assert len(alone_steps) == 1 and alone_steps[0] > 189 + 200
    assert transitions == [("high_noise", 189), ("low_noise", alone_steps[0])]
    assert s.alphas("high_noise") == s.alphas("low_noise") == (20.0, None)


def test_per_expert_overrides_fall_back_to_global_keys():
    s = make({
        "linear_alpha": 12,
        "conv_alpha_phases": {
            "foundation": {"alpha": 8, "min_steps": 100,
                           "exit_criteria": {"loss_improvement_rate_below": 0.005, "min_loss_r2": 0.01}},
            "balance": {"alpha": 14, "min_steps": 300},
            "emphasis": {"alpha": 20},
        },
        "per_expert": {
            "high_noise": {"linear_alpha": 10, "conv_alpha_phases": {
                "foundation": {"min_steps": 40, "exit_criteria": {"min_gradient_stability": 0.4, "min_samples": 30}},
                "emphasis": {"alpha": 24, "linear_alpha": 18},
            }},
        },
    }, experts=["high_noise", "low_noise"], conv=8, conv_alpha=6)
    hi, lo = s.phases("high_noise"), s.phases("low_noise")
    assert [p.name for p in hi] == ["foundation", "emphasis"]  # the expert's list and order win
    assert [p.name for p in lo] == ["foundation", "balance", "emphasis"]
    f = hi[0]
    assert (f.conv_alpha, f.linear_alpha, f.min_steps) == (8.0, 10.0, 40)  # alpha from global foundation
    assert (f.criteria.plateau, f.criteria.min_loss_r2, f.criteria.min_gradient_stability) == (0.005, 0.01, 0.4)
    assert (hi[1].conv_alpha, hi[1].linear_alpha) == (24.0, 18.0)
    assert (lo[0].conv_alpha, lo[0].linear_alpha, lo[0].min_steps) == (8.0, 12.0, 100)
    assert lo[0].criteria.min_gradient_stability == 0.55
    assert [t.step for t in run(s, FLAT[:200], expert="high_noise")] == [39]
    assert s.alphas("high_noise") == (18.0, 24.0) and s.alphas("low_noise") == (12.0, 8.0)


# ---------------------------------------------------------------------------------------------
# alphas


def test_alpha_fallback_chain_conv_phases():
    phases = {"a": {"alpha": 8, "linear_alpha": 12, "min_steps": 0, "exit_criteria": {"min_samples": 20}}, "b": {}}
    s = make({"conv_alpha_phases": phases, "linear_alpha": 10}, conv=4, conv_alpha=2)
    assert s.alphas(None) == (12.0, 8.0)      # the phase's linear_alpha and alpha
    run(s, FLAT[:20])
    assert s.alphas(None) == (10.0, 2.0)      # top-level linear_alpha, network.conv_alpha
    s = make({"conv_alpha_phases": phases}, conv=4, linear_alpha=None, linear=32)
    run(s, FLAT[:20])
    assert s.alphas(None) == (32.0, 4.0)      # network.linear_alpha (default: rank), conv rank
    s = make({"conv_alpha_phases": phases}, linear_alpha=None, alpha=7)
    assert s.alphas(None) == (12.0, None)     # no conv layers: no conv alpha
    run(s, FLAT[:20])
    assert s.alphas(None) == (7.0, None)      # network.alpha is linear_alpha's alias


@pytest.mark.parametrize("key", ["alpha_phases", "linear_alpha_phases"])
def test_alpha_phases_set_linear_alpha(key):
    warm = {"alpha": 4, "min_steps": 0, "exit_criteria": {"min_samples": 20}}
    s = make({key: {"warm": warm, "strong": {"alpha": 16}}}, conv=8, conv_alpha=3)
    assert s.alphas(None) == (4.0, 3.0)
    run(s, FLAT[:20])
    assert s.alphas(None) == (16.0, 3.0)
    assert s.startup_warnings(has_conv=False, has_linear=True) == []


def test_startup_warnings():
    conv_only = {"conv_alpha_phases": {"a": {"alpha": 8}, "b": {"alpha": 16}}}
    [w] = make(conv_only).startup_warnings(has_conv=False, has_linear=True)
    assert "change nothing" in w and "alpha_phases" in w and "network.conv" in w
    assert make(conv_only, conv=8).startup_warnings(has_conv=True, has_linear=True) == []
    # conv phases that also step the linear alpha do change something on a linear-only model
    with_linear = {"conv_alpha_phases": {"a": {"alpha": 8, "linear_alpha": 8}, "b": {"alpha": 16, "linear_alpha": 16}}}
    assert make(with_linear).startup_warnings(has_conv=False, has_linear=True) == []
    same = make({"alpha_phases": {"a": {"alpha": 8}, "b": {"alpha": 8}}}).startup_warnings(False, True)
    assert len(same) == 1 and "same alpha" in same[0]
    one = make({"alpha_phases": {"only": {"alpha": 8}}}).startup_warnings(False, True)
    assert len(one) == 1 and "one phase" in one[0]
    none = make({}).startup_warnings(False, True)
    assert len(none) == 1 and "no phases" in none[0]
    assert make({}).alphas(None) == (16.0, None)
    both = make({**conv_only, "alpha_phases": {"x": {"alpha": 4}, "y": {"alpha": 8}}}, conv=8)
    assert any("alpha_schedule.alpha_phases is ignored" in w for w in both.startup_warnings(True, True))
    big = make(two_phases(0, min_samples=500)).startup_warnings(False, True)
    assert any("min_samples is 500" in w and "counts as 200" in w for w in big)
    typo = make({**conv_only, "per_expert": {"hi_noise": {"linear_alpha": 4}}}, experts=["high_noise", "low_noise"], conv=8)
    assert any("per_expert.hi_noise matches no expert" in w for w in typo.startup_warnings(True, True))


def test_from_config_none_when_missing_or_disabled():
    assert AlphaScheduler.from_config(NetworkConfig(linear=4), None) is None
    off = NetworkConfig.model_validate({"linear": 4, "alpha_schedule": {"enabled": False, **two_phases()}})
    assert AlphaScheduler.from_config(off, None) is None
    assert AlphaScheduler.from_config(None, None) is None


# ---------------------------------------------------------------------------------------------
# state and metrics


def _stream(n: int, seed: int) -> list[tuple[str, float, float | None]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        expert = "high_noise" if (i // 7) % 2 == 0 else "low_noise"
        loss = 0.3 + 0.4 * math.exp(-i / 150) + rng.gauss(0, 0.02)
        out.append((expert, loss, None if i % 13 == 0 else 0.5 + 0.3 * rng.random()))
    return out


def test_state_round_trip_mid_phase_is_exact():
    schedule = {
        "conv_alpha_phases": {
            "foundation": {"alpha": 8, "min_steps": 120, "exit_criteria": {"loss_improvement_rate_below": 0.0005,
                                                                           "min_loss_r2": 0.05, "max_loss_cv": 0.5}},
            "balance": {"alpha": 14, "min_steps": 150, "exit_criteria": {"loss_improvement_rate_below": 0.0003}},
            "emphasis": {"alpha": 20},
        },
    }
    stream = _stream(1400, seed=3)
    whole = make(schedule, experts=["high_noise", "low_noise"], conv=8)
    reference = []
    for step, (expert, loss, stab) in enumerate(stream):
        t = whole.observe(expert, step, loss, stab)
        reference.append((t.to_dict() if t else None, whole.metrics_fields(expert)))
    assert len(whole.transition_history) >= 2  # the resume point below lies between transitions

    cut = 500
    first = make(schedule, experts=["high_noise", "low_noise"], conv=8)
    for step, (expert, loss, stab) in enumerate(stream[:cut]):
        first.observe(expert, step, loss, stab)
    saved = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    assert saved["total_steps"] == cut and {e["expert"] for e in saved["experts"]} == {"high_noise", "low_noise"}
    assert any(0 < e["steps_in_phase"] for e in saved["experts"])
    resumed = make(schedule, experts=["high_noise", "low_noise"], conv=8)
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == first.state_dict()
    for step, (expert, loss, stab) in enumerate(stream[cut:], start=cut):
        t = resumed.observe(expert, step, loss, stab)
        assert ((t.to_dict() if t else None), resumed.metrics_fields(expert)) == reference[step], step
    assert resumed.state_dict() == whole.state_dict()


def test_load_state_with_renamed_phases_warns():
    s = make(two_phases(0, min_samples=20))
    assert len(run(s, FLAT[:30])) == 1
    state = s.state_dict()
    renamed = make({"alpha_phases": {"warmup": {"alpha": 8}, "main": {"alpha": 20}}})
    renamed.load_state_dict(state)
    assert renamed.metrics_fields(None)["phase"] == "main" and renamed.load_warnings
    with pytest.raises(ValueError, match="version"):
        renamed.load_state_dict({**state, "version": 99})


def test_metrics_fields_are_json_safe():
    s = make(two_phases(0, max_loss_cv=0.5, min_loss_r2=0.2), experts=["high_noise"], conv=4)
    fields = s.metrics_fields("high_noise")
    assert set(fields) >= {"phase", "phase_idx", "steps_in_phase", "conv_alpha", "linear_alpha", "loss_slope",
                           "loss_r2", "loss_cv", "loss_samples", "gradient_stability_avg"}
    json.dumps(fields, allow_nan=False)
    for i, (loss, stab) in enumerate([(0.0, None), (math.nan, math.nan), (math.inf, 0.5)] + [(0.0, 0.5)] * 40):
        s.observe("high_noise", i, loss, stab)
        fields = s.metrics_fields("high_noise")
        json.dumps(fields, allow_nan=False)
        assert all(v is None or isinstance(v, (bool, int, float, str)) for v in fields.values())
    assert fields["loss_cv"] is not None and fields["loss_r2"] == 0.0
    json.dumps(s.state_dict(), allow_nan=False)


# ---------------------------------------------------------------------------------------------
# the fork's configs

WAN22_I2V = """\
job: extension
config:
  name: wan22_i2v_motion
  process:
    - type: sd_trainer
      training_folder: output
      device: cuda:0
      trigger_word: mtn
      network:
        type: lora
        linear: 32
        linear_alpha: 32
        conv: 16
        conv_alpha: 16
        alpha_schedule:
          enabled: true
          linear_alpha: 32
          conv_alpha_phases:
            foundation:
              alpha: 8
              min_steps: 2000
              exit_criteria:
                loss_improvement_rate_below: 0.005
                min_gradient_stability: 0.50
                min_loss_r2: 0.01
            balance:
              alpha: 14
              min_steps: 3000
              exit_criteria:
                loss_improvement_rate_below: 0.005
                min_gradient_stability: 0.50
                min_loss_r2: 0.01
            emphasis:
              alpha: 20
              min_steps: 2000
          per_expert:
            high_noise:
              conv_alpha_phases:
                foundation:
                  alpha: 8
                  min_steps: 1500
                  exit_criteria:
                    loss_improvement_rate_below: 0.008
                    min_gradient_stability: 0.45
                balance:
                  alpha: 14
                  min_steps: 2500
                emphasis:
                  alpha: 20
            low_noise:
              conv_alpha_phases:
                foundation: {alpha: 8, min_steps: 2500}
                balance: {alpha: 14, min_steps: 3500}
                emphasis: {alpha: 20}
      save: {dtype: bf16, save_every: 500, max_step_saves_to_keep: 4}
      datasets:
        - folder_path: /data/clips
          caption_ext: txt
          resolution: [512]
          num_frames: 33
          do_i2v: true
          cache_latents_to_disk: true
      train:
        batch_size: 1
        steps: 10000
        gradient_accumulation: 1
        train_unet: true
        train_text_encoder: false
        gradient_checkpointing: true
        noise_scheduler: flowmatch
        optimizer: automagic
        lr: 1e-5
        optimizer_params: {high_noise_lr: 1e-5, low_noise_lr: 8e-6}
        switch_boundary_every: 100
        dtype: bf16
      model:
        name_or_path: Wan-AI/Wan2.2-I2V-A14B-Diffusers
        arch: wan22_14b_i2v
        quantize: true
        qtype: qfloat8
        low_vram: true
        model_kwargs: {train_high_noise: true, train_low_noise: true}
      sample:
        sampler: flowmatch
        sample_every: 500
        width: 512
        height: 512
        num_frames: 33
        fps: 16
        prompts: ["mtn a woman turns her head"]
meta: {name: "[name]", version: "1.0"}
"""

FLUX = """\
job: extension
config:
  name: flux_style
  process:
    - type: sd_trainer
      training_folder: output
      network:
        type: lora
        linear: 16
        linear_alpha: 16
        alpha_schedule:
          enabled: true
          alpha_phases:
            foundation:
              alpha: 8
              min_steps: 400
              exit_criteria: {loss_improvement_rate_below: 0.001, min_gradient_stability: 0.55, max_loss_cv: 0.5}
            balance:
              alpha: 12
              min_steps: 600
              exit_criteria: {loss_improvement_rate_below: 0.0008, min_gradient_stability: 0.55, min_samples: 150}
            emphasis:
              alpha: 16
      datasets: [{folder_path: /data/style, caption_ext: txt, resolution: [512, 768, 1024]}]
      train: {steps: 3000, batch_size: 1, lr: 1e-4, optimizer: adamw8bit, noise_scheduler: flowmatch, dtype: bf16}
      model: {name_or_path: black-forest-labs/FLUX.1-dev, arch: flux, quantize: true}
"""


def test_fork_wan22_i2v_config_parses_and_schedules():
    loaded = parse_job_text(WAN22_I2V, environ={})
    network = loaded.job.config.process[0].network
    assert not [w for w in loaded.warnings if "unknown key" in w]
    s = AlphaScheduler.from_config(network, ["high_noise", "low_noise"])
    assert s is not None
    hi, lo = s.phases("high_noise"), s.phases("low_noise")
    assert [p.name for p in hi] == [p.name for p in lo] == ["foundation", "balance", "emphasis"]
    assert [p.min_steps for p in hi] == [1500, 2500, 2000] and [p.min_steps for p in lo] == [2500, 3500, 2000]
    # fallback to the global phase of the same name for keys the expert leaves out
    assert hi[0].criteria.plateau == 0.008 and hi[0].criteria.min_loss_r2 == 0.01
    assert hi[1].criteria.min_gradient_stability == 0.50 and lo[0].criteria.plateau == 0.005
    assert s.alphas("high_noise") == (32.0, 8.0)
    assert s.startup_warnings(has_conv=True, has_linear=True) == []
    assert any("conv_alpha_phases" in w and "alpha_phases" in w for w in s.startup_warnings(False, True))
    assert [t.step for t in run(s, FLAT * 2, expert="high_noise")] == [1499]


def test_fork_flux_config_parses_and_schedules():
    loaded = parse_job_text(FLUX, environ={})
    network = loaded.job.config.process[0].network
    s = AlphaScheduler.from_config(network, None)
    assert s is not None and [p.linear_alpha for p in s.phases(None)] == [8.0, 12.0, 16.0]
    assert s.startup_warnings(has_conv=False, has_linear=True) == []
    transitions = run(s, FLAT * 2)
    assert [(t.step, t.from_phase, t.new_linear) for t in transitions] == [(399, "foundation", 12.0), (999, "balance", 16.0)]
