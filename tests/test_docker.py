"""docker/: the Dockerfile linted by hadolint and compose.yaml validated against the compose
specification's JSON schema (both run for real, and each shown to catch a broken file), their
settings checked against aitk's own (port, /workspace layout, torch and extras pins), the
entrypoint run here as the image runs it, and, where a docker daemon runs and can pull the base
images, the image built and started (aitk --help, the health route)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from aitk.cloud import layout
from aitk.cloud.modal_app import EXTRAS, TORCH_CUDA_INDEX, torch_pin

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
BIN = Path(sys.executable).parent
TOKEN = "docker-test-token-0123456789"


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{path} missing: `make install` installs it from requirements.txt"
    return str(path)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments and blanks dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, rest = whole.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def arg_defaults(steps: list[tuple[str, str]]) -> dict[str, str]:
    found = {}
    for keyword, rest in steps:
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            found[name] = value.strip('"')
    return found


def stages(steps: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (from its FROM on)."""
    out: list[list[tuple[str, str]]] = []
    for step in steps:
        if step[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(step)
    return out


def env_values(steps: list[tuple[str, str]]) -> dict[str, str]:
    found = {}
    for keyword, rest in steps:
        if keyword == "ENV":
            for name, value in re.findall(r"(\w+)=(\S+)", rest):
                found[name] = value
    return found


STEPS = instructions(DOCKERFILE.read_text())


# ------------------------------------------------------------------------------------- linters


def test_hadolint_passes_the_dockerfile():
    result = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nCMD echo hi\n")
    result = subprocess.run([tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3015", "DL3009", "DL3025"):  # latest tag, recommends, apt lists, CMD form
        assert rule in result.stdout, result.stdout


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True)


def test_compose_file_matches_the_compose_spec():
    result = check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


def test_compose_schema_catches_a_broken_file(tmp_path):
    bad = tmp_path / "compose.yaml"
    data = yaml.safe_load(COMPOSE.read_text())
    data["services"]["aitk"]["ports"] = 8675  # a list in the spec
    data["services"]["aitk"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    bad.write_text(yaml.safe_dump(data))
    result = check_compose(bad)
    assert result.returncode == 1, result.stdout
    assert "$.services.aitk.ports" in result.stdout and "capabilities" in result.stdout


# ------------------------------------------------------------------------ what the files say


def test_dockerfile_builds_what_aitk_needs():
    defaults = arg_defaults(STEPS)
    web, runtime = [s for s in stages(STEPS) if s[0][1].split()[0] != "${UV_IMAGE}"]
    # the runtime: a CUDA runtime image, the pinned torch from PyTorch's CUDA index (the same index
    # the Modal image uses), then requirements.txt, the extras with the Makefile's pins, aitk itself
    assert runtime[0][1] == "${CUDA_IMAGE}"
    assert re.match(r"^nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+$", defaults["CUDA_IMAGE"])
    assert defaults["TORCH_INDEX_URL"] == TORCH_CUDA_INDEX
    assert f"torch=={defaults['TORCH_VERSION']}" == torch_pin(ROOT / "requirements.txt")
    runs = " ".join(rest for keyword, rest in runtime if keyword == "RUN")
    assert 'pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in runs
    assert runs.index("torch==${TORCH_VERSION}") < runs.index("-r requirements.txt") < runs.index("-e .")
    makefile_extras = re.search(r"--target \$\(VENV\)/extras (.+)", (ROOT / "Makefile").read_text()).group(1).split()
    assert f"--target /opt/venv/extras {' '.join(EXTRAS)}" in runs and list(EXTRAS) == makefile_extras
    assert "uv venv --seed --python 3.11 /opt/venv" in runs
    # the web app: built from the lock file in its own stage, its dist copied beside the package
    assert web[0][1].endswith("AS web")
    web_runs = [rest for keyword, rest in web if keyword == "RUN"]
    assert web_runs[0].startswith("npm ci") and web_runs[-1] == "npm run build"
    assert ("COPY", "--from=web /src/ui/dist ui/dist") in runtime
    # where things live: the layout aitk cloud uses in the Modal volume too
    env = env_values(runtime)
    assert env["AITK_UI_HOME"] == layout.in_container(layout.UI_HOME)
    assert env["AITK_TRAINING_FOLDER"] == layout.in_container(layout.OUTPUT)
    assert env["AITK_DATASETS_FOLDER"] == layout.in_container(layout.DATASETS)
    assert env["HF_HOME"] == layout.in_container(layout.HF_CACHE)
    assert ("EXPOSE", "8675") in runtime and env["AITK_UI_PORT"] == "8675"
    assert ("ENTRYPOINT", '["tini", "--", "aitk-entrypoint"]') in runtime
    assert ("COPY", "docker/entrypoint.sh /usr/local/bin/aitk-entrypoint") in runtime
    healthcheck = next(rest for keyword, rest in runtime if keyword == "HEALTHCHECK")
    assert "/api/auth/check" in healthcheck and "AI_TOOLKIT_AUTH" in healthcheck


def test_compose_runs_the_image_with_gpu_token_and_volumes():
    data = yaml.safe_load(COMPOSE.read_text())
    service = data["services"]["aitk"]
    assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert service["ports"] == ["${AITK_PORT:-8675}:8675"]
    env = dict(item.partition("=")[::2] for item in service["environment"])
    # the token is required (compose stops with the message), HF_TOKEN passed on from the shell
    assert env["AI_TOOLKIT_AUTH"].startswith("${AI_TOOLKIT_AUTH:?") and "openssl rand" in env["AI_TOOLKIT_AUTH"]
    assert env["HF_TOKEN"] == "" and "HF_TOKEN" in service["environment"]
    targets = {volume.rsplit(":", 1)[1]: volume.rsplit(":", 1)[0] for volume in service["volumes"]}
    dockerfile_env = env_values(STEPS)
    assert set(targets) == {dockerfile_env[k] for k in ("AITK_DATASETS_FOLDER", "AITK_TRAINING_FOLDER",
                                                        "AITK_UI_HOME", "HF_HOME")}
    assert targets[dockerfile_env["HF_HOME"]] == "${HF_HOME:-~/.cache/huggingface}"
    assert targets[dockerfile_env["AITK_UI_HOME"]] in data["volumes"]  # a named volume: kept across `up`s
    device = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `path` out of the build context (its patterns, no `!` lines)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch(prefix, pattern) for prefix in prefixes for pattern in patterns)


def test_dockerignore_keeps_what_the_image_copies_and_drops_the_rest():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)  # dockerignored() does not read exceptions
    sources = []
    for keyword, rest in STEPS:
        if keyword == "COPY" and not rest.startswith("--from"):
            sources.extend(rest.split()[:-1])
    assert {"requirements.txt", "pyproject.toml", "aitk/", "ui/", "docker/entrypoint.sh"} <= set(sources)
    for source in sources:
        folder = ROOT / source
        files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else [folder]
        kept = [p for p in files if not dockerignored(p.relative_to(ROOT).as_posix(), patterns)]
        assert kept, f"{source}: every file of it is left out of the build context"
        assert folder.is_dir() or kept == [folder], f"{source} is left out of the build context"
    for dropped in (".venv/bin/python", ".git/HEAD", "ui/node_modules/vite/package.json", "output/run/log.txt",
                    "datasets/cats/1.png", "aitk/__pycache__/cli.cpython-311.pyc", "tests/test_docker.py"):
        assert dockerignored(dropped, patterns), dropped


def test_make_docker_builds_the_dockerfile():
    # run under `make test` too: a sub-make would print "Entering directory" lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(["make", "--no-print-directory", "-n", "docker"], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["docker", "build", "-f", "docker/Dockerfile", "-t", "aitk:latest", "."]


# ---------------------------------------------------------------------------- the entrypoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entrypoint_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AI_TOOLKIT_AUTH", "AITK_UI_ALLOWED_ORIGINS",
                                                            "RUNPOD_POD_ID")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", AITK_UI_PORT=str(port),
               AITK_UI_HOME=str(tmp_path / "ui"), AITK_TRAINING_FOLDER=str(tmp_path / "output"),
               AITK_DATASETS_FOLDER=str(tmp_path / "datasets"), **extra)
    return env


