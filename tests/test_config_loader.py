"""Job-file loading: formats, substitution, warnings, round trip. No model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from aitk.config.loader import JobFileError, LoadedJob, dump_job, load_job_file, parse_job_text
from aitk.config.schema import JobFile
from aitk.config.support import unsupported_warnings
from aitk.config.validate import validate_command

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "config" / "examples").glob("*.y*ml")) + sorted(
    (REPO / "config" / "examples").glob("*.json*")
)

MINIMAL = """\
job: extension
config:
  name: my_lora
  process:
    - type: sd_trainer
      training_folder: output
      network: {type: lora, linear: 8, linear_alpha: 4}
      datasets:
        - folder_path: /data/images
      model:
        name_or_path: runwayml/stable-diffusion-v1-5
"""


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(text: str, **kw) -> LoadedJob:
    kw.setdefault("environ", {})
    return parse_job_text(text, source="job.yaml", **kw)


# ---------------------------------------------------------------------------------------------
# examples


def test_there_are_examples():
    names = {p.name for p in EXAMPLES}
    assert {"sd15_lora.yaml", "sd15_locon.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates(path: Path, capsys):
    loaded = load_job_file(path, environ={})
    assert loaded.job.config.process
    assert validate_command([str(path)]) == 0
    out = capsys.readouterr().out
    assert f"OK {path}" in out


def test_sd15_examples_have_no_warnings():
    lora = load_job_file(REPO / "config/examples/sd15_lora.yaml", environ={})
    assert lora.warnings == []
    net = lora.job.config.process[0].network
    assert (net.type, net.linear_rank, net.linear_alpha_value, net.conv_rank) == ("lora", 16, 16.0, None)
    assert lora.job.config.process[0].datasets[0].resolutions == [512]
    assert lora.job.meta["name"] == "my_sd15_lora"  # [name] substituted
    assert lora.job.config.process[0].model.resolved_arch == "sd1"

    locon = load_job_file(REPO / "config/examples/sd15_locon.yaml", environ={})
    assert locon.warnings == []
    net = locon.job.config.process[0].network
    assert (net.conv_rank, net.conv_alpha_value) == (8, 4.0)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_round_trip_through_dump(path: Path, tmp_path: Path):
    job = load_job_file(path, environ={}).job
    again = load_job_file(write(tmp_path, dump_job(job), "config.yaml"), environ={}).job
    assert again == job


# ---------------------------------------------------------------------------------------------
# formats


def test_minimal_yaml_defaults():
    job = load(MINIMAL).job
    p = job.config.process[0]
    assert job.job == "extension"
    assert p.train.steps == 1000 and p.train.lr == pytest.approx(1e-4)
    assert p.save.save_every == 1000 and p.save.dtype == "float16"
    assert p.datasets[0].resolution == 512 and p.datasets[0].caption_ext == "txt"
    assert p.network.linear_rank == 8 and p.network.linear_alpha_value == 4.0


def test_jsonc_with_comments_and_trailing_commas(tmp_path):
    text = """\
