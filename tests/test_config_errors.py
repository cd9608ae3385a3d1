"""Malformed job files: each gives a JobFileError naming the key path, the value and a fix.

No model is loaded; every case is a few lines of text written to tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aitk.config.loader import JobFileError, load_job_file, parse_job_text
from aitk.config.validate import validate_command

GOOD = """\
job: extension
config:
  name: my_lora
  process:
    - type: sd_trainer
      training_folder: output
      network:
        type: lora
        linear: 16
        linear_alpha: 16
      datasets:
        - folder_path: /data/images
          resolution: 512
      train:
        steps: 100
        lr: 0.0001
        optimizer: adamw
      model:
        name_or_path: runwayml/stable-diffusion-v1-5
"""

P = "config.process[0]"


def edit(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


# (id, file name, text, substrings the message must contain: key path, bad value, fix hint)
CASES: list[tuple[str, str, str, list[str]]] = [
    ("bad_optimizer", "job.yaml", edit("optimizer: adamw", "optimizer: adamw9"),
     [f"{P}.train.optimizer:", "'adamw9'", "use one of adamw, adamw8bit, adafactor, prodigy, lion"]),
    ("bad_process_type", "job.yaml", edit("type: sd_trainer", "type: sd_train"),
     [f"{P}.type:", "'sd_train'", "sd_trainer, diffusion_trainer, ui_trainer"]),
    ("bad_job_kind", "job.yaml", edit("job: extension", "job: generate"),
     ["job:", "'generate'", "use one of extension, train"]),
    ("bad_network_type", "job.yaml", edit("type: lora", "type: lycoris"),
     [f"{P}.network.type:", "'lycoris'", "lora, locon, lokr"]),
    ("bad_save_dtype", "job.yaml", edit("      datasets:", "      save: {dtype: half}\n      datasets:"),
     [f"{P}.save.dtype:", "'half'", "float16"]),
    ("steps_not_a_number", "job.yaml", edit("steps: 100", "steps: many"),
     [f"{P}.train.steps:", "'many'", "a whole number"]),
    ("steps_negative", "job.yaml", edit("steps: 100", "steps: -100"),
     [f"{P}.train.steps:", "-100", ">= 1"]),
    ("steps_fraction", "job.yaml", edit("steps: 100", "steps: 10.5"),
     [f"{P}.train.steps:", "10.5", "whole number"]),
    ("lr_zero", "job.yaml", edit("lr: 0.0001", "lr: 0"),
     [f"{P}.train.lr:", ": 0 is out of range", "> 0"]),
    ("lr_text", "job.yaml", edit("lr: 0.0001", "lr: fast"),
     [f"{P}.train.lr:", "'fast'", "a number"]),
    ("rank_zero", "job.yaml", edit("linear: 16", "linear: 0"),
     [f"{P}.network.linear:", ": 0 is out of range", ">= 1"]),
    ("save_every_zero", "job.yaml", edit("      datasets:", "      save: {save_every: 0}\n      datasets:"),
     [f"{P}.save.save_every:", ": 0 is out of range", ">= 1"]),
    ("dropout_range", "job.yaml", edit("linear_alpha: 16", "linear_alpha: 16\n        dropout: 1.5"),
     [f"{P}.network.dropout:", "1.5", "between 0 and 1"]),
    ("caption_dropout_range", "job.yaml", edit("resolution: 512", "resolution: 512\n          caption_dropout_rate: -0.1"),
     [f"{P}.datasets[0].caption_dropout_rate:", "-0.1", "from 0 to 1"]),
    ("bool_wrong", "job.yaml", edit("steps: 100", "steps: 100\n        gradient_checkpointing: maybe"),
     [f"{P}.train.gradient_checkpointing:", "'maybe'", "true or false"]),
    ("resolution_not_multiple_of_8", "job.yaml", edit("resolution: 512", "resolution: 500"),
     [f"{P}.datasets[0].resolution:", "500", "multiple of 8", "496 or 504"]),
    ("resolution_too_small", "job.yaml", edit("resolution: 512", "resolution: [512, 32]"),
     [f"{P}.datasets[0].resolution:", "32", "at least 64"]),
    ("resolution_list_item_text", "job.yaml", edit("resolution: 512", "resolution: [512, big]"),
     [f"{P}.datasets[0].resolution[1]:", "'big'", "a whole number"]),
    ("resolution_text", "job.yaml", edit("resolution: 512", "resolution: large"),
     [f"{P}.datasets[0].resolution:", "'large'", "a whole number or a list of whole numbers"]),
    ("sample_width", "job.yaml", GOOD + "      sample: {width: 510, prompts: [a cat]}\n",
     [f"{P}.sample.width:", "510", "multiple of 8"]),
    ("prompts_not_a_list", "job.yaml", GOOD + "      sample: {prompts: a cat}\n",
     [f"{P}.sample.prompts:", "'a cat'", "a list of strings"]),
    ("datasets_is_a_mapping", "job.yaml", edit("        - folder_path: /data/images\n          resolution: 512",
                                               "          folder_path: /data/images"),
     [f"{P}.datasets:", "folder_path", "a list of entries", "`- `"]),
    ("train_not_a_section", "job.yaml", edit("      train:\n        steps: 100\n        lr: 0.0001\n        optimizer: adamw\n",
                                             "      train: 100\n"),
     [f"{P}.train:", "100 is not valid", "a section of key: value pairs"]),
    ("missing_folder_path", "job.yaml", edit("        - folder_path: /data/images\n", "        - caption_ext: txt\n"),
     [f"{P}.datasets[0].folder_path:", "required key missing", "folder_path: /data/my_images"]),
    ("missing_training_folder", "job.yaml", edit("      training_folder: output\n", ""),
     [f"{P}.training_folder:", "required key missing", "add `training_folder: output`"]),
    ("missing_name_or_path", "job.yaml", edit("        name_or_path: runwayml/stable-diffusion-v1-5\n", "        arch: sd1\n"),
     [f"{P}.model.name_or_path:", "required key missing", "name_or_path: runwayml/stable-diffusion-v1-5"]),
    ("missing_model", "job.yaml", edit("      model:\n        name_or_path: runwayml/stable-diffusion-v1-5\n", ""),
     [f"{P}.model:", "required key missing", "name_or_path"]),
    ("misspelt_required_key", "job.yaml", edit("name_or_path:", "model_path:"),
     [f"{P}.model.name_or_path:", "required key missing", "found 'model_path'"]),
    ("missing_name", "job.yaml", edit("  name: my_lora\n", ""),
     ["config.name:", "required key missing", "name: my_lora_v1"]),
    ("missing_config", "job.yaml", "job: extension\nmeta: {version: 1}\n",
     ["config:", "required key missing", "add a `config:` section"]),
    ("name_with_slash", "job.yaml", edit("name: my_lora", "name: ../escape"),
     ["config.name:", "'../escape'", "plain folder name"]),
    ("empty_datasets", "job.yaml", edit("      datasets:\n        - folder_path: /data/images\n          resolution: 512\n",
                                        "      datasets: []\n"),
     [f"{P}.datasets:", "the list is empty", "- folder_path: /data/my_images"]),
    ("empty_process_list", "job.yaml", "job: extension\nconfig:\n  name: x\n  process: []\n",
     ["config.process:", "the list is empty", "- type: sd_trainer"]),
    ("null_datasets", "job.yaml", edit("      datasets:\n        - folder_path: /data/images\n          resolution: 512\n",
                                       "      datasets:\n"),
     [f"{P}.datasets:", "empty", "folder_path: /data/my_images"]),
    ("denoising_range", "job.yaml", edit("steps: 100", "steps: 100\n        min_denoising_steps: 600\n        max_denoising_steps: 200"),
     [f"{P}.train.max_denoising_steps:", "200", "at least min_denoising_steps (600)"]),
    ("alpha_schedule_nested", "job.yaml", edit("linear_alpha: 16", "linear_alpha: 16\n        alpha_schedule:\n"
                                               "          enabled: true\n          conv_alpha_phases:\n"
                                               "            warm: {alpha: 4, exit_criteria: {min_gradient_stability: 1.5}}"),
     [f"{P}.network.alpha_schedule.conv_alpha_phases.warm.exit_criteria.min_gradient_stability:", "1.5", "from 0 to 1"]),
    ("yes_as_text", "job.yaml", edit("training_folder: output", "training_folder: output\n      trigger_word: yes"),
     [f"{P}.trigger_word:", "true", "quote the word"]),
    ("missing_env_var", "job.yaml", edit("/data/images", "${AITK_TEST_UNSET_VAR_123}/images"),
     ["AITK_TEST_UNSET_VAR_123", "line 12", "export AITK_TEST_UNSET_VAR_123=", ":-"]),
    ("yaml_syntax", "job.yaml", edit("        lr: 0.0001", "        lr: 0.0001: x"),
     ["line 16", "YAML syntax error", "indentation"]),
    ("yaml_tabs", "job.yaml", edit("        steps: 100", "\tsteps: 100"),
     ["line 15", "tab", "use spaces"]),
    ("yaml_unclosed_bracket", "job.yaml", edit("resolution: 512", "resolution: [512, 768"),
     ["line", "YAML syntax error", "brackets"]),
    ("json_syntax", "job.json", '{\n  "job": "extension",\n  "config": {"name": "x"\n  "process": []}\n}\n',
     ["line 4", "JSON syntax error", "missing comma"]),
    ("jsonc_missing_key", "job.jsonc",
     '// comment\n{"job": "extension", /* c */ "config": {"name": "x", "process": [{"datasets": '
     '[{"folder_path": "/d"}], "model": {"name_or_path": "m"},}],},}\n',
     [f"{P}.training_folder:", "required key missing", "training_folder: output"]),
    ("top_level_list", "job.yaml", "- job: extension\n",
     ["(top level)", "a list", "`job:`, `config:`"]),
    ("empty_file", "job.yaml", "",
     ["empty", "job: extension", "config:"]),
    ("only_comments", "job.yaml", "# job: extension\n",
     ["only comments", "job: extension"]),
]


@pytest.mark.parametrize("name,text,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_job_file(tmp_path: Path, capsys, name: str, text: str, expected: list[str]):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(JobFileError) as info:
        load_job_file(path, environ={})
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert info.value.problems and all(p in message for p in info.value.problems)
    for needle in expected:
        assert needle in message, f"{needle!r} not in:\n{message}"
    # never pydantic's raw text or a traceback
    for raw in ("Input should", "pydantic", "Traceback", "validation error"):
        assert raw not in message
    assert validate_command([str(path)]) == 1
    assert str(path) in capsys.readouterr().err


def test_there_are_at_least_25_malformed_cases():
    assert len(CASES) >= 25


def test_error_format_counts_problems(tmp_path):
    text = GOOD.replace("optimizer: adamw", "optimizer: adamw9").replace("        - folder_path: /data/images\n", "        - caption_ext: txt\n")
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(JobFileError) as info:
        load_job_file(path, environ={})
    lines = str(info.value).splitlines()
    assert lines[0] == f"{path}: 2 problems"
    assert lines[1].startswith("  config.process[0].datasets[0].folder_path: required key missing")
    assert lines[2].startswith("  config.process[0].train.optimizer: 'adamw9' is not valid; use one of adamw,")
    assert len(info.value.problems) == 2


def test_file_not_found(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(JobFileError) as info:
        load_job_file(missing)
    assert str(missing) in str(info.value) and "file not found" in str(info.value)
    assert validate_command([str(missing)]) == 1
    assert "file not found" in capsys.readouterr().err


def test_folder_and_binary_file(tmp_path, capsys):
    with pytest.raises(JobFileError, match="is a folder"):
        load_job_file(tmp_path)
    binary = tmp_path / "job.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(JobFileError, match="UTF-8"):
        load_job_file(binary)
    assert validate_command([str(tmp_path), str(binary)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_parse_job_text_uses_source_name():
    with pytest.raises(JobFileError) as info:
        parse_job_text("job: extension\n", source="inline.yaml")
    assert str(info.value).startswith("inline.yaml: 1 problem")
