"""Every hub reference a job can hold downloads from a hub-like server with the token from .env.

The server is tests/hub_server.py's (`hub` fixture): real huggingface_hub client (and diffusers /
transformers `from_pretrained` on top of it), real HTTP. Its repos are gated (401) unless the request
carries the token written to the .env next to the job file, so every successful download proves
the token went along; the recorded requests show it too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aitk.extras import extras_dir
from hub_server import FakeHub, hub  # noqa: F401 - `hub` is the fixture

TOKEN = "hf_dotenv_download_token_0123"
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _extras(monkeypatch):
    if extras_dir().is_dir():  # torchao (quantize) lives there
        monkeypatch.syspath_prepend(str(extras_dir()))


@pytest.fixture
def job_dir(tmp_path: Path, hub: FakeHub) -> Path:
    """A folder for the job file with a .env holding the token the hub accepts."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    (folder / ".env").write_text(f"HF_TOKEN={TOKEN}\n", encoding="utf-8")
    hub.accepted_tokens.add(TOKEN)
    return folder


def gate(hub: FakeHub, *repos: str, status: int = 401) -> None:
    for repo in repos:
        hub.gated[repo] = status


def authorisations(hub: FakeHub, repo_id: str) -> set[str]:
    """The Authorization headers of every request about `repo_id`."""
    return {r.headers.get("authorization", "") for r in hub.requests if f"/{repo_id}/" in r.path}


def lora_bytes(seed: int) -> bytes:
    from safetensors.torch import save

    g = torch.Generator().manual_seed(seed)
    return save({"lora_unet_x.lora_down.weight": torch.randn(2, 8, generator=g),
                 "lora_unet_x.lora_up.weight": torch.randn(8, 2, generator=g)})


# ------------------------------------------------------------------- model.name_or_path hub id
def test_a_hub_model_id_loads_through_the_adapter(hub: FakeHub, job_dir: Path, tiny_sd15: Path):
    from aitk.config.schema import ModelConfig
    from aitk.hub_files import prepare_job_downloads
    from aitk.models.sd import SD15Adapter

    hub.add_folder("tester/tiny-sd15", tiny_sd15)
    gate(hub, "tester/tiny-sd15")
    source = prepare_job_downloads(job_dir / "job.yaml", "tester/tiny-sd15")
    assert source == str(job_dir / ".env")
    adapter = SD15Adapter(ModelConfig(name_or_path="tester/tiny-sd15", arch="sd1"), CPU, torch.float32)
    adapter.load()  # diffusers' and transformers' from_pretrained, through the hub endpoint

    from diffusers import UNet2DConditionModel

    local = UNet2DConditionModel.from_pretrained(str(tiny_sd15), subfolder="unet")
    for (name, theirs), ours in zip(local.state_dict().items(), adapter.unet.state_dict().values()):
        assert torch.equal(theirs, ours), name
    fetched = {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.downloads("tester/tiny-sd15")}
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
            "text_encoder/config.json", "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"} <= fetched
    assert authorisations(hub, "tester/tiny-sd15") == {f"Bearer {TOKEN}"}


# --------------------------------------------------------------------------- LoRA references
def test_every_lora_reference_form_downloads(hub: FakeHub, job_dir: Path):
    from aitk.hub_files import HubFileError, resolve_lora_file, use_job_token

    files = {f"seed{i}": lora_bytes(i) for i in range(4)}
    hub.add_repo("tester/adapters", {"README.md": b"# adapters", "wan/ara_uint4.safetensors": files["seed0"],
                                     "other.safetensors": files["seed1"]})
    hub.add_repo("tester/one-lora", {"README.md": b"# one", "my_lora.safetensors": files["seed2"]})
    hub.add_repo("tester/diffusers-lora", {"pytorch_lora_weights.safetensors": files["seed3"],
                                           "older_version.safetensors": files["seed1"]})
    gate(hub, "tester/adapters", "tester/one-lora", "tester/diffusers-lora")
    use_job_token(job_dir / "job.yaml")
    logs: list[str] = []

    # owner/repo/path/in/repo.safetensors: that file
    path = resolve_lora_file("tester/adapters/wan/ara_uint4.safetensors", key="model.qtype", log=logs.append)
    assert path.read_bytes() == files["seed0"] and path.name == "ara_uint4.safetensors"
    # owner/repo: its one .safetensors file
    assert resolve_lora_file("tester/one-lora", key="network.pretrained_lora_path").read_bytes() == files["seed2"]
    # ... or diffusers' default name among several (what load_lora_weights(repo) takes)
    path = resolve_lora_file("tester/diffusers-lora", key="model.assistant_lora_path")
    assert path.read_bytes() == files["seed3"]
    # several files and none the default: one line listing them, and the fix
    with pytest.raises(HubFileError) as caught:
        resolve_lora_file("tester/adapters", key="model.assistant_lora_path")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("model.assistant_lora_path: repo tester/adapters holds 2")
    assert "other.safetensors" in message and "wan/ara_uint4.safetensors" in message
    assert "tester/adapters/<file>" in message
    # a file that is not in the repo, a repo that does not exist
    with pytest.raises(HubFileError, match=r"tester/adapters has no such file"):
        resolve_lora_file("tester/adapters/missing.safetensors", key="model.qtype")
    with pytest.raises(HubFileError, match=r"no repo nobody/nothing on http://127.0.0.1"):
        resolve_lora_file("nobody/nothing/x.safetensors", key="model.qtype")
    # a local file is used as it is, without a request
    before = len(hub.requests)
    local = job_dir / "local.safetensors"
    local.write_bytes(files["seed1"])
    assert resolve_lora_file(str(local), key="model.qtype") == local and len(hub.requests) == before

    assert logs and "tester/adapters/wan/ara_uint4.safetensors ->" in logs[0]
    for repo in ("tester/adapters", "tester/one-lora", "tester/diffusers-lora"):
        assert authorisations(hub, repo) == {f"Bearer {TOKEN}"}, repo


