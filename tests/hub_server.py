"""A local Hugging Face Hub look-alike for tests: real huggingface_hub client, real HTTP, no mocks.

It answers what huggingface_hub 2.x asks of the Hub:
- uploads (`create_repo`, `create_commit`): /api/repos/create, /api/validate-yaml,
  /api/models/<repo>/preupload/<rev>, /api/models/<repo>/commit/<rev>, /api/whoami-v2. Files go as
  regular (base64) commit entries: the server answers "regular" to the upload-mode query;
- downloads (`hf_hub_download`, `snapshot_download`, `model_info`, `list_repo_files`, and so
  diffusers' / transformers' `from_pretrained`): HEAD and GET /<repo>/resolve/<rev>/<path> with
  X-Repo-Commit, ETag and Content-Length; /api/models/<repo>/revision/<rev> (siblings) and
  /api/models/<repo>/tree/<rev> (recursive listing). Unknown repos answer 404 RepoNotFound,
  unknown files 404 EntryNotFound, as the Hub does.
- gated repos: `gated[repo] = 401 or 403` answers that status to every request for the repo
  unless it carries one of `accepted_tokens` (with X-Error-Code GatedRepo unless `bare_gate`).

Every request is recorded (method, path, headers), so tests can see what the client sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest


#: what huggingface_hub fetches for itself (its agent-harness registry, unauthenticated)
HOUSEKEEPING = ("/api/agent-harnesses",)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(status: int, payload: Any, **headers: str) -> Reply:
    return Reply(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers})


@dataclass
class FakeHub:
    url: str = ""
    fail_status: int | None = None  # answer every request with this status
    requests: list[Request] = field(default_factory=list)
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo id -> create payload
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo id -> path -> bytes
    commits: list[dict[str, Any]] = field(default_factory=list)
    gated: dict[str, int] = field(default_factory=dict)  # repo id -> 401 / 403 without an accepted token
    accepted_tokens: set[str] = field(default_factory=set)
    bare_gate: bool = False  # gated answers without X-Error-Code (a proxy, an older Hub)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------------------ set-up
    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> None:
        """A model repo that downloads can read."""
        with self.lock:
            self.repos.setdefault(repo_id, {"name": repo_id})
            self.files.setdefault(repo_id, {}).update(files)

    def add_folder(self, repo_id: str, folder: Path) -> None:
        """Serve every file under `folder` (a saved diffusers model) as the repo's files."""
        self.add_repo(repo_id, {
            p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
        })

    def downloads(self, repo_id: str | None = None) -> list[Request]:
        """GET requests for file contents (resolve URLs), optionally of one repo."""
        wanted = f"/{repo_id}/resolve/" if repo_id else "/resolve/"
        return [r for r in self.requests if r.method == "GET" and wanted in r.path]

    def commit_sha(self, repo_id: str) -> str:
        digest = hashlib.sha1(repo_id.encode())
        for path, data in sorted(self.files.get(repo_id, {}).items()):
            digest.update(path.encode() + b"\0" + hashlib.sha256(data).digest())
        return digest.hexdigest()

    # ------------------------------------------------------------------------------ routing
    def handle(self, req: Request) -> Reply:
        if req.path.startswith(HOUSEKEEPING):  # huggingface_hub's own registry fetch: not ours to count
            return json_reply(404, {"error": "not here"})
        with self.lock:
            self.requests.append(req)
        if self.fail_status is not None:
            return json_reply(self.fail_status, {"error": "the hub is down"})
        path = unquote(req.path.split("?", 1)[0])
        parts = path.strip("/").split("/")
        if req.method == "GET" and path == "/api/whoami-v2":
            return json_reply(200, {"name": "tester", "type": "user", "auth": {"accessToken": {"role": "write"}}})
        if req.method == "POST":
            return self._upload(req, path, parts)
        if req.method not in ("GET", "HEAD"):
            return json_reply(404, {"error": f"not here: {req.method} {path}"})
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] in ("revision", "tree"):
            repo_id = f"{parts[2]}/{parts[3]}"
            refused = self._refused(req, repo_id)
            if refused is not None:
                return refused
            if parts[4] == "revision":
                return self._repo_info(repo_id)
            return self._tree(repo_id, "/".join(parts[6:]))
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id = f"{parts[0]}/{parts[1]}"
            refused = self._refused(req, repo_id)
            if refused is not None:
                return refused
            return self._resolve(req, repo_id, "/".join(parts[4:]))
        return json_reply(404, {"error": f"not here: {req.method} {path}"})

    def _refused(self, req: Request, repo_id: str) -> Reply | None:
        if repo_id not in self.files:
            return json_reply(404, {"error": "Repository not found"}, **{"X-Error-Code": "RepoNotFound"})
        status = self.gated.get(repo_id)
        if status is None:
            return None
        token = req.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if token and token in self.accepted_tokens:
            return None
        headers = {} if self.bare_gate else {"X-Error-Code": "GatedRepo",
                                             "X-Error-Message": "Access to this model is restricted."}
        return json_reply(status, {"error": f"Access to model {repo_id} is restricted."}, **headers)

    def _repo_info(self, repo_id: str) -> Reply:
        siblings = [{"rfilename": p} for p in sorted(self.files[repo_id])]
        return json_reply(200, {"id": repo_id, "modelId": repo_id, "sha": self.commit_sha(repo_id),
                                "private": False, "gated": repo_id in self.gated and "manual",
                                "tags": [], "siblings": siblings})

    def _tree(self, repo_id: str, under: str) -> Reply:
        prefix = under.rstrip("/") + "/" if under else ""
        entries = [
            {"type": "file", "path": p, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for p, data in sorted(self.files[repo_id].items()) if p.startswith(prefix)
        ]
        return json_reply(200, entries)

    def _resolve(self, req: Request, repo_id: str, filename: str) -> Reply:
        commit = self.commit_sha(repo_id)
        data = self.files[repo_id].get(filename)
        if data is None:
            return json_reply(404, {"error": "Entry not found"},
                              **{"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": commit,
                   "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        return Reply(200, b"" if req.method == "HEAD" else data, headers | {"Content-Length": str(len(data))})

    def _upload(self, req: Request, path: str, parts: list[str]) -> Reply:
        if path == "/api/repos/create":
            payload = json.loads(req.body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            with self.lock:
                self.repos[repo_id] = payload
                self.files.setdefault(repo_id, {})
            return json_reply(200, {"url": f"{self.url}/{repo_id}"})
        if path == "/api/validate-yaml":
            return json_reply(200, {"errors": [], "warnings": []})
        # /api/models/<ns>/<name>/(preupload|commit)/<rev>
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit"):
            repo_id = f"{parts[2]}/{parts[3]}"
            if repo_id not in self.repos:
                return json_reply(404, {"error": "Repository not found"})
            if parts[4] == "preupload":
                files = json.loads(req.body)["files"]
                return json_reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            added = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                     for item in lines if item["key"] == "file"}
            others = [item["key"] for item in lines if item["key"] not in ("header", "file")]
            with self.lock:
                self.files[repo_id].update(added)
                self.commits.append({"repo": repo_id, "header": header, "paths": sorted(added), "others": others})
            oid = f"{len(self.commits):040x}"
            return json_reply(200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                    "pullRequestUrl": None})
        return json_reply(404, {"error": f"not here: {req.method} {path}"})


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            req = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            reply = hub.handle(req)
            self.send_response(reply.status)
            headers = {"Content-Length": str(len(reply.body))} | reply.headers
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer has headers only (keep-alive would break)
                self.wfile.write(reply.body)

        do_GET = do_POST = do_PUT = do_HEAD = _serve

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

    return Handler


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """The local hub, with huggingface_hub pointed at it: HF_ENDPOINT (and the URL template the
    library built from it at import), an empty cache in tmp_path, online, and no token of
    whoever runs the tests (neither HF_TOKEN nor a stored login). The working directory is
    tmp_path."""
    import huggingface_hub.constants as hf_constants

    state = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    # the suite runs with HF_HUB_OFFLINE=1; huggingface_hub read it at import, so lift it here only
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", state.url)
    # downloads without an explicit endpoint (diffusers, transformers) use the import-time values
    monkeypatch.setattr(hf_constants, "ENDPOINT", state.url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", state.url + "/{repo_id}/resolve/{revision}/{filename}")
    # HfApi instances made at import (huggingface_hub's module-level functions, transformers' shared
    # one, made at first use) keep the endpoint of that moment
    import huggingface_hub.hf_api as hf_api
    import transformers.utils.hub as transformers_hub

    monkeypatch.setattr(hf_api.api, "endpoint", state.url)
    monkeypatch.setattr(transformers_hub, "_hf_api", None)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf-home" / "agents.json"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    # set, then delete: undoing restores "absent", also removing a token the code under test sets
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    # no stored login of whoever runs the tests may leak into a request
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.chdir(tmp_path)
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
