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
    # walk_seed adds the prompt's index to its seed (inline and per-sample seeds included)
    assert [r.seed for r in requests] == [10, 101, 7]
    assert [r.width for r in requests] == [320, 320, 256]
