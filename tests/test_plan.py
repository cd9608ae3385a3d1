"""`aitk plan` is right where it can be checked: for a tiny model of every family, the plan's
step memory (what one training step holds above the loaded model) equals the memory a real CPU
step allocates, measured by the CPU allocator through torch.profiler (aitk.plan.measure), within
15%, with and without gradient checkpointing. Sizes are chosen so each step holds tens of MB."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import base_process, build_tiny_model, deep_update, write_job  # noqa: E402

TOLERANCE = 0.15
# case -> (model.arch, tiny builder variant, resolution, frames, batch)
CASES = {
    "sd15": ("sd1", "sd15", 256, 1, 4),
    "sdxl": ("sdxl", "sdxl", 256, 1, 2),
    "flux": ("flux", "dev", 512, 1, 8),
    "flux_kontext": ("flux_kontext", "kontext", 512, 1, 4),
    "chroma": ("chroma", "chroma", 512, 1, 8),
    "wan21": ("wan21", "t2v", 256, 17, 4),
    "wan21_i2v": ("wan21_i2v", "i2v", 256, 17, 4),
    "wan22_14b": ("wan22_14b", "22_t2v", 256, 17, 4),
    "wan22_14b_i2v": ("wan22_14b_i2v", "22_i2v", 256, 17, 4),
    "zimage": ("zimage", "zimage", 256, 1, 8),
    "hidream": ("hidream", "hidream", 256, 1, 4),  # planned with even expert routing
    "lumina2": ("lumina2", "lumina2", 256, 1, 8),  # planned at full prompt length
    "flux2": ("flux2", "flux2_dev", 512, 1, 8),
    "pixart_sigma": ("pixart_sigma", "pixart_sigma", 512, 1, 8),
    "auraflow": ("auraflow", "auraflow", 256, 1, 16),
    "cogview4": ("cogview4", "cogview4", 256, 1, 8),
    "ernie_image": ("ernie_image", "ernie_image", 512, 1, 8),
    "flex2": ("flex2", "flex2", 512, 1, 8),
}
# every family with and without checkpointing; the variants (Kontext, I2V) once each
RUNS = [(case, gc) for case in ("sd15", "sdxl", "flux", "chroma", "wan21", "wan22_14b", "zimage") for gc in (False, True)] + [
    ("flux_kontext", True), ("wan21_i2v", False), ("wan22_14b_i2v", True),
]
RUNS += [("flux2", False), ("flux2", True)]
RUNS += [("hidream", False), ("hidream", True), ("lumina2", False), ("lumina2", True)]
#: model settings of a case: Lumina 2 is planned with every prompt at its token limit (the most a
#: batch can take), so the measured captions are cut to a limit they all reach
CASE_MODEL = {"lumina2": {"model_kwargs": {"max_sequence_length": 8}}}
RUNS += [("cogview4", False), ("cogview4", True)]
RUNS += [("ernie_image", False), ("ernie_image", True)]
RUNS += [("pixart_sigma", False), ("pixart_sigma", True), ("auraflow", False), ("auraflow", True)]
RUNS += [("flex2", True)]


def build_model(case: str, root: Path) -> Path:
    return build_tiny_model(CASES[case][1], root)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("plan_models")


def plan_job_file(case: str, gc: bool, models: Path, data: Path, tmp_path: Path, **model: object) -> Path:
    arch, _, resolution, frames, batch = CASES[case]
    process = deep_update(
        base_process(build_model(case, models), data, tmp_path / "out"),
        {"model": {"arch": arch, **model}, "train": {"gradient_checkpointing": gc, "batch_size": batch}},
    )
    process["datasets"][0].update({"resolution": [resolution], "num_frames": frames})
    if case == "flux_kontext":
        process["datasets"][0]["control_path"] = str(data)
    return write_job(tmp_path / f"{case}.yaml", case, process)


@pytest.mark.parametrize(("case", "gc"), RUNS, ids=[f"{c}-{'gc' if g else 'nogc'}" for c, g in RUNS])
def test_plan_matches_a_measured_cpu_step(case, gc, models, shapes_dataset, tmp_path):
    from aitk.plan import plan_job
    from aitk.plan.measure import measure_step

    job = plan_job_file(case, gc, models, shapes_dataset, tmp_path, **CASE_MODEL.get(case, {}))
    plan = plan_job(job)
    planned = plan.step.gradients + plan.step.activations + plan.step.workspace
    measured = measure_step(job).peak
    assert measured > 10 * 2**20, f"the step should hold tens of MB to be measured reliably, got {measured}"
    ratio = planned / measured
    print(f"{case} gc={gc}: planned {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB, ratio {ratio:.3f}")
    assert abs(ratio - 1) <= TOLERANCE, (planned, measured, plan.step)


def test_checkpointing_and_quantization_change_the_plan_as_they_should(models, shapes_dataset, tmp_path):
    """Checkpointing lowers the activations; quantization shrinks the weights but (torchao saves
    the dequantized weight for backward) raises activations without checkpointing."""
    from aitk.plan import plan_job

    plain = plan_job(plan_job_file("flux", False, models, shapes_dataset, tmp_path))
    gc = plan_job(plan_job_file("flux", True, models, shapes_dataset, tmp_path))
    assert gc.step.activations < plain.step.activations / 2
    assert gc.step.weights == plain.step.weights and gc.trainable_parameters == plain.trainable_parameters
    quantized = plan_job(plan_job_file("flux", False, models, shapes_dataset, tmp_path, quantize=True, qtype="qint8"))
    assert quantized.step.weights < plain.step.weights
    assert quantized.step.activations > plain.step.activations


def test_wan22_low_vram_keeps_one_expert_on_the_device(models, shapes_dataset, tmp_path):
    from aitk.plan import plan_job

    both = plan_job(plan_job_file("wan22_14b", True, models, shapes_dataset, tmp_path))
    one = plan_job(plan_job_file("wan22_14b", True, models, shapes_dataset, tmp_path, low_vram=True))
    assert set(both.weights_by_part) >= {"transformer", "transformer_2"}
    assert "transformer_2" not in one.weights_by_part and one.host["parked parts"] >= both.weights_by_part["transformer_2"]


def test_fp16_plans_fp32_trained_weights(models, shapes_dataset, tmp_path):
    """Under fp16 the trainer keeps fp32 masters of what trains (GradScaler unscales fp32 gradients
    only): the plan counts 4 bytes per trained weight and gradient, where bf16 trains in 2."""
    import yaml

    from aitk.plan import plan_job

    plans = {}
    for dtype in ("bf16", "fp16"):
        job = plan_job_file("sd15", False, models, shapes_dataset, tmp_path)
        data = yaml.safe_load(job.read_text())
        data["config"]["process"][0]["train"]["dtype"] = dtype
        job.write_text(yaml.safe_dump(data))
        plans[dtype] = plan_job(job)
    assert plans["fp16"].trainable_parameters == plans["bf16"].trainable_parameters
    assert plans["fp16"].step.gradients == pytest.approx(2 * plans["bf16"].step.gradients, rel=0.05)
