"""ai-toolkit's inline preview flags (`--ctrl_img path`, `--frames 9`, `--n ...` inside a sample
prompt): each is read into the preview request, wins over the sample settings as upstream's do,
reaches the model's preview pipeline (Kontext's control image, WAN I2V's first frame), and a flag
the model cannot use, a missing first frame or a missing control image file is said once."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import base_process, build_tiny_model, deep_update, write_job

from aitk.config.prompts import (
    INLINE_FLAGS,
    PreviewRequest,
    SamplePromptError,
    parse_prompt,
    preview_fields,
)
from aitk.config.schema import SampleConfig
from aitk.trainer.sampling import preview_requests, render_previews

DEFAULTS = PreviewRequest(prompt="", width=512, height=512, seed=42, guidance_scale=7.0, steps=20,
                          negative="", multiplier=1.0)

#: every spelling -> (value written, PreviewRequest field or None, value read)
SPELLINGS: dict[str, tuple[str, str | None, Any]] = {
    "n": ("blurry, dark", "negative", "blurry, dark"), "neg": ("ugly", "negative", "ugly"),
    "w": ("640", "width", 640), "width": ("320", "width", 320),
    "h": ("384", "height", 384), "height": ("256", "height", 256),
    "seed": ("7", "seed", 7), "d": ("-1", "seed", -1),
    "cfg": ("4.5", "guidance_scale", 4.5), "l": ("2", "guidance_scale", 2.0),
    "steps": ("12", "steps", 12), "s": ("3", "steps", 3),
    "m": ("0.5", "multiplier", 0.5), "network_multiplier": ("0.25", "multiplier", 0.25),
    "p2": ("an oil painting", "prompt_2", "an oil painting"), "n2": ("flat", "negative_2", "flat"),
    "gr": ("0.7", "guidance_rescale", 0.7),
    "frames": ("9", "num_frames", 9), "num_frames": ("13", "num_frames", 13), "fps": ("24", "fps", 24),
    "ctrl_img": ("/data/my inputs/a.png", "ctrl_img", "/data/my inputs/a.png"),
    "a": ("0.8", None, None), "ref": ("0.6", None, None), "ev": ("1,2.5", None, None),
    "extra_values": ("3", None, None), "ctrl_idx": ("1", None, None),
}


def test_the_table_covers_every_flag_upstream_reads():
    upstream = {"n", "p2", "n2", "w", "h", "d", "seed", "l", "cfg", "s", "steps", "m", "network_multiplier", "gr",
                "a", "ref", "ev", "extra_values", "frames", "num_frames", "fps", "ctrl_img", "ctrl_idx"}
    spellings = {name for flag in INLINE_FLAGS for name in flag.names}
    assert upstream <= spellings and spellings == set(SPELLINGS)


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_each_flag_is_read(name: str):
    written, field, value = SPELLINGS[name]
    request = parse_prompt(f"a red square  --{name} {written}  --seed 3", DEFAULTS)
    assert request.prompt == "a red square"
    canonical = next(f.names[0] for f in INLINE_FLAGS if name in f.names)
    assert canonical in request.flags
    if field is None:  # parsed and recorded, nothing else changes
        assert request == parse_prompt("a red square --seed 3", DEFAULTS)
    elif name not in ("seed", "d"):
        assert getattr(request, field) == value and request.seed == 3
    else:
        assert parse_prompt(f"a red square --{name} {written}", DEFAULTS).seed == value


def test_all_flags_together_and_text_around_them():
    request = parse_prompt("make the person smile  --ctrl_img /in/person1.jpg --w 640 --h 384 --d 9 --l 3 --s 5 "
                           "--n bad hands, blur --frames 17 --fps 8 --m 0.5", DEFAULTS)
    assert (request.prompt, request.ctrl_img, request.width, request.height, request.seed) == (
        "make the person smile", "/in/person1.jpg", 640, 384, 9)
    assert (request.guidance_scale, request.steps, request.negative, request.num_frames, request.fps,
            request.multiplier) == (3.0, 5, "bad hands, blur", 17, 8, 0.5)
    assert parse_prompt("a well--lit room -- at dusk --seed 3", DEFAULTS).prompt == "a well--lit room -- at dusk"


@pytest.mark.parametrize("text, message", [
    ("a cat --cgf 3", r"unknown flag --cgf; did you mean --cfg\?"),
    ("a cat --frames 2.5", r"--frames needs a number, got '2.5' \(a whole number\)"),
    ("a cat --ev 1,x", r"--ev needs a number, got '1,x' \(numbers separated by commas\)"),
    ("a cat --ctrl_img", r"--ctrl_img needs an image file path"),
    ("a cat --steps 0", r"--steps must be at least 1"),
])
def test_a_bad_flag_is_an_error_naming_prompt_and_flag(text: str, message: str):
    with pytest.raises(SamplePromptError, match=message) as caught:
        parse_prompt(text, DEFAULTS)
    assert repr(text) in str(caught.value)


def test_a_bad_flag_fails_validation_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from aitk.config.validate import validate_command

    job = _job_text(tmp_path, "sd15", {"prompts": ["a cat --cgf 3"]})
    assert validate_command([str(job)]) == 1
    err = capsys.readouterr().err
    assert "config.process[0].sample.prompts" in err and "unknown flag --cgf; did you mean --cfg?" in err, err


def test_flags_win_over_entries_which_win_over_the_section_as_upstream():
    cfg = SampleConfig(
        prompts=["[trigger] in the snow --n [trigger] blur", "a [trigger] portrait --seed 100", "random --seed -1"],
        samples=[{"prompt": "[trigger] at night --w 128", "width": 256, "seed": 5, "neg": "[trigger] dark",
                  "num_frames": 9, "fps": 12},
                 {"prompt": "plain", "ctrl_img": "/a.png", "network_multiplier": 0.3},
                 {"prompt": "inline --ctrl_img /b.png --m 0.8", "ctrl_img": "/a.png", "network_multiplier": 0.3}],
        seed=10, walk_seed=True, width=320, height=320, neg="low quality", ctrl_img="/section.png",
    )
    requests = preview_requests(cfg, "sks")
    assert [r.prompt for r in requests] == ["sks in the snow", "a sks portrait", "random", "sks at night", "plain",
                                            "inline"]
    assert [r.negative for r in requests] == ["sks blur", "low quality", "low quality", "sks dark", "low quality",
                                              "low quality"]
    # walk_seed walks the section's seed only: an entry's seed and --seed are taken as written
    assert [r.seed for r in requests] == [10, 100, -1, 5, 14, 15]
    assert [r.width for r in requests] == [320, 320, 320, 128, 320, 320]
    assert [(r.num_frames, r.fps) for r in requests][3] == (9, 12)
    assert [r.ctrl_img for r in requests] == ["/section.png"] * 4 + ["/a.png", "/b.png"]
    assert [r.multiplier for r in requests][4:] == [0.3, 0.8]


@dataclass
class _Output:
    images: torch.Tensor


class _RecordingPipeline:
    """Stands in for a diffusers pipeline: records each call's keyword arguments."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def set_progress_bar_config(self, **_: Any) -> None:
        pass

    def __call__(self, **kwargs: Any) -> _Output:
        self.calls.append(kwargs)
        return _Output(torch.zeros(1, 4, 8, 8))


