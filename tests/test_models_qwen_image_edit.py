"""Qwen-Image-Edit and Qwen-Image-Edit-2509 on tiny random-init models of the real classes: the
VL prompt inputs without Qwen2VLProcessor (pad expansion, the pipelines' own encoding), control
tokens after the target's, prompts read with each sample's control image files (and the text
cache keyed on them, the text encoder released), previews through QwenImageEdit(Plus)Pipeline
with ctrl_img_1 .. ctrl_img_3, LoRA runs whose files load exactly in diffusers, LoKr, DoRA, a
quantized base, and the tools (convert, merge, lora info).

Everything runs offline on CPU in fp32 with 64 px images.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from aitk.config.schema import ModelConfig, TrainConfig
from aitk.models.base import BatchContext, PromptEmbeds
from aitk.models.qwen_image_edit import (
    QwenEditInputError,
    QwenImageEditAdapter,
    QwenImageEditPlusAdapter,
    build_tiny_qwen_image_edit,
    expand_image_pads,
    prompt_inputs,
)
import family_checks as family
from conftest import base_process, deep_update, write_job
from interop_results import record
from upstream_jobs import extras_on_path  # noqa: F401 - autouse fixture: torchao for model.quantize

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def edit_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen-edit-models")
    return {v: build_tiny_qwen_image_edit(root / v, v) for v in ("edit", "edit_plus")}


def make_adapter(folder: Path, plus: bool, **kwargs: Any) -> QwenImageEditAdapter:
    cls = QwenImageEditPlusAdapter if plus else QwenImageEditAdapter
    adapter = cls(ModelConfig(name_or_path=str(folder), arch=cls.arch_names[0], **kwargs), CPU, torch.float32)
    adapter.load()
    return adapter


@pytest.fixture(scope="session")
def edit(edit_models: dict[str, Path]) -> QwenImageEditAdapter:
    return make_adapter(edit_models["edit"], False)


@pytest.fixture(scope="session")
def plus(edit_models: dict[str, Path]) -> QwenImageEditAdapter:
    return make_adapter(edit_models["edit_plus"], True, model_kwargs={"match_target_res": True})


def _pixels(seed: int, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _image(seed: int, w: int = 96, h: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# --- VL inputs -----------------------------------------------------------------------------------


def test_image_pads_expand_to_one_token_per_merged_patch(edit: QwenImageEditAdapter) -> None:
    # 56 x 84 px: 4 x 6 patches of 14 px, merged 2 x 2 -> 6 tokens (hand-checked)
    inputs = prompt_inputs(edit.tokenizer, edit.image_processor, ["<|vision_start|><|image_pad|><|vision_end|>hi"],
                           [_image(0, 84, 56)], CPU)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert inputs["pixel_values"].shape == (24, 3 * 2 * 14 * 14)  # t * h * w patches of 2 frames x 14 x 14
    pad = edit.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == pad).sum()) == 6
    assert expand_image_pads(["a<|image_pad|>b", "<|image_pad|>"], torch.tensor([[1, 2, 2], [1, 4, 2]]), 2) == [
        "a<|image_pad|>b", "<|image_pad|><|image_pad|>"]
    with pytest.raises(QwenEditInputError, match="2 image placeholders"):
        expand_image_pads(["<|image_pad|><|image_pad|>"], torch.tensor([[1, 2, 2]]), 2)


@pytest.mark.parametrize("which", ["edit", "plus"])
def test_prompt_encoding_is_the_pipelines(which: str, request: pytest.FixtureRequest) -> None:
    """Our encoding against the stock pipeline's _get_qwen_prompt_embeds, whose processor is
    replaced by our VL inputs (the only part that needs torchvision)."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    adapter: QwenImageEditAdapter = request.getfixturevalue(which)
    images = [_image(1), _image(2)] if adapter.plus else [_image(1)]

    class Processor:
        def __call__(self, text: list[str], images: Any, padding: bool, return_tensors: str) -> Any:
            from transformers import BatchFeature

            given = images if isinstance(images, list) else [images]
            return BatchFeature(prompt_inputs(adapter.tokenizer, adapter.image_processor, text, given, CPU))

    stock_class = QwenImageEditPlusPipeline if adapter.plus else QwenImageEditPipeline
    stock = stock_class(scheduler=None, vae=adapter.vae, text_encoder=adapter.text_encoder,
                        tokenizer=adapter.tokenizer, processor=Processor(), transformer=adapter.transformer)
    want, _ = stock._get_qwen_prompt_embeds("turn it blue", images if adapter.plus else images[0], CPU)
    ours = adapter.embed_prompt("turn it blue", images)
    assert ours.shape == want.shape and torch.equal(ours, want)
    # the control image changes what the prompt means
    assert (adapter.embed_prompt("turn it blue", [_image(3)] * len(images)) - ours).abs().max() > 1e-4


