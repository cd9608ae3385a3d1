"""The same acceptance run for every architecture: 30 steps on a tiny model with falling loss,
previews written, LoRA files saved, and a run stopped at step 15 and resumed ends bit-identical to
a straight run (files and per-step losses)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import base_process, build_tiny_model, deep_update, write_job  # noqa: E402

# arch -> (tiny builder variant, learning rate, dataset kind, preview suffix)
CASES = {
    "sdxl": ("sdxl", 2e-3, "images", ".jpg"),
    "flux": ("dev", 5e-3, "images", ".jpg"),
    "flux_schnell_assistant": ("schnell", 5e-3, "images", ".jpg"),
    "flux_kontext": ("kontext", 5e-3, "pairs", ".jpg"),
    "chroma": ("chroma", 5e-3, "images", ".jpg"),
    "wan21": ("t2v", 1e-2, "images", ".mp4"),
    "wan21_i2v": ("i2v", 1e-2, "images", ".mp4"),
    "wan22_14b": ("22_t2v", 1e-2, "images", ".mp4"),
    "wan22_14b_i2v": ("22_i2v", 1e-2, "images", ".mp4"),
    "wan22_5b": ("22_5b", 1e-2, "wan22_5b_clips", ".mp4"),  # I2V on clips of mixed length, fps, aspect
    "sd3": ("sd3_medium", 5e-3, "images", ".jpg"),
    "qwen_image": ("qwen_image", 5e-3, "images", ".jpg"),
    "qwen_image_edit": ("qwen_image_edit", 5e-3, "pairs", ".jpg"),
    "qwen_image_edit_plus": ("qwen_image_edit_plus", 5e-3, "pairs", ".jpg"),
    "lumina2": ("lumina2", 5e-3, "images", ".jpg"),
    "zimage": ("zimage", 5e-3, "images", ".jpg"),
    "flex2": ("flex2", 5e-3, "pairs", ".jpg"),  # control images as Flex.2's control input
    "pixart": ("pixart_alpha", 5e-3, "images", ".jpg"),
    "pixart_sigma": ("pixart_sigma", 5e-3, "images", ".jpg"),
    "auraflow": ("auraflow", 5e-3, "images", ".jpg"),
    "cogview4": ("cogview4", 5e-3, "images", ".jpg"),
    "ernie_image": ("ernie_image", 5e-3, "images", ".jpg"),
    "krea2": ("krea2", 5e-3, "images", ".jpg"),
    "hidream": ("hidream", 5e-3, "images", ".jpg"),
    "flux2": ("flux2_dev", 5e-3, "images", ".jpg"),
    "flux2_klein_4b": ("flux2_klein_4b", 5e-3, "images", ".jpg"),
    "ltx2": ("ltx2", 1e-2, "ltx2_clips", ".mp4"),  # clips of mixed length, fps and aspect
    "hunyuan_video_1_5_i2v": ("hunyuan_video_1_5_i2v", 1e-2, "hv15_clips", ".mp4"),  # I2V on mixed clips
}


def build_model(case: str, root: Path) -> Path:
    return build_tiny_model(CASES[case][0], root)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("arch_models")


def make_job(case: str, name: str, models: Path, shapes_dataset: Path, tmp_path: Path) -> Path:
    _, lr, data_kind, _ = CASES[case]
    arch = "flux" if case == "flux_schnell_assistant" else case
    model_dir = build_model(case, models)
    data = shapes_dataset
    changes: dict = {
        "model": {"arch": arch},
        "train": {"steps": 30, "lr": lr, "lr_scheduler": "constant"},
        "network": {"linear": 8, "linear_alpha": 8},
        "save": {"save_every": 10},
        "sample": {"sample_every": 30, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 1.0,
                   "num_frames": 5, "fps": 8, "prompts": ["a red circle [trigger]"]},
    }
    if case == "flux_schnell_assistant":
        from test_models_flux import _write_assistant

        assistant = tmp_path / "assistant.safetensors"
        if not assistant.exists():
            _write_assistant(model_dir, assistant, "comfyui")
        changes["model"]["assistant_lora_path"] = str(assistant)
    if "i2v" in case:
        changes["sample"]["ctrl_img"] = str(next(p for p in sorted(shapes_dataset.iterdir()) if p.suffix == ".png"))
    if data_kind == "wan22_5b_clips":
        from test_models_wan22_5b import mixed_clips

        data = mixed_clips(tmp_path / "wan22_5b_data")
        changes["sample"]["ctrl_img"] = str(data.parent / "first.png")
    if data_kind == "pairs":
        from test_models_flux import _draw_pairs

        data, controls = tmp_path / "pairs", tmp_path / "controls"
        if not data.exists():
            _draw_pairs(data, controls)
        changes["sample"]["ctrl_img"] = str(next(controls.iterdir()))
    if data_kind == "ltx2_clips":
        from test_models_ltx2 import write_mixed_clips

        data = write_mixed_clips(tmp_path / "clips")
    if data_kind == "hv15_clips":
        from test_models_hunyuan_video_1_5 import MODEL_KWARGS, write_mixed_clips

        data = write_mixed_clips(tmp_path / "hv15_clips")
        changes["sample"]["ctrl_img"] = str(data / "still.png")
        changes["model"]["model_kwargs"] = MODEL_KWARGS  # 32 prompt tokens: short steps
    if case == "qwen_image_edit_plus":
        # the controls at the target's area (upstream's switch), not the 1 MP the real model's VAE takes
        changes["model"]["model_kwargs"] = {"match_target_res": True}
    process = deep_update(base_process(model_dir, data, tmp_path / "out"), changes)
    if data_kind == "ltx2_clips":
        from test_models_ltx2 import clips_dataset

        process["datasets"][0].update(clips_dataset())
    if data_kind == "pairs":
        process["datasets"][0]["control_path"] = str(tmp_path / "controls")
    if data_kind == "wan22_5b_clips":
        process["datasets"][0].update({"num_frames": 9, "do_i2v": True})
    if data_kind == "hv15_clips":
        from test_models_hunyuan_video_1_5 import CLIPS_DATASET

        process["datasets"][0].update(CLIPS_DATASET)
    return write_job(tmp_path / f"{name}.yaml", name, process)


def train(job: Path, **kwargs):
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    loaded = load_job_file(job)
    trainer = Trainer(loaded.job, loaded.job.config.process[0], **kwargs)
    return trainer, trainer.run()


def losses(result, name: str) -> list[float]:
    lines = (result.output_dir / f"metrics_{name}.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.mark.parametrize("case", list(CASES))
def test_trains_samples_saves_and_resumes_identically(case, models, shapes_dataset, tmp_path):
    _, straight = train(make_job(case, "straight", models, shapes_dataset, tmp_path))
    assert straight.state == "completed" and straight.step == 30
    run_losses = losses(straight, "straight")
    assert len(run_losses) == 30 and np.mean(run_losses[-10:]) < np.mean(run_losses[:10]), run_losses
    samples = sorted(p.name for p in (straight.output_dir / "samples").iterdir())
    suffix = CASES[case][3]
    assert f"000000030_0{suffix}" in samples and f"000000000_0{suffix}" in samples, samples
    assert straight.final_loras and all(p.is_file() for p in straight.final_loras)

    job = make_job(case, "resumed", models, shapes_dataset, tmp_path)

    def stop_at_15(trainer, step):
        if step == 15:
            trainer.stop.request("test")

    _, first = train(job, on_step_end=stop_at_15)
    assert first.state == "stopped" and first.step == 15
    _, second = train(job)
    assert second.state == "completed" and second.step == 30
    assert losses(second, "resumed") == run_losses
    assert len(second.final_loras) == len(straight.final_loras)
    for a, b in zip(straight.final_loras, second.final_loras):
        x, y = load_file(str(a)), load_file(str(b))
        assert x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x), (a.name, b.name)
