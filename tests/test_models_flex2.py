"""Flex.2 on a tiny random-init model of the real classes (FluxTransformer2DModel with Flex.2's
196 input channels): the conditioning channels and upstream's model_kwargs options, the step the
preview pipeline takes read back through `predict`, control and inpaint previews, and runs whose
files load in diffusers exactly (LoRA, DoRA), LoKr, a quantized base and the tools. Also the
families upstream trains whose model diffusers has no class for: `aitk validate` refuses them.

Everything runs offline on CPU in fp32 with 64 px images.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aitk.config.schema import ModelConfig, TrainConfig
from aitk.models.base import BatchContext, NoisyBatch, PromptEmbeds
from aitk.models.flex2 import FLEX2_INPUTS, Flex2Adapter, Flex2InputError, Flex2Options, build_tiny_flex2
from aitk.models.flex2.inputs import training_inputs
from aitk.models.flux import build_tiny_flux, pack_latents
from conftest import base_process, write_job
import family_checks as family
from interop_results import record
from upstream_jobs import extras_on_path  # noqa: F401 - autouse fixture: torchao for model.quantize

CPU = torch.device("cpu")
C = 16  # latent channels


@pytest.fixture(scope="session")
def flex2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flex2(tmp_path_factory.mktemp("flex2-model") / "tiny-flex2")


def make_adapter(folder: Path | str, **kwargs: Any) -> Flex2Adapter:
    adapter = Flex2Adapter(ModelConfig(name_or_path=str(folder), arch="flex2", model_kwargs=kwargs), CPU, torch.float32)
    adapter.load()
    return adapter


@pytest.fixture(scope="session")
def flex2(flex2_model: Path) -> Flex2Adapter:
    return make_adapter(flex2_model)


def _inputs(adapter: Flex2Adapter, latents: torch.Tensor, controls: torch.Tensor | None, seed: int,
            **options: Any) -> torch.Tensor:
    return training_inputs(latents, controls, Flex2Options(**options), torch.Generator().manual_seed(seed),
                           adapter.encode_images)


# --- the model ---------------------------------------------------------------------------------


def test_tiny_model_is_a_flux_pipeline_with_flex2s_channels(flex2_model: Path, flex2: Flex2Adapter) -> None:
    from diffusers import FluxPipeline

    size = sum(p.stat().st_size for p in flex2_model.rglob("*") if p.is_file())
    assert size < 10 * 2**20, size
    pipe = FluxPipeline.from_pretrained(flex2_model)
    assert (pipe.transformer.config.in_channels, pipe.transformer.config.out_channels) == (196, 64)
    assert build_tiny_flex2(flex2_model) == flex2_model  # kept, not rebuilt
    for module in (flex2.transformer, flex2.vae, flex2.text_encoder, flex2.text_encoder_2):
        assert not any(p.requires_grad for p in module.parameters())
    assert flex2.latent_channels == C and flex2.uses_controls and flex2.has_guidance
    assert Flex2Adapter.bucket_divisibility == 16 and flex2.modelspec_architecture == "flex-2/lora"
    names = flex2.network_candidates(False)
    assert names and "x_embedder" not in names and all("blocks." in n for n in names)


def test_a_plain_flux_transformer_is_refused(tmp_path: Path) -> None:
    flux = build_tiny_flux(tmp_path / "flux", "dev")
    with pytest.raises(Flex2InputError, match=r"model.name_or_path: .*takes 64 input channels.*196"):
        make_adapter(flux)


@pytest.mark.parametrize(("key", "value", "said"), [
    ("inpaint_dropout", 1.5, "not a chance from 0 to 1"),
    ("control_dropout", "half", "not a chance from 0 to 1"),
    ("invert_inpaint_mask_chance", True, "not a chance from 0 to 1"),
    ("random_blur_mask", 1, "not true or false"),
])
def test_bad_option_values_are_refused_naming_the_key(
    flex2_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: Any, said: str
) -> None:
    from aitk.config.validate import validate_command

    with pytest.raises(Flex2InputError, match=f"model.model_kwargs.{key}: .*{said}"):
        make_adapter(flex2_model, **{key: value})
    process = base_process(flex2_model, tmp_path, tmp_path / "out")
    process["model"].update(arch="flex2", model_kwargs={key: value})
    assert validate_command([str(write_job(tmp_path / "bad.yaml", "bad", process))]) == 1
    err = capsys.readouterr().err
    assert "Flex.2 training options outside their range" in err and key in err, err


# --- the conditioning channels -------------------------------------------------------------------


def test_blank_and_control_inputs(flex2: Flex2Adapter) -> None:
    latents = flex2.encode_images(family.pixels(1))
    blank = _inputs(flex2, latents, None, 0)
    assert blank.shape == (2, 2 * C + 1, 8, 8)
    assert not blank[:, :C].any() and torch.equal(blank[:, C], torch.ones(2, 8, 8)) and not blank[:, C + 1:].any()
    controls = family.pixels(2)
    with_control = _inputs(flex2, latents, controls, 0)
    torch.testing.assert_close(with_control[:, C + 1:], flex2.encode_images(controls))
    assert torch.equal(with_control[:, : C + 1], blank[:, : C + 1])
    # two control folders: each batch uses one of them
    both = torch.stack([controls, family.pixels(3)], dim=1)
    picked = {int(torch.isclose(_inputs(flex2, latents, both, s)[:, C + 1:], with_control[:, C + 1:]).all())
              for s in range(8)}
    assert picked == {0, 1}
    dropped = _inputs(flex2, latents, controls, 0, control_dropout=1.0)
    assert not dropped[:, C + 1:].any()


def test_random_inpainting_cuts_the_latents_where_the_mask_says(flex2: Flex2Adapter) -> None:
    latents = flex2.encode_images(family.pixels(4))
    plain = _inputs(flex2, latents, None, 7, do_random_inpainting=True)
    fill = plain[:, C]
    assert set(fill.unique().tolist()) == {0.0, 1.0}
    cover = fill.mean(dim=(1, 2))
    assert ((cover > 0.1) & (cover < 0.9)).all(), cover
    torch.testing.assert_close(plain[:, :C], latents * (1 - fill[:, None]))
    assert torch.equal(plain, _inputs(flex2, latents, None, 7, do_random_inpainting=True))  # same draws, same input
    inverted = _inputs(flex2, latents, None, 7, do_random_inpainting=True, invert_inpaint_mask_chance=1.0)
    assert torch.equal(inverted[:, C], 1 - fill)
    assert torch.equal(_inputs(flex2, latents, None, 7, do_random_inpainting=True, inpaint_dropout=1.0),
                       _inputs(flex2, latents, None, 7))
    soft = _inputs(flex2, latents, None, 7, do_random_inpainting=True, random_blur_mask=True,
                   random_dialate_mask=True)
    assert soft[:, C].min() >= 0 and soft[:, C].max() <= 1
    # the dilated mask no longer matches the cut exactly in some draw (upstream's point)
    mismatch = []
    for seed in range(6):
        x = _inputs(flex2, latents, None, seed, do_random_inpainting=True, random_dialate_mask=True)
        mismatch.append(float(((x[:, :C] == 0).all(1).float() - x[:, C]).abs().sum()))
    assert max(mismatch) > 0


# --- the objective and previews -------------------------------------------------------------------


def test_predict_is_what_the_preview_pipeline_steps_with(flex2: Flex2Adapter, tmp_path: Path) -> None:
    """One preview step with a control image: the transformer saw the noise tokens followed by the
    conditioning tokens (control latents of the image), and `predict` on the same input gives its output."""
    from PIL import Image

    from aitk.config.prompts import PreviewRequest

    image = tmp_path / "pose.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(image)
    seen: dict[str, Any] = {}

    def hook(_module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        seen.update(x=kwargs["hidden_states"], t=kwargs["timestep"], out=output[0])

    request = PreviewRequest("a red circle", 64, 64, 1, 4.0, 1, "", 1.0, ctrl_img=str(image))
    kwargs = flex2.preview_kwargs(request)
    handle = flex2.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe = flex2.sample_pipeline()
        pipe.set_progress_bar_config(disable=True)
        latents = pipe(prompt="a red circle", height=64, width=64, num_inference_steps=1, guidance_scale=4.0,
                       output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).images
    finally:
        handle.remove()
    assert seen["x"].shape == (1, 16, 196)
    control = kwargs["conditioning_latents"][:, C + 1:]
    pixels = torch.from_numpy(np.asarray(Image.open(image), dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    torch.testing.assert_close(control, flex2.encode_images(pixels))
    assert torch.equal(seen["x"][..., 64:], pack_latents(kwargs["conditioning_latents"]))
    from aitk.models.flux import unpack_latents

    x = unpack_latents(seen["x"][..., :64], 64, 64)
    batch = NoisyBatch(x, seen["t"] * 1000, torch.zeros_like(x), None, {FLEX2_INPUTS: kwargs["conditioning_latents"]})
    flex2.train_guidance = 4.0  # the preview's guidance embedding
    try:
        with torch.no_grad():
            pred = flex2.predict(batch, flex2.encode_prompts(["a red circle"]))
    finally:
        flex2.train_guidance = 1.0
    torch.testing.assert_close(pred, unpack_latents(seen["out"], 64, 64), rtol=1e-5, atol=1e-5)
    assert latents.shape == (1, 16, 64) and flex2.decode_latents(latents)[0].size == (64, 64)


def test_an_inpaint_preview_image_fills_its_transparent_area(flex2: Flex2Adapter, tmp_path: Path) -> None:
    from PIL import Image

    from aitk.config.prompts import PreviewRequest

    rgba = np.full((64, 64, 4), 200, dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:, 32:, 3] = 0  # the right half is erased: to be filled
    Image.fromarray(rgba, "RGBA").save(tmp_path / "face.inpaint.png")
    request = PreviewRequest("a red circle", 64, 64, 1, 4.0, 1, "", 1.0, ctrl_img=str(tmp_path / "face.inpaint.png"))
    cond = flex2.preview_kwargs(request)["conditioning_latents"]
    assert torch.equal(cond[0, C, :, :4], torch.zeros(8, 4)) and torch.equal(cond[0, C, :, 4:], torch.ones(8, 4))
    assert not cond[0, :C, :, 4:].any() and cond[0, :C, :, :4].abs().sum() > 0 and not cond[0, C + 1:].any()
    Image.fromarray(rgba[..., :3]).save(tmp_path / "flat.inpaint.png")
    with pytest.raises(Flex2InputError, match="no alpha channel"):
        flex2.preview_kwargs(PreviewRequest("x", 64, 64, 1, 4.0, 1, "", 1.0, ctrl_img=str(tmp_path / "flat.inpaint.png")))


def test_noisy_batch_carries_the_conditioning(flex2: Flex2Adapter) -> None:
    latents = flex2.encode_images(family.pixels(5))
    cfg = TrainConfig(bypass_guidance_embedding=True, timestep_type="shift")
    a = flex2.make_noisy_batch(latents, cfg, torch.Generator().manual_seed(1), BatchContext(controls=family.pixels(6)))
    b = flex2.make_noisy_batch(latents, cfg, torch.Generator().manual_seed(1), BatchContext(controls=family.pixels(6)))
    assert a.extra[FLEX2_INPUTS].shape == (2, 2 * C + 1, 8, 8) and torch.equal(a.extra[FLEX2_INPUTS], b.extra[FLEX2_INPUTS])
    s = (a.timesteps / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(a.target, (a.noisy_latents - latents) / s, rtol=1e-4, atol=1e-4)
    cond = PromptEmbeds.cat([flex2.encode_prompts(["a red circle"])] * 2)
    with torch.no_grad():
        with_control = flex2.predict(a, cond)
        a.extra[FLEX2_INPUTS] = _inputs(flex2, latents, None, 0)
        assert (flex2.predict(a, cond) - with_control).abs().max() > 1e-4  # the control input matters


# --- end to end ----------------------------------------------------------------------------------


def _job(tmp_path: Path, name: str, model_dir: Path, data: Path, controls: Path | None = None,
         **changes: Any) -> Path:
    return family.write_job(tmp_path, name, model_dir, data, {
        "model": {"arch": "flex2", "model_kwargs": {"inpaint_dropout": 0.5, "control_dropout": 0.5,
                                                    "do_random_inpainting": True, "random_blur_mask": True,
                                                    "random_dialate_mask": True, "invert_inpaint_mask_chance": 0.2}},
        "train": {"steps": 30, "batch_size": 2, "lr": 5e-3, "bypass_guidance_embedding": True,
                  "lr_scheduler": "constant"},
        "network": {"type": "lora", "linear": 8, "linear_alpha": 16},
        "save": {"save_every": 1000},
        "sample": {"sample_every": 15, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 4.0,
                   "prompts": ["a red circle, [trigger] style"], "seed": 5},
    }, changes, dataset={"control_path": str(controls)} if controls is not None else None)


def _render(pipe: Any, adapter: Flex2Adapter, ctrl_img: str) -> torch.Tensor:
    from aitk.config.prompts import PreviewRequest

    pipe.set_progress_bar_config(disable=True)
    kwargs = adapter.preview_kwargs(PreviewRequest("a red circle", 64, 64, 3, 4.0, 2, "", 1.0, ctrl_img=ctrl_img))
    return pipe(prompt="a red circle, shp style", height=64, width=64, num_inference_steps=2, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(3), output_type="latent", **kwargs).images


def _diffusers_diff(adapter: Flex2Adapter, model: Path, lora: Path, ctrl_img: str) -> tuple[float, float]:
    """family.diffusers_lora_diff against a fresh FluxPipeline, Flex.2's inputs supplied."""
    pipeline_cls = type(adapter.sample_pipeline())
    return family.diffusers_lora_diff(adapter, pipeline_cls, model, lora, lambda pipe: _render(pipe, adapter, ctrl_img))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from test_models_flux import _draw_pairs

    root = tmp_path_factory.mktemp("flex2-pairs")
    _draw_pairs(root / "images", root / "controls")
    return root / "images", root / "controls"


