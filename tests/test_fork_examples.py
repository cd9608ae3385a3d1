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
    # the example's accuracy recovery adapter (ostris/accuracy_recovery_adapters/...) is made for
    # the real WAN 2.2: here one of the same layout is made for the tiny transformer
    job = yaml.safe_load(path.read_text())
    qname, _, reference = job["config"]["process"][0]["model"]["qtype"].partition("|")
    assert (qname, reference.split("/")[:2]) == ("uint4", ["ostris", "accuracy_recovery_adapters"])
    ara = tiny_wan_recovery_adapter(model, tmp_path / Path(reference).name)
    job["config"]["process"][0]["model"]["qtype"] = f"uint4|{ara}"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    loaded, trainer, result = run(path)
    assert result.state == "completed"
    warned = "\n".join(loaded.warnings)
    for key in ("attention_backend", "performance_log_every"):
        assert key in warned, key
    assert "low_vram" not in warned  # parks the idle expert, text encoder and VAE (tests/test_offload.py)
    log = (result.output_dir / "log.txt").read_text()
    assert "quantized" in log and "uint4" in log and "recovery adapter" in log
    assert not [line for line in log.splitlines() if "recovery adapter" in line and "not supported" in line]
    # the recovery adapter is on both experts, frozen, and not in the saved files
    assert log.count(f"accuracy recovery adapter ({'high_noise'}): {ara}") == 1
    assert log.count(f"accuracy recovery adapter ({'low_noise'}): {ara}") == 1
    from aitk.models.recovery import RECOVERY_ADAPTER

    for expert in trainer.adapter.experts().values():
        layers = [m for m in expert.modules() if RECOVERY_ADAPTER in getattr(m, "lora_A", {})]
        assert layers and not any(p.requires_grad for m in layers for p in m.lora_A[RECOVERY_ADAPTER].parameters())
    assert "of text_encoder to qfloat8" in log  # quantize_te with the fork's qtype_te
    assert [p.name for p in result.final_loras] == [
        "video_lora_training_high_noise.safetensors", "video_lora_training_low_noise.safetensors"]
    lines = [json.loads(line) for line in (result.output_dir / "metrics_video_lora_training.jsonl").read_text().splitlines()]
    assert all(m["alpha_enabled"] and m["phase"] == "foundation" and m["conv_alpha"] == 8 for m in lines)
    assert {m["expert"] for m in lines} == {"high_noise"}  # switch_boundary_every: 100
    assert list((result.output_dir / "samples").glob("*.mp4"))
    # WAN wraps no conv layers: the start-up warning names the fix
    assert "alpha_phases" in log and "warning: network.alpha_schedule" in log


def tiny_wan_recovery_adapter(model: Path, path: Path) -> Path:
    """A recovery adapter for the tiny WAN transformer in ComfyUI key names (as the published ones)."""
    from diffusers import WanTransformer3DModel
    from torch import nn

    from aitk.models.wan_keys import is_block_target, lora_key_stem
    from test_recovery_adapter import write_recovery_file

    transformer = WanTransformer3DModel.from_pretrained(str(model), subfolder="transformer")
    names = [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear) and is_block_target(n)]
    write_recovery_file(transformer, path, names, stem=lora_key_stem, weights=("lora_A", "lora_B"))
    return path


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