# --- prompts read with their control image files ---------------------------------------------------


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def test_prompts_are_read_with_their_control_files(plus: QwenImageEditAdapter, tmp_path: Path) -> None:
    first, second = _save(_image(1, 96, 64), tmp_path / "a.png"), _save(_image(2, 48, 80), tmp_path / "b.png")
    got = plus.encode_prompts_with_controls(["make it red"], [(first, second)])
    # each file whole, at its own aspect, resized as the 2509 pipeline does for its text encoder
    images = [Image.open(f).convert("RGB") for f in (first, second)]
    want = plus.embed_prompt("make it red", plus.condition_images(images))
    assert torch.equal(got.hidden_states, want) and bool(got.extra["mask"].all())
    swapped = plus.encode_prompts_with_controls(["make it red"], [(second, first)])
    assert swapped.hidden_states.shape == got.hidden_states.shape
    assert (swapped.hidden_states - got.hidden_states).abs().max() > 1e-4  # "Picture 1" is the first file
    text_only = plus.encode_prompts(["make it red"])  # unload_text_encoder's fixed prompts: no images
    assert text_only.hidden_states.shape[1] < got.hidden_states.shape[1]


def test_the_text_cache_keys_on_caption_and_control_files(edit: QwenImageEditAdapter, tmp_path: Path) -> None:
    from aitk.data.text_cache import TextEmbeddingCache, text_key
    from aitk.trainer.conditioning import PromptConditioner

    first, second = _save(_image(1), tmp_path / "a.png"), _save(_image(2), tmp_path / "b.png")
    folder = tmp_path / "_text_cache"
    cache = TextEmbeddingCache(folder, edit.text_encoder_id())
    conditioner = PromptConditioner(edit, cache)
    assert conditioner.precompute([("turn it red", (first,)), ("turn it red", (second,)), ("turn it red", (first,))]) == 2
    assert len(list(folder.glob("*.safetensors"))) == 2
    batch = conditioner(["turn it red", "turn it red"], [(first,), (second,)])
    for row, files in enumerate([(first,), (second,)]):
        want = edit.encode_prompts_with_controls(["turn it red"], [files]).hidden_states[0]
        assert torch.equal(batch.hidden_states[row], want)
    assert (batch.hidden_states[0] - batch.hidden_states[1]).abs().max() > 1e-4
    # an edited control image (new modification time) is a new entry; the old one stays valid for the other
    stat = first.stat()
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache.missing([("turn it red", (first,)), ("turn it red", (second,))]) == [("turn it red", (first,))]
    # without control files the key is the caption's alone, as for every other family
    assert cache.key("turn it red") == text_key(edit.text_encoder_id(), "turn it red")


# --- training inputs -----------------------------------------------------------------------------


