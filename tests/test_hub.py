"""save.push_to_hub: the final LoRA, the model card and the samples reach the Hub through huggingface_hub.

The "Hub" is the local threaded HTTP server of tests/hub_server.py (`hub` fixture): it answers the
endpoints huggingface_hub calls for `create_repo` and `create_commit` and records what it was sent:
the real client library, real HTTP, no mock objects.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from aitk.config.loader import dump_job, load_job_file
from aitk.hub import CardInfo, model_card, read_dotenv, resolve_token
from aitk.trainer.publish import final_lora_files, publish_run
from hub_server import FakeHub, hub  # noqa: F401 - `hub` is the fixture

TOKEN = "hf_from_dotenv_0123456789"


# ------------------------------------------------------------------------------- a finished run
def _jpeg(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _lora_bytes(seed: int) -> bytes:
    import torch

    from aitk.networks.metadata import safetensors_bytes_with_hashes

    g = torch.Generator().manual_seed(seed)
    tensors = {
        "lora_unet_a.lora_down.weight": torch.randn(4, 32, generator=g).half(),
        "lora_unet_a.lora_up.weight": torch.randn(32, 4, generator=g).half(),
        "lora_unet_a.alpha": torch.tensor(4.0),
    }
    return safetensors_bytes_with_hashes(tensors, {"ss_output_name": "my_lora", "ss_network_dim": "4"})


JOB = """\
job: extension
config:
  name: my_lora
  process:
    - training_folder: {folder}
      trigger_word: shp_style
      network: {{type: lora, linear: 4, linear_alpha: 4}}
      datasets:
        - folder_path: {folder}/data
      train: {{steps: 10, lr: 0.0002, optimizer: adamw}}
      save: {save}
      sample:
        sample_every: 10
        prompts:
          - "a red circle, [trigger]"
          - "a blue square, [trigger] --seed 3"
      model: {{name_or_path: {model}, arch: {arch}}}
meta:
  author: tester
  description: Shapes in a flat style.
