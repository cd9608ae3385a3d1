"""The alpha-scheduling fork's example job files run unchanged on tiny models (only paths,
device, step count and preview size are replaced), with the warnings they deserve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from aitk.extras import extras_dir

EXAMPLES = Path(__file__).parent / "data" / "fork_examples"


@pytest.fixture(autouse=True)
def _extras(monkeypatch):
    if extras_dir().is_dir():  # torchao (quantize) and bitsandbytes (adamw8bit) live there
        monkeypatch.syspath_prepend(str(extras_dir()))


def localise(name: str, tmp_path: Path, model: Path, data: Path, ctrl: Path, steps: int) -> Path:
    job = yaml.safe_load((EXAMPLES / name).read_text())
    process = job["config"]["process"][0]
    process["training_folder"] = str(tmp_path / "out")
    process["device"] = "cpu"
    process["model"]["name_or_path"] = str(model)
    process["datasets"][0]["folder_path"] = str(data)
    process["train"]["steps"] = steps
    sample = process["sample"]
    sample.update({"width": 64, "height": 64, "sample_steps": 2})
    if "num_frames" in sample:
        sample["num_frames"] = 5
    for entry in sample.get("samples", []):
        entry["ctrl_img"] = str(ctrl)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def run(path: Path):
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    loaded = load_job_file(path)
    trainer = Trainer(loaded.job, loaded.job.config.process[0])
    return loaded, trainer, trainer.run()


def test_wan22_i2v_video_example(tmp_path, shapes_dataset):
    from aitk.models.tiny_wan import build_tiny_wan
    from test_data_video_training import write_clip

    clips = tmp_path / "clips"
    clips.mkdir()
    write_clip(clips / "a.mp4", 40, 64, 48, fps=24)
    write_clip(clips / "b.mp4", 20, 48, 64, fps=16)
    for stem in ("a", "b"):
        (clips / f"{stem}.txt").write_text(f"clip {stem}")
    ctrl = next(p for p in sorted(shapes_dataset.iterdir()) if p.suffix == ".png")
    model = build_tiny_wan(tmp_path / "wan22_i2v", "22_i2v")
    path = localise("wan22_i2v_alpha_scheduling.yaml", tmp_path, model, clips, ctrl, steps=4)
    loaded, trainer, result = run(path)
    assert result.state == "completed"
    warned = "\n".join(loaded.warnings)
    for key in ("low_vram", "attention_backend", "performance_log_every"):
        assert key in warned, key
    log = (result.output_dir / "log.txt").read_text()
    assert "accuracy recovery adapter" in log and "quantized" in log and "uint4" in log
    assert "of text_encoder to qfloat8" in log  # quantize_te with the fork's qtype_te
    assert [p.name for p in result.final_loras] == [
        "video_lora_training_high_noise.safetensors", "video_lora_training_low_noise.safetensors"]
    lines = [json.loads(line) for line in (result.output_dir / "metrics_video_lora_training.jsonl").read_text().splitlines()]
    assert all(m["alpha_enabled"] and m["phase"] == "foundation" and m["conv_alpha"] == 8 for m in lines)
    assert {m["expert"] for m in lines} == {"high_noise"}  # switch_boundary_every: 100
    assert list((result.output_dir / "samples").glob("*.mp4"))
    # WAN wraps no conv layers: the start-up warning names the fix
    assert "alpha_phases" in log and "warning: network.alpha_schedule" in log


def test_flux_readme_example(tmp_path, shapes_dataset):
    from aitk.models.tiny_flux import build_tiny_flux

    model = build_tiny_flux(tmp_path / "flux", "dev")
    path = localise("flux_alpha_scheduling.yaml", tmp_path, model, shapes_dataset, shapes_dataset, steps=4)
    loaded, trainer, result = run(path)
    assert result.state == "completed"
    log = (result.output_dir / "log.txt").read_text()
    # conv phases on FLUX (no conv layers) change nothing: said at start, with the fix
    assert "warning: network.alpha_schedule" in log and "alpha_phases" in log
    lines = [json.loads(line) for line in (result.output_dir / "metrics_flux_lora_alpha.jsonl").read_text().splitlines()]
    assert all(m["alpha_enabled"] and m["linear_alpha"] == 128 for m in lines)
    assert len(list((result.output_dir / "samples").glob("*.jpg"))) == 4  # 2 prompts at step 0 and the end