def _render(tmp_path: Path, requests: list[PreviewRequest], **kwargs: Any) -> tuple[_RecordingPipeline, list[Path]]:
    pipeline = _RecordingPipeline()
    paths = render_previews(pipeline, requests, tmp_path / "samples", 0, set_multiplier=lambda _m: None,
                            decode=lambda _latents: [Image.new("RGB", (64, 64), (90, 10, 10))], **kwargs)
    return pipeline, paths


def test_second_prompts_and_guidance_rescale_reach_the_pipelines_that_take_them(tmp_path: Path):
    request = parse_prompt("a cat --p2 an oil painting --n2 flat --gr 0.7 --n blur", DEFAULTS)
    sdxl, _ = _render(tmp_path, [request], fields=preview_fields("sdxl"))
    assert {k: sdxl.calls[0].get(k) for k in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2",
                                               "guidance_rescale")} == {
        "prompt": "a cat", "prompt_2": "an oil painting", "negative_prompt": "blur", "negative_prompt_2": "flat",
        "guidance_rescale": 0.7}
    sd15, _ = _render(tmp_path, [request], fields=preview_fields("sd1"))
    assert sd15.calls[0]["guidance_rescale"] == 0.7 and "prompt_2" not in sd15.calls[0]
    flux, _ = _render(tmp_path, [request], fields=preview_fields("flux"))
    assert not {"prompt_2", "negative_prompt_2", "guidance_rescale"} & set(flux.calls[0])
    # cached embeddings: the text encoders are gone, the second prompts cannot be encoded
    cached, _ = _render(tmp_path, [request], fields=preview_fields("sdxl"),
                        prompt_kwargs=lambda _r: {"prompt_embeds": torch.zeros(1)})
    assert "prompt_2" not in cached.calls[0] and cached.calls[0]["guidance_rescale"] == 0.7