def test_assistant_lora_from_a_hub_repo(hub: FakeHub, job_dir: Path, tmp_path: Path):
    from aitk.config.schema import ModelConfig
    from aitk.hub_files import use_job_token
    from aitk.models.flux import ASSISTANT_ADAPTER, FluxAdapter
    from aitk.models.flux import build_tiny_flux
    from test_models_flux import _write_assistant

    model = build_tiny_flux(tmp_path / "flux-schnell", "schnell")
    assistant = _write_assistant(model, tmp_path / "pytorch_lora_weights.safetensors", "diffusers")
    hub.add_repo("ostris/FLUX.1-schnell-training-adapter",
                 {"README.md": b"# adapter", "pytorch_lora_weights.safetensors": assistant.read_bytes()})
    gate(hub, "ostris/FLUX.1-schnell-training-adapter", status=403)
    use_job_token(job_dir / "job.yaml")
    adapter = FluxAdapter(ModelConfig(name_or_path=str(model), arch="flux",
                                      assistant_lora_path="ostris/FLUX.1-schnell-training-adapter"), CPU, torch.float32)
    adapter.load()
    assert adapter.has_assistant
    wrapped = [m for m in adapter.transformer.modules() if ASSISTANT_ADAPTER in getattr(m, "lora_A", {})]
    assert len(wrapped) == 3
    assert authorisations(hub, "ostris/FLUX.1-schnell-training-adapter") == {f"Bearer {TOKEN}"}


def test_pretrained_lora_and_recovery_adapter_from_the_hub_in_a_run(
    hub: FakeHub, job_dir: Path, tmp_path: Path, tiny_sd15: Path, shapes_dataset: Path
):
    """A run whose recovery adapter is a file of a gated repo and whose pretrained LoRA is a repo:
    both come from the hub with the .env token next to the job file."""
    from safetensors.torch import load_file

    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer
    from conftest import base_process, deep_update, write_job
    from test_recovery_adapter import kohya_stem, recovery_names, tiny_unet, write_recovery_file

    def run(name: str, **changes) -> tuple[Trainer, object]:
        process = deep_update(base_process(tiny_sd15, shapes_dataset, tmp_path / "out"), {
            "train": {"steps": 2, "lr": 1e-3}, **changes})
        loaded = load_job_file(write_job(job_dir / f"{name}.yaml", name, process))
        trainer = Trainer(loaded.job, loaded.job.config.process[0], job_path=job_dir / f"{name}.yaml")
        return trainer, trainer.run()

    _, first = run("first")  # a LoRA to continue from
    ara = tmp_path / "tiny_sd15_torchao_uint4.safetensors"
    write_recovery_file(tiny_unet(tiny_sd15), ara, recovery_names(tiny_unet(tiny_sd15)), stem=kohya_stem)
    hub.add_repo("tester/accuracy_recovery_adapters", {"tiny_sd15_torchao_uint4.safetensors": ara.read_bytes()})
    hub.add_repo("tester/first-lora", {"README.md": b"# lora", "first.safetensors": first.final_lora.read_bytes()})
    gate(hub, "tester/accuracy_recovery_adapters", "tester/first-lora")

    trainer, result = run("second", model={
        "quantize": True, "qtype": "uint4|tester/accuracy_recovery_adapters/tiny_sd15_torchao_uint4.safetensors"},
        network={"pretrained_lora_path": "tester/first-lora"}, train={"steps": 1, "lr": 1e-10})
    assert result.state == "completed"
    log = (result.output_dir / "log.txt").read_text()
    assert "accuracy recovery adapter: tester/accuracy_recovery_adapters/tiny_sd15_torchao_uint4.safetensors" in log
    assert "network: starting from" in log
    # lr 1e-10: the saved LoRA is the hub one, carried through
    before, after = load_file(str(first.final_lora)), load_file(str(result.final_lora))
    for key in before:
        torch.testing.assert_close(after[key], before[key])
    for repo in ("tester/accuracy_recovery_adapters", "tester/first-lora"):
        assert hub.downloads(repo) and authorisations(hub, repo) == {f"Bearer {TOKEN}"}