"""


@dataclass
class Run:
    job_path: Path
    output_dir: Path
    loras: list[Path]
    job: Any
    process: Any


def make_run(tmp_path: Path, *, save: str, experts: tuple[str, ...] = (), arch: str = "sd1",
             model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5", dotenv: str | None = TOKEN) -> Run:
    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    job_path = job_dir / "job.yaml"
    job_path.write_text(JOB.format(folder=tmp_path / "out", save=save, model=model, arch=arch), encoding="utf-8")
    if dotenv is not None:
        (job_dir / ".env").write_text(f"# secrets\nexport HF_TOKEN='{dotenv}'\nOTHER=1\n", encoding="utf-8")
    loaded = load_job_file(job_path, environ={})
    out = tmp_path / "out" / "my_lora"
    (out / "samples").mkdir(parents=True)
    (out / "config.yaml").write_text(dump_job(loaded.job), encoding="utf-8")
    names = [f"my_lora_{e}.safetensors" for e in experts] or ["my_lora.safetensors"]
    loras = []
    for i, name in enumerate(names):
        (out / name).write_bytes(_lora_bytes(i))
        (out / name.replace(".safetensors", "_000000010.safetensors")).write_bytes(_lora_bytes(i))  # step file
        loras.append(out / name)
    for step in (0, 10):
        for index, colour in enumerate([(200, 0, 0), (0, 0, 200)]):
            (out / "samples" / f"{step:09d}_{index}.jpg").write_bytes(_jpeg(colour))
    (out / "samples" / ".000000010_0.jpg.abc.tmp").write_bytes(b"half a file")  # an interrupted write
    return Run(job_path, out, loras, loaded.job, loaded.job.config.process[0])


def front_matter(readme: str) -> dict[str, Any]:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n", 2)[1])


# ------------------------------------------------------------------------------------- tests
def test_upload_sends_lora_card_and_samples_with_the_dotenv_token(hub: FakeHub, tmp_path: Path):
    run = make_run(tmp_path, save="{push_to_hub: true, hf_repo_id: someone/shapes-lora}")
    logs: list[str] = []
    result = publish_run(run.job, run.process, output_dir=run.output_dir, lora_files=run.loras,
                         job_path=run.job_path, log=logs.append)
    assert result.state == "uploaded", result.message
    assert result.url == f"{hub.url}/someone/shapes-lora"

    assert hub.repos["someone/shapes-lora"]["visibility"] == "private"  # hf_private defaults to true
    assert hub.requests and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    (commit,) = hub.commits
    assert commit["others"] == []  # every file went as a regular entry
    uploaded = hub.files["someone/shapes-lora"]
    assert uploaded["my_lora.safetensors"] == run.loras[0].read_bytes()
    assert "my_lora_000000010.safetensors" not in uploaded  # step files stay local
    samples = sorted(p for p in uploaded if p.startswith("samples/"))
    assert samples == [f"samples/{s:09d}_{i}.jpg" for s in (0, 10) for i in (0, 1)]
    assert uploaded["samples/000000010_1.jpg"] == (run.output_dir / "samples/000000010_1.jpg").read_bytes()

    readme = uploaded["README.md"].decode()
    assert readme == (run.output_dir / "README.md").read_text(encoding="utf-8")  # also kept locally
    meta = front_matter(readme)
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["instance_prompt"] == "shp_style"
    assert meta["license"] == "creativeml-openrail-m"
    assert {"lora", "diffusers", "template:sd-lora", "stable-diffusion"} <= set(meta["tags"])
    # the widget shows the last step's previews with their prompts ([trigger] replaced)
    assert meta["widget"] == [
        {"text": "a red circle, shp_style", "output": {"url": "samples/000000010_0.jpg"}},
        {"text": "a blue square, shp_style", "output": {"url": "samples/000000010_1.jpg"}},
    ]
    body = readme.split("---\n", 2)[2]
    assert "shp_style" in body and "stable-diffusion-v1-5/stable-diffusion-v1-5" in body
    assert "![a red circle, shp_style](samples/000000010_0.jpg)" in body
    assert "Shapes in a flat style." in body and "| learning rate | 0.0002 |" in body
    assert 'load_lora_weights("someone/shapes-lora", weight_name="my_lora.safetensors")' in body
    assert any("uploaded to" in line for line in logs) and not any("warning" in line for line in logs)


def test_every_expert_file_goes_up_public_repo_environment_token_wins(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    run = make_run(tmp_path, save="{push_to_hub: true, hf_repo_id: someone/wan-lora, hf_private: false}",
                   experts=("high_noise", "low_noise"), arch="wan22_14b", model="Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    monkeypatch.setenv("HF_TOKEN", "hf_from_environment")
    assert final_lora_files(run.output_dir, "my_lora") == sorted(run.loras)
    result = publish_run(run.job, run.process, output_dir=run.output_dir, lora_files=run.loras,
                         job_path=run.job_path, log=lambda m: None)
    assert result.state == "uploaded", result.message
    assert hub.repos["someone/wan-lora"]["visibility"] == "public"
    assert all(r.headers.get("authorization") == "Bearer hf_from_environment" for r in hub.requests)
    uploaded = hub.files["someone/wan-lora"]
    for path in run.loras:
        assert uploaded[path.name] == path.read_bytes()
    meta = front_matter(uploaded["README.md"].decode())
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-to-video"


def test_a_failing_hub_is_a_warning_and_the_run_stays_complete(hub: FakeHub, tmp_path: Path):
    run = make_run(tmp_path, save="{push_to_hub: true, hf_repo_id: someone/shapes-lora}")
    before = {p: p.read_bytes() for p in run.output_dir.rglob("*") if p.is_file()}
    hub.fail_status = 500
    logs: list[str] = []
    result = publish_run(run.job, run.process, output_dir=run.output_dir, lora_files=run.loras,
                         job_path=run.job_path, log=logs.append)
    assert result.state == "failed"
    (warning,) = [line for line in logs if line.startswith("warning:")]
    assert "500" in warning and "someone/shapes-lora" in warning
    assert "Traceback" not in warning and "\n" not in warning
    assert result.retry_command and result.retry_command in warning
    assert result.retry_command.startswith("python -m aitk push ")
    for path, data in before.items():  # nothing of the run was touched
        assert path.read_bytes() == data
    assert (run.output_dir / "README.md").is_file()

    # the printed retry command uploads the run once the hub is back
    hub.fail_status = None
    from aitk.cli import main

    argv = [str(run.output_dir), "--job", str(run.job_path)]
    assert result.retry_command.split()[4:] == argv
    assert main(["push", *argv]) == 0
    assert hub.files["someone/shapes-lora"]["my_lora.safetensors"] == run.loras[0].read_bytes()


def test_no_token_is_a_clear_warning_without_any_request(hub: FakeHub, tmp_path: Path):
    run = make_run(tmp_path, save="{push_to_hub: true, hf_repo_id: someone/x}", dotenv=None)
    logs: list[str] = []
    result = publish_run(run.job, run.process, output_dir=run.output_dir, lora_files=run.loras,
                         job_path=run.job_path, log=logs.append)
    assert result.state == "failed" and "HF_TOKEN" in result.message and ".env" in result.message
    assert hub.requests == []


def test_offline_mode_is_named_as_the_reason(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    run = make_run(tmp_path, save="{push_to_hub: true, hf_repo_id: someone/x}")
    result = publish_run(run.job, run.process, output_dir=run.output_dir, lora_files=run.loras,
                         job_path=run.job_path, log=lambda m: None)
    assert result.state == "failed" and "HF_HUB_OFFLINE" in result.message
    assert hub.requests == []


def test_push_to_hub_off_does_nothing(hub: FakeHub, tmp_path: Path):
    run = make_run(tmp_path, save="{push_to_hub: false}")
    result = publish_run(run.job, run.process, output_dir=run.output_dir, lora_files=run.loras,
                         job_path=run.job_path, log=lambda m: pytest.fail(m))
    assert result.state == "skipped" and hub.requests == []
    assert not (run.output_dir / "README.md").exists()


def test_a_full_fine_tune_folder_is_named_not_uploaded(hub: FakeHub, tmp_path: Path):
    run = make_run(tmp_path, save="{push_to_hub: true, hf_repo_id: someone/x}")
    folder = run.output_dir / "my_lora"
    folder.mkdir()
    result = publish_run(run.job, run.process, output_dir=run.output_dir, lora_files=[folder],
                         job_path=run.job_path, log=lambda m: None)
    assert result.state == "failed" and "full fine-tune" in result.message and "hf upload" in result.message
    assert hub.requests == []


def test_repo_id_defaults_to_the_token_user_and_run_name(hub: FakeHub, tmp_path: Path):
    run = make_run(tmp_path, save="{push_to_hub: true}")
    result = publish_run(run.job, run.process, output_dir=run.output_dir, lora_files=run.loras,
                         job_path=run.job_path, log=lambda m: None)
    assert result.state == "uploaded", result.message
    assert result.repo_id == "tester/my_lora" and "tester/my_lora" in hub.files


# ------------------------------------------------------------------------- pieces, no server
def test_read_dotenv(tmp_path: Path):
    path = tmp_path / ".env"
    path.write_text(
        '# comment\nexport HF_TOKEN="hf_a b"\nPLAIN=value # trailing\nSINGLE=\'x#y\'\nbroken line\n\nEMPTY=\n',
        encoding="utf-8",
    )
    assert read_dotenv(path) == {"HF_TOKEN": "hf_a b", "PLAIN": "value", "SINGLE": "x#y", "EMPTY": ""}
    assert read_dotenv(tmp_path / "missing.env") == {}


def test_token_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("HF_TOKEN=from_cwd\n", encoding="utf-8")
    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    (job_dir / ".env").write_text("HF_TOKEN=from_job_dir\n", encoding="utf-8")
    assert resolve_token(job_dir / "job.yaml", {"HF_TOKEN": "from_env"})[0] == "from_env"
    assert resolve_token(job_dir / "job.yaml", {})[0] == "from_job_dir"
    assert resolve_token(None, {})[0] == "from_cwd"
    (tmp_path / ".env").unlink()
    assert resolve_token(None, {}) == (None, "")


def test_card_licence_and_local_base_model(tmp_path: Path):
    flux = front_matter(model_card(CardInfo(title="t", base_model="black-forest-labs/FLUX.1-dev", architecture="flux")))
    assert flux["license"] == "other" and flux["license_name"] == "flux-1-dev-non-commercial-license"
    schnell = model_card(CardInfo(title="t", base_model="black-forest-labs/FLUX.1-schnell", architecture="flux"))
    assert front_matter(schnell)["license"] == "apache-2.0"
    custom = front_matter(model_card(CardInfo(title="t", base_model="a/b", architecture="sdxl",
                                              license="My Own Licence v2")))
    assert custom["license"] == "other" and custom["license_name"] == "my-own-licence-v2"
    local = tmp_path / "models" / "tiny"
    local.mkdir(parents=True)
    card = model_card(CardInfo(title="t", base_model=str(local), architecture="sd1", trigger_word="[x]: y"))
    meta = front_matter(card)  # a trigger word with YAML syntax in it stays a string
    assert "base_model" not in meta and meta["instance_prompt"] == "[x]: y"
    assert str(local) in card