def test_control_tokens_follow_the_target(plus: QwenImageEditAdapter) -> None:
    latents = plus.encode_images(_pixels(0, 2, 3, 64, 96))
    # two control folders; 8-bit values, as decoded image files give (the pipeline path goes through PIL)
    controls = ((_pixels(1, 2, 2, 3, 64, 96) + 1) * 127.5).round() / 127.5 - 1
    batch = plus.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(0), BatchContext(controls=controls))
    assert batch.extra["img_shapes"] == [[(1, 4, 6), (1, 4, 6), (1, 4, 6)]] * 2
    assert batch.extra["control_tokens"].shape == (2, 48, 64)
    for k in range(2):  # each folder's control, VAE-encoded and packed, in control_path order
        got = batch.extra["control_tokens"][:, 24 * k : 24 * (k + 1)]
        assert torch.allclose(got, _packed(plus, controls[:, k]), atol=1e-5)
    cond = PromptEmbeds.cat([plus.encode_prompts(["make it red"]), plus.encode_prompts(["blue, please"])])
    with torch.no_grad():
        out = plus.predict(batch, cond)
        other = dict(batch.extra, control_tokens=batch.extra["control_tokens"].flip(0))
        swapped = plus.predict(type(batch)(batch.noisy_latents, batch.timesteps, batch.target, None, other), cond)
    assert out.shape == latents.shape and (out - swapped).abs().max() > 1e-5  # each sample sees its controls
    with pytest.raises(QwenEditInputError, match="control_path"):
        plus.make_noisy_batch(latents, TrainConfig(), None, BatchContext())


def _packed(adapter: QwenImageEditAdapter, pixels: torch.Tensor) -> torch.Tensor:
    from aitk.models.qwen_image import pack_latents

    return pack_latents(adapter.encode_images(pixels))


def test_edit_takes_one_control_image(edit: QwenImageEditAdapter, tmp_path: Path) -> None:
    latents = edit.encode_images(_pixels(0, 1, 3, 64, 64))
    with pytest.raises(QwenEditInputError, match="qwen_image_edit_plus"):
        edit.make_noisy_batch(latents, TrainConfig(), None, BatchContext(controls=_pixels(1, 1, 2, 3, 64, 64)))
    files = (_save(_image(1), tmp_path / "a.png"), _save(_image(2), tmp_path / "b.png"))
    with pytest.raises(QwenEditInputError, match="qwen_image_edit_plus"):
        edit.encode_prompts_with_controls(["x"], [files])


# --- runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edit_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Pairs (a filled circle from its outline) and a second control folder: a swatch of the colour
    at another size and aspect (the text encoder reads it whole)."""
    from test_models_flux import _draw_pairs

    root = tmp_path_factory.mktemp("qwen-edit-data")
    data, controls, swatches = root / "pairs", root / "controls", root / "swatches"
    _draw_pairs(data, controls)
    swatches.mkdir()
    for name, rgb in (("red", (220, 40, 40)), ("blue", (50, 80, 220))):
        Image.new("RGB", (48, 80), rgb).save(swatches / f"{name}.png")
    return data, controls, swatches


def _job(tmp: Path, name: str, model_dir: Path, arch: str, data: Path, controls: Any, **changes: Any) -> Path:
    process = deep_update(base_process(model_dir, data, tmp / "out"), {
        "model": {"arch": arch},
        "train": {"steps": 12, "batch_size": 1, "lr": 5e-3, "lr_scheduler": "constant"},
        "network": {"type": "lora", "linear": 8, "linear_alpha": 16},
        "save": {"save_every": 1000},
        "sample": {"sample_every": 1000, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 3.0,
                   "prompts": ["turn it red"], "seed": 5},
    })
    process = deep_update(process, changes)
    process["datasets"][0]["control_path"] = [str(c) for c in controls] if isinstance(controls, list) else str(controls)
    return write_job(tmp / f"{name}.yaml", name, process)


def _run(job: Path) -> tuple:
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    loaded = load_job_file(job)
    trainer = Trainer(loaded.job, loaded.job.config.process[0])
    return trainer, trainer.run()


@pytest.fixture(scope="module")
def edit_run(edit_models: dict[str, Path], edit_data: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Qwen-Image-Edit with cache_text_embeddings (ai-toolkit's 32 GB example sets it)."""
    tmp = tmp_path_factory.mktemp("qwen-edit-lora")
    data, controls, _ = edit_data
    ctrl = sorted(controls.iterdir())[0]
    job = _job(tmp, "qedit", edit_models["edit"], "qwen_image_edit", data, controls,
               train={"cache_text_embeddings": True}, sample={"ctrl_img": str(ctrl)})
    return (*_run(job), ctrl, tmp)