// a JSONC job file
{
  /* block
     comment */
  "job": "extension",
  "config": {
    "name": "json_lora", // trailing comment with "quotes" and a // inside
    "process": [
      {
        "training_folder": "output",
        "network": {"type": "lora", "linear": 4,},
        "datasets": [{"folder_path": "/data/[name]", "caption_ext": "txt",},],
        "model": {"name_or_path": "http://example.com/model"},
      },
    ],
  },
}
"""
    loaded = load_job_file(write(tmp_path, text, "job.jsonc"), environ={})
    p = loaded.job.config.process[0]
    assert p.datasets[0].folder_path == "/data/json_lora"
    assert p.model.name_or_path == "http://example.com/model"  # // inside a string is kept
    assert loaded.warnings == []


def test_plain_json(tmp_path):
    import json

    data = {
        "job": "extension",
        "config": {
            "name": "j",
            "process": [
                {
                    "training_folder": "out",
                    "network": {"type": "lora"},
                    "datasets": [{"folder_path": "/d"}],
                    "model": {"name_or_path": "m"},
                }
            ],
        },
    }
    loaded = load_job_file(write(tmp_path, json.dumps(data), "job.json"), environ={})
    assert loaded.job.config.name == "j"


def test_yaml_1_2_floats_in_free_form_dicts():
    text = MINIMAL.replace(
        "      model:", "      train:\n        lr: 3e-5\n        optimizer_params: {weight_decay: 1e-2}\n      model:"
    )
    p = load(text).job.config.process[0]
    assert p.train.lr == pytest.approx(3e-5)
    assert p.train.optimizer_params["weight_decay"] == pytest.approx(0.01)
    assert isinstance(p.train.optimizer_params["weight_decay"], float)


def test_choices_are_case_insensitive_and_empty_sections_mean_defaults():
    text = MINIMAL.replace(
        "      model:", "      train:\n        optimizer: AdamW8bit\n        dtype: BF16\n      save:\n      model:"
    )
    p = load(text).job.config.process[0]
    assert p.train.optimizer == "adamw8bit" and p.train.dtype == "bf16"
    assert p.save.save_every == 1000


def test_numbers_accepted_as_text():
    job = load(MINIMAL.replace("name: my_lora", "name: 2024")).job
    assert job.config.name == "2024"


# ---------------------------------------------------------------------------------------------
# substitution


def test_env_substitution_and_defaults():
    text = MINIMAL.replace("/data/images", "${DATA}/images").replace(
        "training_folder: output", "training_folder: ${OUT:-fallback_out}"
    )
    p = load(text, environ={"DATA": "/mnt/d"}).job.config.process[0]
    assert p.datasets[0].folder_path == "/mnt/d/images"
    assert p.training_folder == "fallback_out"
    p = load(text, environ={"DATA": "/x", "OUT": "set_out"}).job.config.process[0]
    assert p.training_folder == "set_out"


def test_env_substitution_uses_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("AITK_TEST_DATA_DIR", "/from/env")
    text = MINIMAL.replace("/data/images", "${AITK_TEST_DATA_DIR}")
    loaded = parse_job_text(text)
    assert loaded.job.config.process[0].datasets[0].folder_path == "/from/env"


def test_env_in_comments_is_ignored_and_dollar_escape():
    text = MINIMAL + "# ${NOT_SET_ANYWHERE} in a comment\nmeta:\n  note: \"costs $${PRICE}\"  # ${ALSO_NOT_SET}\n"
    job = load(text).job
    assert job.meta["note"] == "costs ${PRICE}"


def test_name_substitution_everywhere():
    text = MINIMAL.replace("/data/images", "/data/[name]") + (
        "meta:\n  name: \"[name]\"\n  nested: {list: [\"[name]_a\", 3]}\n"
    )
    job = load(text).job
    assert job.config.process[0].datasets[0].folder_path == "/data/my_lora"
    assert job.meta == {"name": "my_lora", "nested": {"list": ["my_lora_a", 3]}}


def test_trigger_placeholder_is_left_for_the_trainer():
    text = MINIMAL + "      sample:\n        prompts: [\"[trigger] a cat\"]\n"
    job = load(text).job
    assert job.config.process[0].sample.prompts == ["[trigger] a cat"]


# ---------------------------------------------------------------------------------------------
# warnings: unknown keys, known but unsupported


def test_unknown_key_warns_with_did_you_mean():
    text = MINIMAL.replace("      model:", "      train:\n        learning_rate: 0.001\n        stesp: 10\n      model:")
    loaded = load(text)
    assert "config.process[0].train.learning_rate: unknown key; did you mean 'lr'?" in loaded.warnings
    assert "config.process[0].train.stesp: unknown key; did you mean 'steps'?" in loaded.warnings


def test_unknown_key_in_wrong_section_says_where_it_belongs():
    text = MINIMAL.replace("linear_alpha: 4}", "linear_alpha: 4, batch_size: 2}")
    (warning,) = load(text).warnings
    assert warning.startswith("config.process[0].network.batch_size: unknown key")
    assert "train:" in warning


def test_unknown_key_is_an_error_with_strict(tmp_path):
    text = MINIMAL.replace("      model:", "      train:\n        learning_rate: 0.001\n      model:")
    with pytest.raises(JobFileError) as info:
        load_job_file(write(tmp_path, text), strict=True, environ={})
    assert "config.process[0].train.learning_rate: unknown key; did you mean 'lr'?" in str(info.value)
    assert len(info.value.problems) == 1
    assert validate_command([str(tmp_path / "job.yaml")], strict=True) == 1
    assert validate_command([str(tmp_path / "job.yaml")]) == 0


def test_free_form_dicts_are_not_unknown():
    text = MINIMAL.replace(
        "      model:",
        "      train:\n        optimizer_params: {foo: 1}\n        lr_scheduler_params: {bar: 2}\n"
        "      model:\n        model_kwargs: {baz: 3}",
    ) + "meta:\n  anything: goes\n"
    assert load(text, strict=True).warnings == []


def test_known_but_unsupported_warnings():
    text = """\