@pytest.fixture(scope="module")
def lora_run(flex2_model: Path, pairs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("flex2-lora")
    ctrl = str(next(pairs[1].iterdir()))
    job = _job(tmp, "flora", flex2_model, pairs[0], controls=pairs[1], sample={"ctrl_img": ctrl})
    return (*family.train(job), tmp, ctrl)


def test_lora_trains_with_falling_loss_previews_and_fluxs_names(lora_run: tuple) -> None:
    trainer, result, _, _ = lora_run
    family.check_falling_loss_and_previews(result, "flora")
    family.check_lora_file(trainer, result.final_lora, "flex-2/lora", "flex2", prefix="transformer.",
                           weight_names=("lora_A", "lora_B"))


def test_lora_loads_exactly_in_diffusers(lora_run: tuple, flex2_model: Path) -> None:
    from test_tools import aitk

    trainer, result, tmp, ctrl = lora_run
    converted = tmp / "flora_diffusers.safetensors"
    code, _, err = aitk("convert", result.final_lora, "--to", "diffusers", "--arch", "flex2", "-o", converted)
    assert code == 0, err
    for layout, path in (("comfyui", result.final_lora), ("diffusers", converted)):
        diff, effect = _diffusers_diff(trainer.adapter, flex2_model, path, ctrl)
        record("flex2", "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout=layout)
        assert effect > 1e-3 and diff < 1e-4, (layout, diff, effect)


def test_merge_and_lora_info_know_flex2(lora_run: tuple, flex2_model: Path) -> None:
    from diffusers import FluxTransformer2DModel

    trainer, result, tmp, _ = lora_run
    info = family.lora_info(result.final_lora)
    assert info["architecture"] == "flex2" and info["modules"] == len(trainer.network.wrapped_module_names())
    family.check_merge("flex2", trainer.adapter, flex2_model, result.final_lora, tmp, FluxTransformer2DModel)


def test_dora_and_lokr_train_and_load(flex2_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, "fdora", flex2_model, shapes_dataset, train={"steps": 6},
               network={"dora": True, "linear": 4, "linear_alpha": 8}, save={"save_format": "diffusers"},
               sample={"sample_every": 1000})
    trainer, result = family.train(job)
    family.finite_run(result, "fdora")
    tensors = load_file(str(result.final_lora))
    assert any(k.endswith("lora_magnitude_vector") for k in tensors)
    diff, effect = _diffusers_diff(trainer.adapter, flex2_model, result.final_lora, "")
    record("flex2", "dora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="diffusers")
    assert effect > 1e-3 and diff < 1e-4, (diff, effect)

    job = _job(tmp_path, "flokr", flex2_model, shapes_dataset, train={"steps": 6}, sample={"sample_every": 1000},
               network={"type": "lokr", "linear": 2, "linear_alpha": 4, "lokr_factor": -1})
    trainer, result = family.train(job)
    family.finite_run(result, "flokr")
    assert any(k.endswith(".lokr_w1") for k in load_file(str(result.final_lora)))
    fresh = make_adapter(flex2_model)
    batch, cond = family.red_circle_inputs(fresh, 3)
    family.check_round_trip("flex2", trainer.adapter, fresh, result.final_lora, "lokr", batch=batch, cond=cond,
                            linear_rank=2)


def test_quantized_base_trains_a_lora_diffusers_applies(flex2_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, "fq", flex2_model, shapes_dataset, train={"steps": 6}, sample={"sample_every": 1000},
               model={"quantize": True, "qtype": "qint8"})
    trainer, result = family.train(job)
    family.finite_run(result, "fq")
    family.check_quantized_base(trainer)
    plain = make_adapter(flex2_model)
    pipe = plain.sample_pipeline()
    before = _render(pipe, plain, "")
    pipe.load_lora_weights(str(result.final_lora))
    assert (_render(pipe, plain, "") - before).abs().max() > 1e-4


def test_shipped_plan_config_builds_flex2s_sizes() -> None:
    from aitk.plan.build import build_on_meta
    from aitk.plan.sources import model_spec

    spec = model_spec("ostris/Flex.2-preview", "flex2")
    transformer = build_on_meta(spec.parts["transformer"])
    count = sum(p.numel() for p in transformer.parameters())
    assert 8.0e9 < count < 8.3e9, count
    adapter = Flex2Adapter(ModelConfig(name_or_path="ostris/Flex.2-preview", arch="flex2"), CPU, torch.bfloat16)
    adapter.bind({"transformer": transformer}, spec.configs({}))
    with torch.device("meta"):
        batch, cond = adapter.example_batch(1, (1024, 768), 1, expert="main", with_controls=True)
    assert batch.noisy_latents.shape == (1, 16, 96, 128) and batch.extra[FLEX2_INPUTS].shape == (1, 33, 96, 128)
    assert cond.hidden_states.shape == (1, 512, 4096)


# --- families diffusers has no model class for ------------------------------------------------------


def _no_class_archs() -> list[str]:
    from aitk.models.archs import NO_DIFFUSERS_CLASS_ARCHS

    return sorted(NO_DIFFUSERS_CLASS_ARCHS)


@pytest.mark.parametrize("arch", _no_class_archs())
def test_a_family_without_a_diffusers_class_is_refused(arch: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from types import SimpleNamespace

    from aitk.config.validate import validate_command
    from aitk.models.archs import ADAPTERS, UNSUPPORTED_ARCH_LABELS
    from aitk.plan.planner import PlanInputError, _check_arch

    assert arch not in ADAPTERS
    process = base_process(tmp_path / "model", tmp_path, tmp_path / "out")
    process["model"]["arch"] = arch
    assert validate_command([str(write_job(tmp_path / "job.yaml", "nc", process))]) == 1
    err = capsys.readouterr().err
    assert f"model.arch: architecture {arch!r}" in err and "not supported: no diffusers model class" in err, err
    assert "Traceback" not in err
    with pytest.raises(PlanInputError, match=re.escape(f"({UNSUPPORTED_ARCH_LABELS[arch]}) is not supported")):
        _check_arch(SimpleNamespace(arch=arch))  # `aitk plan` says so in one line


def test_diffusers_has_no_class_for_them() -> None:
    """The refusal's reason holds for the installed diffusers: none of upstream's own model classes
    of these families is importable from it."""
    import diffusers

    for name in ("OmniGen2Transformer2DModel", "BooguImageTransformer2DModel", "MageFlowTransformer2DModel",
                 "ChromaRadianceTransformer2DModel", "FLiteTransformer2DModel", "ZetaChromaTransformer2DModel"):
        assert not hasattr(diffusers, name), name