def test_seed_minus_one_draws_a_new_seed_and_skipped_previews_keep_their_numbers(tmp_path: Path):
    requests = [parse_prompt("fixed --seed 3", DEFAULTS), parse_prompt("random --seed -1", DEFAULTS),
                parse_prompt("skipped", DEFAULTS)]
    first, paths = _render(tmp_path, requests * 1, skip={2})
    second, _ = _render(tmp_path, requests, skip={2})
    seeds = [[call["generator"].initial_seed() for call in p.calls] for p in (first, second)]
    assert seeds[0][0] == seeds[1][0] == 3 and seeds[0][1] != seeds[1][1]
    assert [p.name for p in paths] == ["000000000_0.jpg", "000000000_1.jpg"]


def test_preview_fields_match_the_pipelines_and_adapters():
    import diffusers

    from aitk.models.archs import ADAPTERS
    from aitk.models.registry import adapter_class

    pipelines = {"sd1": "StableDiffusionPipeline", "sd15": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                 "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline", "flux_kontext": "FluxKontextPipeline",
                 "wan21": "WanPipeline", "wan22_14b": "WanPipeline", "wan21_i2v": "WanImageToVideoPipeline",
                 "wan22_14b_i2v": "WanImageToVideoPipeline", "lumina2": "Lumina2Pipeline",
                 "zimage": "ZImagePipeline", "qwen_image": "QwenImagePipeline",
                 "sd3": "StableDiffusion3Pipeline", "chroma": "ChromaPipeline",
                 "qwen_image_edit": "QwenImageEditPipeline", "qwen_image_edit_plus": "QwenImageEditPlusPipeline",
                 "flux2": "Flux2Pipeline", "flux2_klein_4b": "Flux2KleinPipeline", "flux2_klein_9b": "Flux2KleinPipeline",
                 "flex2": "FluxPipeline", "hidream": "HiDreamImagePipeline", "pixart": "PixArtAlphaPipeline",
                 "pixart_sigma": "PixArtSigmaPipeline", "auraflow": "AuraFlowPipeline", "cogview4": "CogView4Pipeline",
                 "krea2": "Krea2Pipeline", "ernie_image": "ErnieImagePipeline",
                 "wan22_5b": "WanImageToVideoPipeline", "ltx2": "LTX2ImageToVideoPipeline",
                 "hunyuan_video_1_5": "HunyuanVideo15Pipeline",
                 "hunyuan_video_1_5_i2v": "HunyuanVideo15ImageToVideoPipeline"}
    # Flex.2's control image enters as extra latent channels its adapter appends, not a pipeline argument
    control_by_adapter = {"flex2"}
    # pipelines that take reference / edit images these families do not train with yet (docs/models.md)
    image_not_used = {"flux2", "flux2_klein_4b", "flux2_klein_9b", "krea2"}
    assert set(pipelines) == set(ADAPTERS)
    for arch, name in pipelines.items():
        fields = preview_fields(arch)
        takes = inspect.signature(getattr(diffusers, name).__call__).parameters
        cls = adapter_class(arch)
        assert ("guidance_rescale" in fields) == ("guidance_rescale" in takes), arch
        assert "prompt_2" not in fields or "prompt_2" in takes, arch
        takes_image = ("image" in takes and arch not in image_not_used) or arch in control_by_adapter
        assert ("ctrl_img" in fields) == takes_image == (cls.uses_controls or getattr(cls, "i2v", False) or cls.optional_first_frame), arch
        assert ("num_frames" in fields) == (cls.frame_rule is not None), arch