job: extension
config:
  name: x
  process:
    - training_folder: out
      network:
        type: lokr
        lokr_factor: 4
        pretrained_lora_path: /a.safetensors
        alpha_schedule: {enabled: true}
      datasets:
        - folder_path: /d
          num_frames: 33
          control_path: /c
          is_reg: true
      train: {optimizer: automagic, train_text_encoder: true, train_unet: false}
      save: {push_to_hub: true}
      model: {name_or_path: black-forest-labs/FLUX.1-dev, is_flux: true, quantize: true, low_vram: true}
"""
    loaded = load(text)
    joined = "\n".join(loaded.warnings)
    for key in [
        "config.process[0].train.train_unet:",
        "config.process[0].train.train_text_encoder:",
    ]:
        assert key in joined, key
    assert "low_vram" not in joined  # supported now (aitk.trainer.placing)
    assert "is_reg" not in joined  # regularisation datasets are supported now
    assert "push_to_hub" not in joined  # uploading to the Hub is supported now
    # alpha_schedule without phases also warns (as the run does at start)
    assert all("not supported yet" in w for w in loaded.warnings if "alpha_schedule" not in w)
    assert any("alpha_schedule: alpha_schedule is enabled but lists no phases" in w for w in loaded.warnings)
    assert "is_flux" not in joined  # FLUX is an adapter now
    assert "automagic" not in joined  # the automagic optimizer is supported now
    assert "lokr" not in joined  # LoKr, LoHa and DoRA are supported now
    te_only = next(w for w in loaded.warnings if "train_unet" in w)
    assert "fails at start" in te_only
    from aitk.config.start_warnings import run_start_warnings

    assert run_start_warnings(loaded.job) == loaded.warnings  # no unknown keys here
    assert set(unsupported_warnings(loaded.job)) < set(loaded.warnings)


@pytest.mark.parametrize(
    "network",
    ["{type: lokr, linear: 8, lokr_factor: 4}", "{type: lokr, lokr_full_rank: true}", "{type: loha, linear: 8}",
     "{type: dora, linear: 8}", "{type: lora, dora: true}", "{type: locon, conv: 4, dora: true}"],
)
def test_lycoris_and_dora_networks_are_quiet(network):
    text = MINIMAL.replace("{type: lora, linear: 8, linear_alpha: 4}", network)
    assert load(text).warnings == []


def test_no_network_means_a_full_fine_tune_without_warnings():
    text = MINIMAL.replace("      network: {type: lora, linear: 8, linear_alpha: 4}\n", "")
    loaded = load(text)
    assert loaded.warnings == [] and loaded.job.config.process[0].network is None


def test_known_archs_are_quiet_and_an_unknown_arch_fails_at_start():
    for arch in ("sdxl", "flux", "flux_kontext", "wan21", "wan21_i2v", "wan22_14b", "wan22_14b_i2v"):
        assert load(MINIMAL.replace("runwayml/stable-diffusion-v1-5", f"x\n        arch: {arch}")).warnings == []
    (warning,) = load(MINIMAL.replace("runwayml/stable-diffusion-v1-5", "x\n        arch: not_an_arch")).warnings
    assert "config.process[0].model.arch: architecture 'not_an_arch'" in warning
    assert "fails at start" in warning and "wan22_14b" in warning


def test_ai_toolkit_only_keys_are_known_not_unknown():
    text = MINIMAL.replace(
        "      model:",
        "      train:\n        diff_output_preservation: true\n        unload_text_encoder: false\n      model:",
    )
    loaded = load(text, strict=True)  # not errors, even with strict
    assert len(loaded.warnings) == 1
    assert loaded.warnings[0].startswith("config.process[0].train.diff_output_preservation:")
    assert "not supported yet" in loaded.warnings[0]


def test_duplicate_yaml_keys_warn():
    text = MINIMAL.replace("      model:", "      train: {lr: 1}\n      train: {lr: 2}\n      model:")
    loaded = load(text)
    assert loaded.job.config.process[0].train.lr == 2
    assert any("'train' appears twice" in w and "line" in w for w in loaded.warnings)


# ---------------------------------------------------------------------------------------------
# dump


def test_dump_round_trip_keeps_everything(tmp_path):
    text = MINIMAL.replace(
        "      network: {type: lora, linear: 8, linear_alpha: 4}\n",
        """\
      network:
        type: lora
        linear: 8
        conv: 4
        alpha_schedule:
          enabled: true
          conv_alpha_phases:
            zeta: {alpha: 2, min_steps: 10}
            alpha: {alpha: 4, exit_criteria: {min_loss_r2: 0.1}}
      train:
        lr: 1e-5
        optimizer_params: {weight_decay: 1e-7, betas: [0.9, 0.99]}
        mystery_key: {a: 1}
      sample:
        samples:
          - prompt: "price ${NOT_A_VAR} and [trigger]"
            width: 768
