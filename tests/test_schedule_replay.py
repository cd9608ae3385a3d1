"""`aitk schedule replay`: transitions at the predicted steps, the blocking criterion, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from aitk.cli import main
from aitk.config.schema import NetworkConfig
from aitk.schedule import AlphaScheduler
from aitk.schedule.replay import read_metrics

JOB = """\
job: extension
config:
  name: replay_me
  process:
    - type: sd_trainer
      training_folder: output
      network:
        type: lora
        linear: 16
        linear_alpha: 16
{schedule}
      datasets: [{{folder_path: /data/images}}]
      model: {{name_or_path: runwayml/stable-diffusion-v1-5}}
"""

SCHEDULE = """\
        alpha_schedule:
          enabled: {enabled}
          alpha_phases:
            foundation:
              alpha: 8
              min_steps: 150
              exit_criteria: {{loss_improvement_rate_below: 0.001, min_gradient_stability: 0.5}}
            balance:
              alpha: 12
              min_steps: 200
              exit_criteria: {{loss_improvement_rate_below: 0.001, min_gradient_stability: 0.5}}
            emphasis:
              alpha: 16"""


def write_job(tmp_path: Path, enabled: bool = True, schedule: bool = True) -> Path:
    block = SCHEDULE.format(enabled=str(enabled).lower()) if schedule else ""
    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(schedule=block), encoding="utf-8")
    return path


def write_metrics(tmp_path: Path, rows: list[dict[str, Any]], name: str = "metrics_replay_me.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows(losses: list[float], stability: float | None = 0.7, expert: str | None = None, start: int = 0) -> list[dict]:
    return [{"step": start + i, "loss": loss, "gradient_stability": stability, "expert": expert,
             "alpha_enabled": False} for i, loss in enumerate(losses)]


def replay_cli(capsys, metrics: Path, job: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["schedule", "replay", str(metrics), "--config", str(job), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_replay_prints_transitions_at_the_predicted_steps(tmp_path, capsys):
    # flat loss, stable: foundation exits after max(min_steps 150, min_samples 100) steps (step
    # 149), balance 200 steps later (step 349); emphasis is last
    metrics = write_metrics(tmp_path, rows([0.2] * 500))
    code, out, err = replay_cli(capsys, metrics, write_job(tmp_path))
    assert code == 0, err
    assert "step 149: foundation -> balance, linear 8 -> 12" in out
    assert "step 349: balance -> emphasis, linear 12 -> 16" in out
    assert "in emphasis (phase 3 of 3) for 150 steps; the last phase, which never exits" in out
    assert "Traceback" not in out + err


def test_replay_names_the_criterion_that_held_the_phase_back(tmp_path, capsys):
    # loss falls too fast for the first 300 steps, then plateaus; stability is low until step 330
    losses = [1.0 - 0.002 * i for i in range(300)] + [0.4] * 50
    data = [dict(r, gradient_stability=0.3 if r["step"] < 330 else 0.8) for r in rows(losses)]
    code, out, _ = replay_cli(capsys, write_metrics(tmp_path, data), write_job(tmp_path))
    assert code == 0
    assert "transitions: none" in out
    assert "model: in foundation (phase 1 of 3) for 350 steps; it never exited" in out
    # min_steps holds until the 150th step (step 149), so 201 steps count. The window still holds
    # falling losses at the end, so the slope fails on all of them; the stability EMA (span 50)
    # climbs from 0.3 towards 0.8 from step 330 and first reaches 0.5 at step 342 (13 steps of
    # alpha 2/51), so it failed on steps 149..341
    assert "held back longest by loss_improvement_rate_below: failed 201 of the 201 steps after min_steps (150)" in out
    assert "also failed: min_gradient_stability (193 steps)" in out
    assert "FAIL loss_improvement_rate_below" in out and "pass min_steps" in out


def test_replay_low_stability_and_min_steps(tmp_path, capsys):
    code, out, _ = replay_cli(capsys, write_metrics(tmp_path, rows([0.2] * 300, stability=0.3)), write_job(tmp_path))
    assert code == 0
    assert "held back longest by min_gradient_stability: failed 151 of the 151 steps after min_steps (150)" in out
    code, out, _ = replay_cli(capsys, write_metrics(tmp_path, rows([0.2] * 100)), write_job(tmp_path))
    assert code == 0 and "held back by min_steps: 100 of 150 steps done" in out


def test_replay_per_expert(tmp_path, capsys):
    data = []
    for step in range(800):
        expert = "high_noise" if (step // 50) % 2 == 0 else "low_noise"
        loss = 0.2 if expert == "high_noise" else 0.5 + 0.01 * step  # low_noise keeps rising
        data.append({"step": step, "loss": loss, "gradient_stability": 0.7, "expert": expert})
    code, out, _ = replay_cli(capsys, write_metrics(tmp_path, data), write_job(tmp_path))
    assert code == 0
    # high_noise's 150th own step: blocks of 50 alternate, so it is global step 50*2*2 + 49 = 249
    assert "step 249: expert high_noise: foundation -> balance" in out
    assert "expert low_noise: in foundation (phase 1 of 3)" in out
    assert "held back longest by loss_improvement_rate_below" in out


def test_replay_reads_files_without_step_and_null_losses(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"loss": 0.5}\n\n{"loss": null, "gradient_stability": 0.6}\n{"loss": NaN}\n', encoding="utf-8")
    records = read_metrics(path)
    assert [(r.line, r.step, r.loss, r.stability) for r in records] == [(1, 0, 0.5, None), (3, 1, None, 0.6), (4, 2, None, None)]


@pytest.mark.parametrize("case,needle", [
    ("missing_metrics", "file not found"),
    ("bad_json", "line 3: not valid JSON"),
    ("not_object", "line 1: expected a JSON object"),
    ("no_loss", "no line has a numeric `loss`"),
    ("empty", "has no metrics lines"),
    ("missing_config", "file not found"),
    ("no_schedule", "has no network.alpha_schedule"),
    ("disabled", "is disabled (enabled: false)"),
    ("bad_process", "--process 3 is out of range"),
    ("invalid_job", "min_gradient_stability"),
])
def test_replay_bad_input_exits_1_with_a_message(tmp_path, capsys, case, needle):
    metrics = write_metrics(tmp_path, rows([0.2] * 30))
    job = write_job(tmp_path)
    extra: list[str] = []
    if case == "missing_metrics":
        metrics = tmp_path / "nope.jsonl"
    elif case == "bad_json":
        metrics.write_text('{"step": 0, "loss": 1}\n{"step": 1, "loss": 1}\n{"step": 2, "loss": \n', encoding="utf-8")
    elif case == "not_object":
        metrics.write_text("[1, 2]\n", encoding="utf-8")
    elif case == "no_loss":
        metrics.write_text('{"step": 0, "state": "training"}\n', encoding="utf-8")
    elif case == "empty":
        metrics.write_text("\n", encoding="utf-8")
    elif case == "missing_config":
        job = tmp_path / "missing.yaml"
    elif case == "no_schedule":
        job = write_job(tmp_path, schedule=False)
    elif case == "disabled":
        job = write_job(tmp_path, enabled=False)
    elif case == "bad_process":
        extra = ["--process", "3"]
    elif case == "invalid_job":
        job.write_text(job.read_text().replace("min_gradient_stability: 0.5", "min_gradient_stability: 5", 1))
    code, out, err = replay_cli(capsys, metrics, job, *extra)
    assert code == 1
    assert needle in err and err.startswith("error: ")
    assert "Traceback" not in out + err


def test_replay_command_line_process(tmp_path):
    metrics = write_metrics(tmp_path, rows([0.2] * 200))
    job = write_job(tmp_path)
    ok = subprocess.run([sys.executable, "-m", "aitk", "schedule", "replay", str(metrics), "--config", str(job)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "step 149: foundation -> balance" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "aitk", "schedule", "replay", str(tmp_path / "x.jsonl"),
                          "--config", str(job)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "file not found" in bad.stderr and "Traceback" not in bad.stderr


def _doc_blocks(lang: str) -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "docs" / "alpha-scheduling.md").read_text(encoding="utf-8")
    return [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith(lang + "\n")]


def test_docs_worked_example_is_real_output(tmp_path, capsys, monkeypatch):
    """docs/alpha-scheduling.md: the generator, schedule and printed output stay in step."""
    monkeypatch.chdir(tmp_path)
    [generator] = [b for b in _doc_blocks("python") if "metrics_wan22_motion.jsonl" in b]
    exec(compile(generator, "docs-example", "exec"), {})
    schedules = [b for b in _doc_blocks("yaml") if b.startswith("alpha_schedule:")]
    example = next(b for b in schedules if "min_gradient_stability: 0.50,\n" in b)
    indented = "\n".join("        " + line for line in example.rstrip().splitlines())
    Path("wan22_video.yaml").write_text(JOB.format(schedule=indented), encoding="utf-8")
    [expected] = [b for b in _doc_blocks("") if b.startswith("replayed ")]
    code, out, _ = replay_cli(capsys, Path("metrics_wan22_motion.jsonl"), Path("wan22_video.yaml"))
    assert code == 0
    assert out.strip() == expected.strip()


def test_docs_presets_parse_and_schedule():
    schedules = [b for b in _doc_blocks("yaml") if b.startswith("alpha_schedule:")]
    assert len(schedules) >= 4
    for block in schedules:
        cfg = NetworkConfig.model_validate({"linear": 32, **yaml.safe_load(block)})
        s = AlphaScheduler.from_config(cfg, ["high_noise", "low_noise"])
        assert s is not None and len(s.phases("low_noise")) == 3
        assert s.startup_warnings(has_conv=False, has_linear=True) == []
