"""Preview prompts: inline flags, per-sample overrides, trigger word and walk_seed."""

from __future__ import annotations

import pytest

from aitk.config.schema import SampleConfig
from aitk.config.prompts import PreviewRequest, SamplePromptError, parse_prompt
from aitk.trainer.sampling import preview_requests

DEFAULTS = PreviewRequest(prompt="", width=512, height=512, seed=42, guidance_scale=7.0, steps=20,
                          negative="", multiplier=1.0)


def test_inline_flags_override_the_defaults():
    request = parse_prompt("a cat on a sofa --w 640 --h 384 --seed 7 --cfg 4.5 --steps 12 --n blurry, dark --m 0.5",
                           DEFAULTS)
    assert request == PreviewRequest("a cat on a sofa", 640, 384, 7, 4.5, 12, "blurry, dark", 0.5)


def test_a_prompt_without_flags_keeps_the_defaults():
    assert parse_prompt("  a dog  ", DEFAULTS) == PreviewRequest("a dog", 512, 512, 42, 7.0, 20, "", 1.0)


def test_a_double_dash_inside_words_is_not_a_flag():
    assert parse_prompt("a well--lit room --seed 3", DEFAULTS).prompt == "a well--lit room"


def test_a_bad_flag_value_names_the_prompt_and_flag():
    with pytest.raises(SamplePromptError, match=r"--w needs a number, got 'wide'"):
        parse_prompt("a cat --w wide", DEFAULTS)


def test_requests_apply_trigger_samples_and_walk_seed():
    cfg = SampleConfig(
        prompts=["[trigger] in the snow", "a [trigger] portrait --seed 100"],
        samples=[{"prompt": "[trigger] at night", "width": 256, "seed": 5}],
        seed=10, walk_seed=True, width=320, height=320,
    )
    requests = preview_requests(cfg, "sks")
    assert [r.prompt for r in requests] == ["sks in the snow", "a sks portrait", "sks at night"]
    # walk_seed adds the prompt's index to the section's seed; an inline --seed or a sample entry's
    # own seed is used as written (ai-toolkit: the prompt's flags and the entry win, unwalked)
    assert [r.seed for r in requests] == [10, 100, 5]
    assert [r.width for r in requests] == [320, 320, 256]


def test_a_sampler_the_model_cannot_use_is_named_with_what_runs_instead(tmp_path_factory):
    import torch

    from aitk.config.schema import ModelConfig
    from aitk.models.registry import create_adapter
    from aitk.models.sd import build_tiny_sd15
    from aitk.models.flux import build_tiny_flux
    from aitk.models.wan import build_tiny_wan

    root = tmp_path_factory.mktemp("samplers")
    models = {"sd1": build_tiny_sd15(root / "sd"), "flux": build_tiny_flux(root / "flux", "dev"),
              "wan21": build_tiny_wan(root / "wan", "t2v")}
    adapters = {}
    for arch, folder in models.items():
        adapters[arch] = create_adapter(ModelConfig(name_or_path=str(folder), arch=arch), torch.device("cpu"),
                                        torch.float32)
        adapters[arch].load()
    assert adapters["sd1"].preview_sampler_note("ddim") is None
    assert "Euler" in adapters["sd1"].preview_sampler_note("flowmatch")
    assert adapters["flux"].preview_sampler_note("flowmatch") is None
    assert "flow-match Euler" in adapters["flux"].preview_sampler_note("ddpm")
    assert adapters["wan21"].preview_sampler_note("flowmatch") is None
    note = adapters["wan21"].preview_sampler_note("dpm++")
    assert note and "dpm++ does not apply" in note


def test_the_run_says_which_sampler_previews_use(tmp_path, shapes_dataset):
    from conftest import base_process, deep_update, write_job

    from aitk.config.loader import load_job_file
    from aitk.models.flux import build_tiny_flux
    from aitk.trainer.loop import Trainer

    model = build_tiny_flux(tmp_path / "flux", "dev")
    process = deep_update(base_process(model, shapes_dataset, tmp_path / "out"), {
        "model": {"arch": "flux"},
        "train": {"steps": 1, "skip_first_sample": True},
        "sample": {"sampler": "dpm++", "sample_every": 100, "width": 64, "height": 64, "sample_steps": 1,
                   "prompts": ["a red circle"]},
    })
    loaded = load_job_file(write_job(tmp_path / "job.yaml", "job", process))
    trainer = Trainer(loaded.job, loaded.job.config.process[0])
    assert trainer.run().state == "completed"
    log = trainer.paths.log.read_text()
    assert "note: sample.sampler 'dpm++': previews use flow-match Euler" in log
