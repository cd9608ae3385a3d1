"""`aitk fetch-model`: hub models downloaded into the Hugging Face cache ahead of a run, against the
local hub of tests/hub_server.py (real huggingface_hub client, real HTTP).

What is checked on real files: the cache holds exactly the files a run loads (not the safety checker,
the fp16 copies, the .bin copies, docs or a root single-file checkpoint), byte for byte; a second
run downloads nothing; a missing / gated repo and an unreachable hub are one line and a non-zero
exit; a job file fetches every hub model and LoRA file it names, with the token of its .env.

The fixtures here (`pipe_repo`, `cli_env`) are shared with test_model_cache_api.py.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hub_server import FakeHub, hub  # noqa: F401 - `hub` is the fixture

REPO = Path(__file__).resolve().parents[1]
PIPE = "tester/tiny-pipe"
TOKEN = "hf_fetch_token_0123456789"


def _bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def pipe_files() -> dict[str, bytes]:
    """A diffusers pipeline repo as the Hub has them: parts, their other formats and variants,
    a safety checker, docs and a single-file checkpoint at the root."""
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "PNDMScheduler"],
             "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
             "feature_extractor": [None, None]}
    return {
        "model_index.json": json.dumps(index).encode(),
        "unet/config.json": b'{"sample_size": 8}',
        "unet/diffusion_pytorch_model.safetensors": _bytes(300_000, 1),
        "unet/diffusion_pytorch_model.fp16.safetensors": _bytes(150_000, 2),
        "unet/diffusion_pytorch_model.bin": _bytes(300_000, 3),
        "vae/config.json": b'{"latent_channels": 4}',
        "vae/diffusion_pytorch_model.bin": _bytes(40_000, 4),  # only .bin: it is what loads
        "text_encoder/config.json": b'{"hidden_size": 32}',
        "text_encoder/model-00001-of-00002.safetensors": _bytes(60_000, 5),
        "text_encoder/model-00002-of-00002.safetensors": _bytes(50_000, 6),
        "text_encoder/model.safetensors.index.json": b'{"weight_map": {}}',
        "text_encoder/model.fp16-00001-of-00001.safetensors": _bytes(10_000, 7),
        "text_encoder/flax_model.msgpack": _bytes(20_000, 8),
        "tokenizer/vocab.json": b'{"a": 0}',
        "tokenizer/merges.txt": b"#version: 0.2\n",
        "tokenizer/tokenizer_config.json": b'{"model_max_length": 77}',
        "scheduler/scheduler_config.json": b'{"num_train_timesteps": 1000}',
        "safety_checker/config.json": b"{}",
        "safety_checker/model.safetensors": _bytes(90_000, 9),
        "feature_extractor/preprocessor_config.json": b"{}",
        "README.md": b"# a tiny pipeline",
        ".gitattributes": b"*.safetensors filter=lfs",
        "v1-5-pruned.safetensors": _bytes(120_000, 10),
    }


#: what a run loads of pipe_files()
PIPE_FETCHED = {
    "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model.bin", "text_encoder/config.json", "text_encoder/model-00001-of-00002.safetensors",
    "text_encoder/model-00002-of-00002.safetensors", "text_encoder/model.safetensors.index.json",
    "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
}


@pytest.fixture
def pipe_repo(hub: FakeHub) -> dict[str, bytes]:
    files = pipe_files()
    hub.add_repo(PIPE, files)
    return files


@pytest.fixture
def cli_env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    """The environment of an `aitk` subprocess: online, the local hub, its own HF_HOME, no token."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url,
               NO_PROXY="127.0.0.1,localhost", HF_HUB_DISABLE_TELEMETRY="1")
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        env.pop(name, None)
    return env