# --- what a model cannot use: said by validate and the run's start ----------------------------------


def _job_text(tmp_path: Path, arch: str, sample: dict[str, Any], **process: Any) -> Path:
    body = deep_update({
        "training_folder": str(tmp_path / "out"),
        "datasets": [{"folder_path": str(tmp_path)}],
        "model": {"name_or_path": "/models/x", "arch": arch},
        "sample": {"width": 64, "height": 64, **sample},
    }, process)
    return write_job(tmp_path / f"{arch}.yaml", "flags", body)


@pytest.mark.parametrize("arch, sample, said", [
    ("sd1", {"prompts": ["a cat --ctrl_img /x.png"]}, "a preview control image (ctrl_img, --ctrl_img) on a model "
                                                       "that takes none"),
    ("flux", {"prompts": ["a cat --frames 9"]}, "video previews (num_frames above 1, --frames, --fps) on an image"),
    ("sdxl", {"num_frames": 9, "prompts": ["a cat"]}, "video previews"),
    ("flux", {"prompts": ["a cat --n blurry"]}, "a negative preview prompt (neg, --n) on FLUX"),
    ("sd1", {"prompts": ["a cat --p2 oil"]}, "--p2 / --n2"),
    ("wan21", {"prompts": ["a cat --gr 0.7"]}, "guidance rescale (guidance_rescale, --gr)"),
    ("sdxl", {"prompts": ["a cat --a 0.5 --ctrl_idx 1"]}, "the preview flags --a, --ref, --ev, --ctrl_idx"),
    ("wan21_i2v", {"prompts": ["a clip --frames 5"]}, "a preview without a first frame on an image-to-video model"),
    ("flux_kontext", {"prompts": ["make it red"]}, "a flux_kontext preview without a control image"),
])
def test_a_setting_the_model_cannot_use_is_a_warning(tmp_path: Path, arch: str, sample: dict, said: str):
    from aitk.config.loader import load_job_file

    warnings = load_job_file(_job_text(tmp_path, arch, sample)).warnings
    ours = [w for w in warnings if w.startswith("config.process[0].sample:")]
    assert len(ours) == 1 and said in ours[0], warnings


def test_flags_the_model_uses_give_no_warning(tmp_path: Path):
    from aitk.config.loader import load_job_file

    for arch, sample in [
        ("flux_kontext", {"prompts": ["make it red --ctrl_img /x.png --seed 3"]}),
        ("wan22_14b_i2v", {"samples": [{"prompt": "a clip --frames 9 --fps 8 --n blur", "ctrl_img": "/x.png"}]}),
        ("sdxl", {"prompts": ["a cat --p2 oil --n2 flat --gr 0.5 --n blur --w 128 --h 64 --l 5 --s 4 --m 0.7"]}),
        ("flux", {"num_frames": 1, "fps": 1, "prompts": ["a cat --cfg 3.5 --steps 4"]}),
    ]:
        warnings = load_job_file(_job_text(tmp_path, arch, sample)).warnings
        assert not [w for w in warnings if "sample" in w], (arch, warnings)


def test_validate_names_the_prompt_and_a_control_image_that_does_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from aitk.config.validate import validate_command

    Image.new("RGB", (8, 8)).save(tmp_path / "here.png")
    job = _job_text(tmp_path, "flux_kontext", {
        "prompts": [f"make it red --ctrl_img {tmp_path / 'here.png'}", f"make it blue --ctrl_img {tmp_path / 'gone.png'}"]
    })
    assert validate_command([str(job)]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "control image" in line]
    assert len(notes) == 1 and "config.process[0].sample.prompts[1]" in notes[0], out
    assert str(tmp_path / "gone.png") in notes[0] and "'make it blue'" in notes[0]


# --- the previews of real (tiny) models ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("flag-models")


def _square(path: Path, rgb: tuple[int, int, int]) -> Path:
    pixels = np.full((64, 64, 3), 128, dtype=np.uint8)
    pixels[16:48, 16:48] = rgb
    Image.fromarray(pixels).save(path)
    return path