# --------------------------------------------------------------------- gated, offline, errors
@pytest.mark.parametrize("status, bare", [(401, False), (403, False), (401, True), (403, True)])
def test_a_gated_model_without_a_token_is_one_message(hub: FakeHub, tmp_path: Path, tiny_sd15: Path, status, bare):
    from aitk.hub_files import HubFileError, prepare_job_downloads, resolve_lora_file

    hub.add_repo("black-forest-labs/FLUX.1-dev", {"model_index.json": b"{}"})
    hub.add_repo("tester/gated-lora", {"lora.safetensors": lora_bytes(0)})
    gate(hub, "black-forest-labs/FLUX.1-dev", "tester/gated-lora", status=status)
    hub.bare_gate = bare
    (tmp_path / "jobs").mkdir()
    for call, repo in (
        (lambda: prepare_job_downloads(tmp_path / "jobs" / "job.yaml", "black-forest-labs/FLUX.1-dev"),
         "black-forest-labs/FLUX.1-dev"),
        (lambda: resolve_lora_file("tester/gated-lora/lora.safetensors", key="network.pretrained_lora_path"),
         "tester/gated-lora"),
        (lambda: resolve_lora_file("tester/gated-lora", key="model.assistant_lora_path"), "tester/gated-lora"),
    ):
        with pytest.raises(HubFileError) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message and "Traceback" not in message
        assert f"{repo} is gated or private" in message and f"({status})" in message
        assert "no Hugging Face token was found" in message
        assert f"{hub.url}/{repo}" in message and "accept its licence" in message
        assert "HF_TOKEN" in message and ".env" in message and "web UI" in message
    assert {r.headers.get("authorization") for r in hub.requests} == {None}


def test_a_refused_token_is_named(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from aitk.hub_files import HubFileError, resolve_lora_file

    hub.add_repo("tester/gated-lora", {"lora.safetensors": lora_bytes(0)})
    gate(hub, "tester/gated-lora", status=403)
    monkeypatch.setenv("HF_TOKEN", "hf_not_accepted")
    with pytest.raises(HubFileError, match=r"the token from the HF_TOKEN environment variable was refused"):
        resolve_lora_file("tester/gated-lora/lora.safetensors", key="model.qtype")


def test_offline_with_nothing_cached_says_so_in_one_line(hub: FakeHub, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants as hf_constants

    from aitk.hub_files import HubFileError, check_model_access, resolve_lora_file

    hub.add_repo("tester/cached", {"model_index.json": b"{}", "lora.safetensors": lora_bytes(0)})
    lora = resolve_lora_file("tester/cached", key="model.qtype")  # online: fills the cache
    check_model_access("tester/cached")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    requests = len(hub.requests)
    # what is cached still resolves offline, the repo form too
    assert resolve_lora_file("tester/cached", key="model.qtype") == lora
    assert resolve_lora_file("tester/cached/lora.safetensors", key="model.qtype") == lora
    check_model_access("tester/cached")
    # parts cached without model_index.json (an older run loaded them one by one): the adapter decides
    hub.add_repo("tester/parts-only", {"unet/config.json": b"{}"})
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    from huggingface_hub import hf_hub_download

    hf_hub_download("tester/parts-only", "unet/config.json")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    requests = len(hub.requests)
    assert check_model_access("tester/parts-only") is None
    for call, key, reference in (
        (lambda: check_model_access("tester/not-cached"), "model.name_or_path", "tester/not-cached"),
        (lambda: resolve_lora_file("tester/x/y.safetensors", key="model.qtype"), "model.qtype", "tester/x/y.safetensors"),
        (lambda: resolve_lora_file("tester/not-cached", key="model.assistant_lora_path"),
         "model.assistant_lora_path", "tester/not-cached"),
    ):
        with pytest.raises(HubFileError) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(f"{key}: '{reference}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    assert len(hub.requests) == requests  # offline means no request at all


def test_the_environment_token_wins_and_a_local_path_is_never_a_hub_reference(tmp_path: Path):
    from aitk.hub_files import HubFile, HubRepo, parse_file_reference, use_job_token

    (tmp_path / ".env").write_text("HF_TOKEN=from_dotenv\n", encoding="utf-8")
    env = {"HF_TOKEN": "from_ui_settings"}  # what the web UI's worker passes to a run
    assert use_job_token(tmp_path / "job.yaml", env) == "the HF_TOKEN environment variable"
    assert env == {"HF_TOKEN": "from_ui_settings"}
    env = {}
    assert use_job_token(tmp_path / "job.yaml", env) == str(tmp_path / ".env") and env == {"HF_TOKEN": "from_dotenv"}

    assert parse_file_reference("owner/repo") == HubRepo("owner/repo")
    assert parse_file_reference("owner/repo/sub/file.safetensors") == HubFile("owner/repo", "sub/file.safetensors")
    assert parse_file_reference("./owner/repo") == Path("owner/repo")
    assert parse_file_reference("/abs/owner/repo.safetensors") == Path("/abs/owner/repo.safetensors")
    assert parse_file_reference("~/loras/x.safetensors") == Path("~/loras/x.safetensors").expanduser()
    existing = tmp_path / "owner" / "repo"
    existing.mkdir(parents=True)
    assert parse_file_reference(str(existing)) == existing