def test_entrypoint_refuses_all_interfaces_without_a_token(tmp_path):
    result = subprocess.run(["sh", str(ENTRYPOINT)], env=entrypoint_env(tmp_path, free_port()),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a token" in result.stderr and "AI_TOOLKIT_AUTH" in result.stderr


def test_entrypoint_passes_commands_to_aitk(tmp_path):
    result = subprocess.run(["sh", str(ENTRYPOINT), "--help"], env=entrypoint_env(tmp_path, free_port()),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage: aitk")


def request(url: str, method: str = "GET", headers: dict[str, str] | None = None,
            body: dict | None = None) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                         **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def wait_healthy(url: str, process: subprocess.Popen[str], seconds: float = 30.0) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}: {process.stderr.read()}")
        try:
            return request(url, headers={"Authorization": f"Bearer {TOKEN}"})[0]
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"no answer from {url} within {seconds} s")


def test_entrypoint_serves_the_ui_with_a_token_and_accepts_the_runpod_origin(tmp_path):
    port = free_port()
    env = entrypoint_env(tmp_path, port, AI_TOOLKIT_AUTH=TOKEN, RUNPOD_POD_ID="abc123xyz")
    process = subprocess.Popen(["sh", str(ENTRYPOINT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_healthy(f"{base}/api/auth/check", process) == 200  # the image's HEALTHCHECK route
        assert request(f"{base}/api/auth/check")[0] == 401  # the token is required
        status, headers, _ = request(f"{base}/api/auth/login", "POST", body={"token": TOKEN})
        assert status == 200
        cookie = headers["set-cookie"].split(";")[0]
        # RunPod's proxy: the page's origin is the pod's proxy address, whatever Host arrives here
        runpod = {"Cookie": cookie, "Origin": f"https://abc123xyz-{port}.proxy.runpod.net"}
        assert request(f"{base}/api/datasets", "POST", runpod, {"name": "from_runpod"})[0] == 201
        other = {"Cookie": cookie, "Origin": "https://evil.example"}
        assert request(f"{base}/api/datasets", "POST", other, {"name": "from_elsewhere"})[0] == 403
        assert (tmp_path / "datasets" / "from_runpod").is_dir()
        assert not (tmp_path / "datasets" / "from_elsewhere").exists()
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stdout.close()
        process.stderr.close()


# ------------------------------------------------------------------------------- the image


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "(no output)"


def daemon_problem() -> str | None:
    """Why the image cannot be built here, or None when a daemon answers and the bases can be had."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker client on the PATH"
    info = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                          timeout=60)
    if info.returncode != 0:
        return f"no docker daemon answers (docker info: {last_line(info.stderr or info.stdout)})"
    defaults = arg_defaults(STEPS)
    for name in ("CUDA_IMAGE", "NODE_IMAGE", "UV_IMAGE"):
        image = defaults[name]
        if subprocess.run([docker, "image", "inspect", image], capture_output=True).returncode == 0:
            continue
        pull = subprocess.run([docker, "pull", image], capture_output=True, text=True, timeout=1800)
        if pull.returncode != 0:
            return (f"a docker daemon runs, but the base image {image} cannot be pulled: "
                    f"{last_line(pull.stderr or pull.stdout)}")
    return None


@pytest.mark.slow
def test_image_builds_and_serves(tmp_path):
    problem = daemon_problem()
    if problem:
        pytest.skip(f"image not built: {problem}")
    tag = "aitk:test"
    # e.g. "--network host --build-arg TORCH_INDEX_URL=http://127.0.0.1:8899/simple" for a local mirror
    extra = os.environ.get("AITK_DOCKER_BUILD_ARGS", "").split()
    subprocess.run(["docker", "build", *extra, "-f", str(DOCKERFILE), "-t", tag, str(ROOT)], check=True, timeout=3600)
    helped = subprocess.run(["docker", "run", "--rm", tag, "--help"], capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: aitk"), helped.stderr
    refused = subprocess.run(["docker", "run", "--rm", tag], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "AI_TOOLKIT_AUTH" in refused.stderr
    port = free_port()
    # the host's network, so that the test talks to 127.0.0.1 only (no bridge address in between)
    container = subprocess.run(["docker", "run", "-d", "--network", "host", "-e", f"AI_TOOLKIT_AUTH={TOKEN}", "-e",
                                f"AITK_UI_PORT={port}", tag], capture_output=True, text=True, check=True).stdout.strip()
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline and status != 200:
            try:
                status = request(f"http://127.0.0.1:{port}/api/auth/check",
                                 headers={"Authorization": f"Bearer {TOKEN}"})[0]
            except OSError:
                time.sleep(1)
        assert status == 200
        assert request(f"http://127.0.0.1:{port}/")[0] == 401  # the app's pages need the token too
        page = request(f"http://127.0.0.1:{port}/", headers={"Authorization": f"Bearer {TOKEN}"})
        assert page[0] == 200 and b"/assets/" in page[2]  # the built web app, not the placeholder page
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