def aitk(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aitk", *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def snapshot_files(hub_cache: Path, repo_id: str) -> dict[str, bytes]:
    """path in repo -> bytes of the repo's one cached snapshot."""
    (snapshot,) = (hub_cache / f"models--{repo_id.replace('/', '--')}" / "snapshots").iterdir()
    return {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()}


def fetched_paths(hub: FakeHub, repo_id: str) -> list[str]:
    return sorted(r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.downloads(repo_id))


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


# ------------------------------------------------------------------------------------ the command
def test_fetch_model_fills_the_cache_once_and_a_second_run_downloads_nothing(
    hub: FakeHub, pipe_repo: dict[str, bytes], cli_env: dict[str, str]
):
    first = aitk(cli_env, "fetch-model", PIPE)
    assert first.returncode == 0, first.stderr
    hub_cache = Path(cli_env["HF_HOME"]) / "hub"
    cached = snapshot_files(hub_cache, PIPE)
    assert set(cached) == PIPE_FETCHED
    assert all(cached[p] == pipe_repo[p] for p in PIPE_FETCHED)
    # each file requested once (identical small files share one blob, so it may be fewer)
    downloaded = fetched_paths(hub, PIPE)
    assert len(downloaded) == len(set(downloaded)) and set(downloaded) <= PIPE_FETCHED
    weights = {p for p in PIPE_FETCHED if p.endswith((".safetensors", ".bin"))}
    assert weights <= set(downloaded)
    # refs/main names the snapshot: a run with HF_HUB_OFFLINE=1 finds it
    refs = hub_cache / f"models--{PIPE.replace('/', '--')}" / "refs" / "main"
    assert refs.read_text() == hub.commit_sha(PIPE)
    total = sum(len(pipe_repo[p]) for p in PIPE_FETCHED)
    assert "100%" in first.stderr  # the progress bar reached its end
    assert f"{PIPE} -> {hub_cache}" in first.stderr
    assert "fetched 1 model(s), 13 file(s)" in first.stderr

    before = len(hub.requests)
    second = aitk(cli_env, "fetch-model", PIPE, "--revision", "main")
    assert second.returncode == 0, second.stderr
    assert hub.downloads(PIPE)[len(downloaded):] == []
    assert not any("/resolve/" in r.path for r in hub.requests[before:])
    assert "already in the cache" in second.stderr and "0 B downloaded" in second.stderr
    blobs = hub_cache / f"models--{PIPE.replace('/', '--')}" / "blobs"
    assert sum(p.stat().st_size for p in blobs.iterdir()) <= total  # nothing written twice


def test_missing_gated_and_unreachable_repos_are_one_line_and_exit_1(
    hub: FakeHub, pipe_repo: dict[str, bytes], cli_env: dict[str, str], tmp_path: Path
):
    missing = aitk(cli_env, "fetch-model", "nobody/nothing")
    assert missing.returncode == 1
    assert one_error_line(missing.stderr) == (
        f"error: fetch-model: 'nobody/nothing': no repo nobody/nothing on {hub.url} (and no local path of that "
        "name); check the spelling, or give a local path")

    hub.gated[PIPE] = 401
    hub.accepted_tokens.add(TOKEN)
    gated = aitk(cli_env, "fetch-model", PIPE)
    assert gated.returncode == 1
    line = one_error_line(gated.stderr)
    assert line.startswith(f"error: fetch-model: {PIPE} is gated or private on the Hub (401) and no Hugging Face "
                           "token was found. To get access: open ")
    assert f"{hub.url}/{PIPE}" in line and "HF_TOKEN" in line
    assert not (Path(cli_env["HF_HOME"]) / "hub" / f"models--{PIPE.replace('/', '--')}" / "snapshots").exists()

    # the token of a job's .env opens it (--token-from-job)
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    opened = aitk(cli_env, "fetch-model", PIPE, "--token-from-job", str(jobs / "job.yaml"))
    assert opened.returncode == 0, opened.stderr
    assert {r.headers.get("authorization") for r in hub.requests if f"/{PIPE}/" in r.path and r.method == "GET"
            and "/resolve/" in r.path} == {f"Bearer {TOKEN}"}

    down = aitk(dict(cli_env, HF_ENDPOINT="http://127.0.0.1:9"), "fetch-model", PIPE)
    assert down.returncode == 1
    assert one_error_line(down.stderr).startswith(
        f"error: fetch-model: could not reach http://127.0.0.1:9 to fetch {PIPE} (ConnectError")
    assert "check the network connection" in down.stderr

    offline = aitk(dict(cli_env, HF_HUB_OFFLINE="1"), "fetch-model", PIPE)
    assert offline.returncode == 1 and "HF_HUB_OFFLINE is set" in one_error_line(offline.stderr)
    not_an_id = aitk(cli_env, "fetch-model", "./no/such/folder")
    assert not_an_id.returncode == 2 and "is not a Hugging Face model id" in one_error_line(not_an_id.stderr)


def lora_repo_files() -> dict[str, dict[str, bytes]]:
    return {
        "tester/one-lora": {"README.md": b"# one", "my_lora.safetensors": _bytes(5_000, 11)},
        "tester/adapters": {"wan/ara_uint4.safetensors": _bytes(7_000, 12), "other.safetensors": _bytes(3_000, 13)},
        "tester/vae-only": {"model_index.json": json.dumps({"vae": ["diffusers", "AutoencoderKL"],
                                                            "unet": ["diffusers", "UNet2DConditionModel"]}).encode(),
                            "vae/config.json": b'{"scaling_factor": 0.2}',
                            "vae/diffusion_pytorch_model.safetensors": _bytes(8_000, 14),
                            "unet/diffusion_pytorch_model.safetensors": _bytes(9_000, 15)},
    }


def write_fetch_job(folder: Path, model: str = PIPE) -> Path:
    """A job naming a hub model, a hub VAE, a pretrained LoRA repo and an assistant LoRA file."""
    folder.mkdir(parents=True, exist_ok=True)
    job = {"job": "extension", "config": {"name": "fetch_job", "process": [{
        "type": "sd_trainer", "training_folder": str(folder / "out"), "device": "cpu",
        "network": {"type": "lora", "linear": 4, "pretrained_lora_path": "tester/one-lora"},
        "datasets": [{"folder_path": str(folder / "data"), "resolution": [64]}],
        "train": {"steps": 2},
        "model": {"name_or_path": model, "vae_path": "tester/vae-only",
                  "assistant_lora_path": "tester/adapters/wan/ara_uint4.safetensors"},
    }]}}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def test_a_job_file_fetches_every_hub_model_it_names_with_its_token(
    hub: FakeHub, pipe_repo: dict[str, bytes], cli_env: dict[str, str], tmp_path: Path
):
    extra = lora_repo_files()
    for repo_id, files in extra.items():
        hub.add_repo(repo_id, files)
    for repo_id in (PIPE, *extra):
        hub.gated[repo_id] = 403
    hub.accepted_tokens.add(TOKEN)
    job = write_fetch_job(tmp_path / "jobs")
    (job.parent / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    result = aitk(cli_env, "fetch-model", str(job))
    assert result.returncode == 0, result.stderr
    hub_cache = Path(cli_env["HF_HOME"]) / "hub"
    assert set(snapshot_files(hub_cache, PIPE)) == PIPE_FETCHED
    assert snapshot_files(hub_cache, "tester/one-lora") == {
        "my_lora.safetensors": extra["tester/one-lora"]["my_lora.safetensors"]}
    assert snapshot_files(hub_cache, "tester/adapters") == {
        "wan/ara_uint4.safetensors": extra["tester/adapters"]["wan/ara_uint4.safetensors"]}
    assert set(snapshot_files(hub_cache, "tester/vae-only")) == {
        "model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"}  # its vae/ only
    assert "fetched 4 model(s)" in result.stderr
    for key in ("model.name_or_path", "model.vae_path", "network.pretrained_lora_path", "model.assistant_lora_path"):
        assert f"{key}: " in result.stderr, key
    auth = {r.headers.get("authorization") for r in hub.requests if r.method in ("GET", "HEAD")
            and any(f"/{repo}/" in r.path for repo in (PIPE, *extra))}
    assert auth == {f"Bearer {TOKEN}"}

    # a job whose models are local paths: nothing to fetch, no request
    before = len(hub.requests)
    local = write_fetch_job(tmp_path / "local", model=str(tmp_path))
    data = yaml.safe_load(local.read_text())
    model = data["config"]["process"][0]["model"]
    del model["vae_path"], model["assistant_lora_path"]
    del data["config"]["process"][0]["network"]["pretrained_lora_path"]
    local.write_text(yaml.safe_dump(data))
    nothing = aitk(cli_env, "fetch-model", str(local))
    assert nothing.returncode == 0 and "nothing to fetch" in nothing.stderr
    assert len(hub.requests) == before
    broken = aitk(cli_env, "fetch-model", str(tmp_path / "missing.yaml"))
    assert broken.returncode == 2


# ------------------------------------------------------------------------------------ the pieces
def test_select_files_takes_what_a_run_loads():
    from aitk.model_cache import select_files

    files = pipe_files()
    index = json.loads(files["model_index.json"])
    assert set(select_files(files, index)) == PIPE_FETCHED
    # extras: every part but the denoiser; a VAE repo: its vae/
    assert not any(p.startswith("unet/") for p in select_files(files, index, skip_parts=("unet",)))
    assert select_files(files, index, only_parts=("vae",)) == [
        "model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.bin"]
    # a repo without model_index.json (a transformer-only folder): all but docs, other formats, variants
    single = {"config.json": b"", "diffusion_pytorch_model-00001-of-00002.safetensors": b"",
              "diffusion_pytorch_model-00002-of-00002.safetensors": b"",
              "diffusion_pytorch_model.safetensors.index.json": b"",
              "diffusion_pytorch_model.bf16.safetensors": b"", "diffusion_pytorch_model.bin": b"",
              "README.md": b"", ".gitattributes": b"", "assets/preview.png": b""}
    assert select_files(single, None) == [
        "config.json", "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors", "diffusion_pytorch_model.safetensors.index.json"]
    # only variant files: they are what there is
    only_variants = {"unet/a.fp16.safetensors": b"", "model_index.json": b""}
    assert select_files(only_variants, {"unet": ["diffusers", "UNet2DConditionModel"]}) == [
        "model_index.json", "unet/a.fp16.safetensors"]


def test_progress_counts_every_byte_and_a_job_lists_its_references(hub: FakeHub, pipe_repo: dict[str, bytes]):
    from aitk.config.loader import load_job_file
    from aitk.model_cache import FetchTarget, fetch, job_targets, target_from_id

    snaps: list[tuple[str, int, int]] = []
    result = fetch([target_from_id(PIPE)], on_change=lambda p: snaps.append((p.state, p.done_bytes, p.total_bytes)))
    assert result.state == "completed" and result.error is None
    total = sum(len(pipe_repo[p]) for p in PIPE_FETCHED)
    assert result.total_bytes == total and result.files == len(PIPE_FETCHED)
    downloading = [s for s in snaps if s[0] == "downloading"]
    assert downloading[-1][1:] == (total, total)  # counted from the chunks, not filled in at the end
    assert [d for _, d, _ in downloading] == sorted(d for _, d, _ in downloading)
    again = fetch([target_from_id(PIPE)])
    assert again.state == "completed" and again.total_bytes == 0 and again.cached_bytes == total

    for repo_id, files in lora_repo_files().items():
        hub.add_repo(repo_id, files)
    job = write_fetch_job(Path.cwd() / "jobs")
    targets, notes = job_targets(load_job_file(job).job)
    assert targets == [
        FetchTarget("model.name_or_path", PIPE, PIPE),
        FetchTarget("model.vae_path", "tester/vae-only", "tester/vae-only", only_parts=("vae",)),
        FetchTarget("model.assistant_lora_path", "tester/adapters/wan/ara_uint4.safetensors", "tester/adapters",
                    filename="wan/ara_uint4.safetensors"),
        FetchTarget("network.pretrained_lora_path", "tester/one-lora", "tester/one-lora", lora=True),
    ]
    assert notes == []
    failed = fetch([target_from_id("tester/adapters")], log=lambda m: None)  # no model_index, but files to take
    assert failed.state == "completed"
    several = fetch([FetchTarget("network.pretrained_lora_path", "tester/adapters", "tester/adapters", lora=True)])
    assert several.state == "failed" and several.error.startswith(
        "network.pretrained_lora_path: repo tester/adapters holds 2 .safetensors files")