def _spy(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[dict[str, Any]]:
    """Record the keyword arguments of every call of the pipeline class `cls`."""
    calls: list[dict[str, Any]] = []
    original = cls.__call__

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", recording)
    return calls


def test_kontext_run_previews_edit_the_inline_control_image(tiny_models: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch):
    from test_models_flux import _draw_pairs

    from aitk.config.loader import load_job_file
    from aitk.models.flux.kontext import _kontext_preview_pipeline_class
    from aitk.trainer.loop import Trainer

    data, controls = tmp_path / "pairs", tmp_path / "controls"
    _draw_pairs(data, controls)
    ctrl = _square(tmp_path / "input image.png", (20, 200, 40))
    calls = _spy(monkeypatch, _kontext_preview_pipeline_class())
    process = deep_update(base_process(build_tiny_model("kontext", tiny_models), data, tmp_path / "out"), {
        "model": {"arch": "flux_kontext"},
        "train": {"steps": 2, "batch_size": 1},
        "datasets": [{"folder_path": str(data), "control_path": str(controls), "resolution": [64]}],
        "sample": {"sample_every": 1000, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 3.5,
                   "prompts": [f"make the [trigger] green  --ctrl_img {ctrl} --seed 5",
                               f"make it blue --ctrl_img {tmp_path / 'missing.png'}"]},
    })
    loaded = load_job_file(write_job(tmp_path / "kontext.yaml", "kontext_flags", process))
    result = Trainer(loaded.job, loaded.job.config.process[0]).run()

    assert result.state == "completed"
    assert len(calls) == 2  # before training and at the end; the preview without its file is skipped
    for call in calls:
        assert call["prompt"] == "make the shp green" and call["generator"].initial_seed() == 5
        np.testing.assert_array_equal(np.asarray(call["image"]), np.asarray(Image.open(ctrl).convert("RGB")))
    samples = sorted(p.name for p in result.output_dir.joinpath("samples").iterdir())
    assert samples == ["000000000_0.jpg", "000000002_0.jpg"]
    log = (result.output_dir / "log.txt").read_text()
    skipped = [line for line in log.splitlines() if "is skipped" in line]
    assert len(skipped) == 1 and "preview 1 ('make it blue')" in skipped[0] and "missing.png" in skipped[0]
    assert "failed" not in log


def test_wan_i2v_preview_starts_from_the_inline_first_frame(tiny_models: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    from aitk.config.schema import ModelConfig
    from aitk.models.registry import create_adapter
    from aitk.models.wan.previews import _i2v_preview_pipeline_class

    adapter = create_adapter(ModelConfig(name_or_path=str(build_tiny_model("i2v", tiny_models)), arch="wan21_i2v"),
                             torch.device("cpu"), torch.float32)
    adapter.load()
    calls = _spy(monkeypatch, _i2v_preview_pipeline_class())
    red, blue = _square(tmp_path / "red.png", (220, 30, 30)), _square(tmp_path / "blue.png", (30, 30, 220))
    decoded: list[torch.Tensor] = []

    def decode(latents: torch.Tensor) -> list[Any]:
        decoded.append(latents.detach().clone())
        return adapter.decode_latents(latents)

    cfg = SampleConfig(width=64, height=64, sample_steps=2, guidance_scale=1.0,
                       prompts=[f"a clip --ctrl_img {red} --frames 5 --fps 8 --seed 4",
                                f"a clip --ctrl_img {blue} --frames 5 --fps 8 --seed 4"])
    paths = render_previews(adapter.sample_pipeline(None), preview_requests(cfg, None), tmp_path / "samples", 0,
                            decode=decode, set_multiplier=lambda _m: None, extra_kwargs=adapter.preview_kwargs,
                            fields=preview_fields("wan21_i2v"))

    assert [p.name for p in paths] == ["000000000_0.mp4", "000000000_0.webp", "000000000_1.mp4", "000000000_1.webp"]
    with Image.open(paths[1]) as webp:
        assert webp.n_frames == 5
    assert [c["num_frames"] for c in calls] == [5, 5] and all(c["prompt"] == "a clip" for c in calls)
    np.testing.assert_array_equal(np.asarray(calls[0]["image"]), np.asarray(Image.open(red).convert("RGB")))
    # the first frame conditions the denoiser: same seed and prompt, another image, other latents
    assert torch.isfinite(decoded[0]).all() and not torch.allclose(decoded[0], decoded[1])