def test_cached_run_keys_its_text_cache_on_control_files_and_releases_the_encoder(edit_run: tuple) -> None:
    trainer, result, _, _ = edit_run
    assert result.state == "completed" and result.step == 12
    assert trainer.adapter.text_encoder is None and trainer.conditioner.encoders_released
    pairs = trainer.data.all_captions_with_controls()
    assert pairs and all(len(files) == 1 for _, files in pairs)
    cache = trainer.conditioner.text_cache
    wanted = set(pairs) | set(trainer._preview_prompts())
    assert {cache.key(c, f) for c, f in wanted} == {p.stem for p in cache.folder.glob("*.safetensors")}
    samples = sorted(p.name for p in (result.output_dir / "samples").iterdir())
    assert samples == ["000000000_0.jpg", "000000012_0.jpg"]  # rendered from the cached embeddings


def _edit_renderer(images: Any, pos: torch.Tensor, neg: torch.Tensor) -> Any:
    def render(pipe: Any) -> torch.Tensor:
        pipe.set_progress_bar_config(disable=True)
        return pipe(image=images, prompt_embeds=pos, negative_prompt_embeds=neg, true_cfg_scale=3.0, height=64,
                    width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(3),
                    output_type="latent").images

    return render


def _embeds(adapter: QwenImageEditAdapter, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    view = adapter.condition_images(images)
    return adapter.embed_prompt("turn it red", view), adapter.embed_prompt("", view)


def _stock_diff(trainer: Any, model: Path, lora: Path, pipeline_cls: type, images: list[Image.Image]) -> tuple:
    """(max |ours - diffusers' pipeline with the file|, max |ours - without it|)."""
    fresh = make_adapter(model, trainer.adapter.plus)
    pos, neg = _embeds(fresh, images)
    given = images if trainer.adapter.plus else images[0]

    class Stock:  # the folder has no Qwen2VLProcessor (it needs torchvision); embeddings are given
        @staticmethod
        def from_pretrained(folder: Path) -> Any:
            return pipeline_cls.from_pretrained(folder, processor=None)

    return family.diffusers_lora_diff(trainer.adapter, Stock, model, lora, _edit_renderer(given, pos, neg))


def test_lora_trains_and_loads_exactly_in_diffusers(edit_run: tuple, edit_models: dict[str, Path]) -> None:
    from diffusers import QwenImageEditPipeline
    from safetensors.torch import load_file

    trainer, result, ctrl, _ = edit_run
    losses = family.losses(result, "qedit")
    assert len(losses) == 12 and all(np.isfinite(losses))
    tensors = load_file(str(result.final_lora))
    assert tensors and all(k.startswith("diffusion_model.transformer_blocks.") for k in tensors)
    diff, effect = _stock_diff(trainer, edit_models["edit"], result.final_lora, QwenImageEditPipeline,
                               [Image.open(ctrl).convert("RGB")])
    print(f"qwen_image_edit: diffusers max abs diff {diff:.2e}, LoRA effect {effect:.2e}")
    record("qwen_image_edit", "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="comfyui")
    assert effect > 1e-3 and diff < 1e-4, (diff, effect)


def test_convert_merge_and_lora_info_on_an_edit_file(edit_run: tuple, edit_models: dict[str, Path]) -> None:
    from diffusers import QwenImageTransformer2DModel

    trainer, result, _, tmp = edit_run
    # no header: Qwen-Image's keys, and the note that the edit models share them
    info = family.check_lora_info(trainer, result.final_lora, "qwen_image_edit", tmp)
    assert info["architecture"] == "qwen_image"
    assert "qwen_image_edit / qwen_image_edit_plus files have these keys too" in info["architecture_source"]
    family.diffusers_layout_round_trip(result.final_lora, "qwen_image_edit", tmp)
    adapter = trainer.adapter
    latents = adapter.encode_images(_pixels(0, 1, 3, 64, 64))
    batch = adapter.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(1),
                                     BatchContext(controls=_pixels(2, 1, 3, 64, 64)))
    cond = make_adapter(edit_models["edit"], False).encode_prompts(["turn it red"])
    family.check_merge("qwen_image_edit", adapter, edit_models["edit"], result.final_lora, tmp,
                       QwenImageTransformer2DModel, batch, cond)


@pytest.fixture(scope="module")
def plus_run(edit_models: dict[str, Path], edit_data: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Qwen-Image-Edit-2509: two control folders, previews with ctrl_img_1 and ctrl_img_2 (the
    text encoder stays: prompts are encoded as they come and kept in memory)."""
    tmp = tmp_path_factory.mktemp("qwen-edit-plus-lora")
    data, controls, swatches = edit_data
    ctrls = [sorted(controls.iterdir())[0], sorted(swatches.iterdir())[0]]
    job = _job(tmp, "qplus", edit_models["edit_plus"], "qwen_image_edit_plus", data, [controls, swatches],
               model={"model_kwargs": {"match_target_res": True}},
               sample={"prompts": [], "samples": [{"prompt": "turn it red", "ctrl_img_1": str(ctrls[0]),
                                                   "ctrl_img_2": str(ctrls[1])}]})
    return (*_run(job), ctrls, tmp)


def test_plus_lora_loads_exactly_in_the_edit_plus_pipeline(plus_run: tuple, edit_models: dict[str, Path]) -> None:
    from diffusers import QwenImageEditPlusPipeline

    trainer, result, ctrls, _ = plus_run
    assert result.state == "completed" and all(math.isfinite(x) for x in family.losses(result, "qplus"))
    assert trainer.adapter.text_encoder is not None  # nothing cached: steps encode new pairs as they come
    images = [Image.open(c).convert("RGB") for c in ctrls]
    diff, effect = _stock_diff(trainer, edit_models["edit_plus"], result.final_lora, QwenImageEditPlusPipeline, images)
    print(f"qwen_image_edit_plus: diffusers max abs diff {diff:.2e}, LoRA effect {effect:.2e}")
    record("qwen_image_edit_plus", "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="comfyui")
    assert effect > 1e-3 and diff < 1e-4, (diff, effect)


def test_plus_previews_read_ctrl_img_1_to_3_at_their_own_size(plus_run: tuple) -> None:
    trainer, result, ctrls, _ = plus_run
    [request] = trainer.preview_requests
    assert trainer.adapter.preview_control_files(request) == tuple(ctrls)
    images = trainer.adapter.preview_kwargs(request)["image"]
    assert [image.size for image in images] == [(64, 64), (48, 80)]
    assert sorted(p.name for p in (result.output_dir / "samples").iterdir()) == ["000000000_0.jpg", "000000012_0.jpg"]


@pytest.mark.parametrize("variant", ["lokr", "dora", "qint8"])
def test_network_variants_train(variant: str, edit_models: dict[str, Path], edit_data: tuple, tmp_path: Path) -> None:
    """LoKr (read back by aitk's loader), DoRA saved for diffusers (loads exactly) and a qint8 base
    with unload_text_encoder (text encoder released; the LoRA changes diffusers' output)."""
    from diffusers import QwenImageEditPipeline
    from safetensors.torch import load_file

    data, controls, _ = edit_data
    model = edit_models["edit"]
    changes: dict[str, Any] = {
        "lokr": {"network": {"type": "lokr", "linear": 2, "linear_alpha": 4, "lokr_factor": -1}},
        "dora": {"network": {"dora": True, "linear": 4, "linear_alpha": 8}, "save": {"save_format": "diffusers"}},
        "qint8": {"model": {"quantize": True, "qtype": "qint8"}, "train": {"unload_text_encoder": True}},
    }[variant]
    job = _job(tmp_path, f"q{variant}", model, "qwen_image_edit", data, controls, **deep_update(
        {"train": {"steps": 6}, "sample": {"sample_every": 1000, "prompts": []}}, changes))
    trainer, result = _run(job)
    assert result.state == "completed" and all(math.isfinite(x) for x in family.losses(result, f"q{variant}"))
    tensors = load_file(str(result.final_lora))
    ctrl = sorted(controls.iterdir())[0]
    if variant == "lokr":
        assert any(k.endswith(".lokr_w1") for k in tensors)
        adapter = trainer.adapter
        batch = adapter.make_noisy_batch(adapter.encode_images(_pixels(0, 1, 3, 64, 64)), TrainConfig(),
                                         torch.Generator().manual_seed(2), BatchContext(controls=_pixels(1, 1, 3, 64, 64)))
        cond = adapter.encode_prompts_with_controls(["turn it red"], [(ctrl,)])
        diff = family.loader_round_trip_diff(adapter, make_adapter(model, False), result.final_lora, batch, cond,
                                             network_type="lokr", linear_rank=2)
        record("qwen_image_edit", "lokr", "aitk loader (round trip)", diff < 1e-5, diff)
        assert diff < 1e-5
        return
    diff, effect = _stock_diff(trainer, model, result.final_lora, QwenImageEditPipeline, [Image.open(ctrl).convert("RGB")])
    if variant == "dora":
        assert any(k.endswith("lora_magnitude_vector") for k in tensors)
        record("qwen_image_edit", "dora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="diffusers")
        assert effect > 1e-3 and diff < 1e-4, (diff, effect)
        return
    assert trainer.adapter.text_encoder is None  # unload_text_encoder: released after the fixed prompts
    layers = [m for m in trainer.network.lora_layers().values() if isinstance(m.base_layer, torch.nn.Linear)]
    assert layers and all("torchao" in type(m.base_layer.weight).__module__ for m in layers)
    assert effect > 1e-4  # the LoRA (on a quantized base) changes the plain model's output


# --- the memory plan and presets ----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen_image_edit", "qwen_image_edit_plus"])
def test_plan_builds_the_real_model_from_shipped_configs(arch: str) -> None:
    """`aitk plan` reads the shipped public configs (nothing downloaded): the parts at their real
    sizes (the text encoder keeps its vision tower), and the adapter's example batch holds the
    control image's tokens after the target's and in the prompt."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from aitk.models.registry import adapter_class
    from aitk.plan.build import build_on_meta
    from aitk.plan.sources import model_spec

    hub_id = "Qwen/Qwen-Image-Edit-2509" if arch.endswith("plus") else "Qwen/Qwen-Image-Edit"
    spec = model_spec(hub_id, arch)
    parts = {name: build_on_meta(part) for name, part in spec.parts.items()}
    billions = {name: sum(p.numel() for p in m.parameters()) / 1e9 for name, m in parts.items()}
    assert 20.3 < billions["transformer"] < 20.5 and 8.2 < billions["text_encoder"] < 8.4, billions
    adapter = adapter_class(arch)(ModelConfig(name_or_path=hub_id, arch=arch), CPU, torch.bfloat16)
    adapter.bind({"transformer": parts["transformer"]}, spec.configs({}))
    with FakeTensorMode():
        noisy, cond = adapter.example_batch(1, (1024, 768), 1, expert="main", with_controls=True)
    assert noisy.noisy_latents.shape == (1, 16, 96, 128)
    target, control = noisy.extra["img_shapes"][0]
    assert target == (1, 48, 64) and noisy.extra["control_tokens"].shape[1] == control[1] * control[2]
    assert cond.hidden_states.shape[1] > 512 and cond.hidden_states.shape[2] == 3584  # text + image tokens


def test_presets_validate_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from aitk.config.validate import validate_command
    from aitk.ui.presets import PRESETS

    ctrl = _save(_image(0), tmp_path / "ctrl.png")
    for key in ("qwen_image_edit", "qwen_image_edit_plus"):
        job = PRESETS[key]["job"]
        process = job["config"]["process"][0]
        process["datasets"][0].update(folder_path=str(tmp_path), control_path=str(tmp_path))
        process["sample"]["ctrl_img"] = str(ctrl)  # the form asks for these two
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump(job))
        assert validate_command([str(path)]) == 0
        printed = capsys.readouterr()
        assert "warning" not in printed.out + printed.err, (key, printed)