""",
    ).replace("/data/images", "/data/images\n          resolution: [512, 768]")
    text = text.replace("${NOT_A_VAR}", "$${NOT_A_VAR}") + "meta:\n  version: '1.0'\n  yes_word: 'yes'\n"
    job = load(text).job
    dumped = dump_job(job)
    assert "mystery_key" in dumped  # extras are kept, not dropped
    again = load_job_file(write(tmp_path, dumped, "config.yaml"), environ={}).job
    assert again == job
    phases = again.config.process[0].network.alpha_schedule.conv_alpha_phases
    assert list(phases) == ["zeta", "alpha"]  # phase order survives
    assert again.config.process[0].sample.samples[0].prompt == "price ${NOT_A_VAR} and [trigger]"
    assert again.meta == {"version": "1.0", "yes_word": "yes"}
    assert isinstance(JobFile.model_validate(job.model_dump()), JobFile)


def test_loaded_job_path(tmp_path):
    path = write(tmp_path, MINIMAL)
    loaded = load_job_file(path, environ={})
    assert loaded.path == path
    assert load_job_file(str(path), environ={}).path == path


def test_validate_command_prints_ok_and_warnings(tmp_path, capsys):
    text = MINIMAL.replace("      model:", "      train:\n        learning_rate: 0.001\n      model:")
    path = write(tmp_path, text)
    assert validate_command([str(path)]) == 0
    out = capsys.readouterr().out
    assert f"OK {path}" in out
    assert "warning: config.process[0].train.learning_rate: unknown key; did you mean 'lr'?" in out


def test_validate_command_several_files(tmp_path, capsys):
    good = write(tmp_path, MINIMAL, "good.yaml")
    bad = write(tmp_path, "job: extension\n", "bad.yaml")
    assert validate_command([str(good), str(bad)]) == 1
    captured = capsys.readouterr()
    assert f"OK {good}" in captured.out
    assert f"{bad}: 1 problem" in captured.err
    assert "1 of 2 job files valid" in captured.out
    assert validate_command([]) == 1


def test_validate_strict_fails_on_any_warning_and_plain_validate_on_a_refused_setting(tmp_path, capsys):
    from aitk.config.validate import validate_command

    warned = MINIMAL.replace("      model:", "      train:\n        diff_output_preservation: true\n      model:")
    path = write(tmp_path, warned)
    assert validate_command([str(path)]) == 0
    assert validate_command([str(path)], strict=True) == 1
    assert "error: config.process[0].train.diff_output_preservation" in capsys.readouterr().err
    refused = MINIMAL.replace("runwayml/stable-diffusion-v1-5", "x\n        arch: not_an_arch")
    assert validate_command([str(write(tmp_path, refused))]) == 1
    assert "the run would stop at start" in capsys.readouterr().err


def test_is_v3_means_sd3_instead_of_sd15(tmp_path):
    from aitk.config.validate import validate_command

    text = MINIMAL.replace("runwayml/stable-diffusion-v1-5", "stabilityai/stable-diffusion-3.5-large\n        is_v3: true")
    loaded = load(text)
    assert loaded.job.config.process[0].model.resolved_arch == "sd3"
    assert loaded.warnings == []
    assert validate_command([str(write(tmp_path, text))]) == 0


def test_start_up_warnings_about_the_job_are_validate_warnings_and_in_the_run_log(tmp_path, tiny_sd15, shapes_dataset):
    from conftest import base_process, deep_update, write_job

    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    import shutil

    controls = tmp_path / "controls"
    shutil.copytree(shapes_dataset, controls)  # a control image for every image
    process = deep_update(base_process(tiny_sd15, shapes_dataset, tmp_path / "out"), {
        "model": {"qtype": "uint4|some/adapter/file.safetensors"},
        "train": {"steps": 1},
    })
    process["datasets"][0]["control_path"] = str(controls)
    job = write_job(tmp_path / "job.yaml", "job", process)
    loaded = load_job_file(job)
    joined = "\n".join(loaded.warnings)
    assert "config.process[0].datasets: control images" in joined and "loaded but not used" in joined
    assert "config.process[0].model.qtype: an accuracy recovery adapter without model.quantize" in joined
    trainer = Trainer(loaded.job, loaded.job.config.process[0])
    assert trainer.run().state == "completed"
    log = trainer.paths.log.read_text()
    for warning in loaded.warnings:
        assert log.count(warning) == 1, warning
