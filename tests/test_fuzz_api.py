"""Property-based fuzzing of the web API from its own OpenAPI document (schemathesis; issue #15).

The app (create_app, token required) runs on a temporary world: its home, training folder,
datasets folder and working folder, and beside them an `outside` folder holding a canary. The
world holds a dataset with images, captions, a caption that links outside, an image and a folder
that link outside, a dataset folder that is a link outside, and two jobs (idle, running) whose run
folders hold a log, samples and links outside.

Every operation of /api/openapi.json is fuzzed twice: with the token and without it. Cases are
schemathesis' positive and negative cases, plus cases whose path parameters name the world's
objects or try to leave it (`..`, percent-encoding, absolute paths, links).

Properties: no 5xx and no traceback in any answer; without the token every operation (but the
login) is refused with 401 and nothing changes (files and the database compared before and after);
with the token the canary's content is in no answer, no link leading outside is served, and nothing
outside the configured folders is created, changed or removed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sqlite3
import tempfile
import types
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.python import asgi

from aitk.ui import routes_misc
from aitk.ui.server import create_app
from aitk.ui.settings import UISettings
from aitk.ui.store import IDLE, RUNNING
from fuzz_common import TRACEBACK, Counter, budget, fuzz_settings

WITH_TOKEN_EXAMPLES = 12  # per operation in `make test` (x AITK_FUZZ_SCALE)
WITHOUT_TOKEN_EXAMPLES = 6
TOKEN = "fuzz-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CANARY = "AITK-CANARY-0b7e42d1"
OPEN = {("POST", "/api/auth/login")}
JOBS = {1: ("fuzzjob", IDLE), 2: ("runjob", RUNNING)}
LINKED_OUT = {"leak.png", "dir.png", "link.txt", "linkdir"}

# Path parameters that name the world's objects or try to leave it.
PATH_VALUES: dict[str, list[Any]] = {
    "job_id": [1, 2, 3, 0, -1, 2**63, 10**30],
    "name": ["shapes", "linked", "outside", "..", "../outside", "%2e%2e", "..%2Foutside", "con", "a" * 101, "sh apes"],
    "item": ["red.png", "blue.png", "leak.png", "dir.png", "loop.png", "missing.png", "..",
             "../../outside/canary.png", "..%2F..%2Foutside%2Fcanary.png", "/etc/passwd", "red.txt", "C:evil.png"],
    "path": ["log.txt", "link.txt", "linkdir/canary.txt", "loop.txt", "samples/000000010_0.jpg",
             "../../outside/canary.txt", "samples/../../../outside/canary.txt", "/etc/passwd", "%2e%2e/x", "control",
             "."],
    "preset_id": ["sd15", "flux_dev", "../x", "%00"],
}


def _png(color: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, "PNG")
    return buf.getvalue()


def _job_yaml(name: str, root: Path) -> str:
    return (f"job: extension\nconfig:\n  name: {name}\n  process:\n  - type: sd_trainer\n"
            f"    training_folder: {root / 'out'}\n    device: cpu\n    network: {{type: lora, linear: 4}}\n"
            f"    datasets: [{{folder_path: {root / 'data' / 'shapes'}, resolution: [64]}}]\n"
            f"    train: {{steps: 10}}\n    model: {{name_or_path: {root / 'no-model'}}}\n")


def make_world(root: Path) -> None:
    """Write (again) every file and link of the world that is missing or changed."""
    files: dict[Path, bytes] = {
        root / "outside" / "canary.txt": CANARY.encode(),
        root / "outside" / "dir" / "canary.txt": CANARY.encode(),
        root / "outside" / "canary.png": _png((1, 254, 3)) + CANARY.encode(),
        root / "outside" / "status.json": f'{{"state": "{CANARY}", "step": 1}}'.encode(),
        root / "outside" / "metrics.jsonl": f'{{"step": 1, "loss": 0.5, "phase": "{CANARY}"}}\n'.encode(),
        root / "data" / "shapes" / "red.png": _png((200, 30, 30)),
        root / "data" / "shapes" / "red.txt": b"a red square",
        root / "data" / "shapes" / "blue.png": _png((30, 30, 200)),
    }
    links: dict[Path, Path] = {
        root / "data" / "shapes" / "blue.txt": root / "outside" / "canary.txt",
        root / "data" / "shapes" / "leak.png": root / "outside" / "canary.png",
        root / "data" / "shapes" / "dir.png": root / "outside" / "dir",
        root / "data" / "linked": root / "outside" / "dir",
    }
    for name, _status in JOBS.values():
        run = root / "out" / name
        files[run / "samples" / "000000010_0.jpg"] = _png((9, 9, 9))
        links[run / "link.txt"] = root / "outside" / "canary.txt"
        links[run / "linkdir"] = root / "outside" / "dir"
    # fuzzjob's run folder holds what a run writes; runjob's log, status and metrics are links out
    files[root / "out" / "fuzzjob" / "log.txt"] = b"line 1\nline 2\n"
    files[root / "out" / "fuzzjob" / "status.json"] = b'{"state": "completed", "step": 2}'
    files[root / "out" / "fuzzjob" / "metrics_fuzzjob.jsonl"] = b'{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n'
    links[root / "out" / "runjob" / "log.txt"] = root / "outside" / "canary.txt"
    links[root / "out" / "runjob" / "status.json"] = root / "outside" / "status.json"
    links[root / "out" / "runjob" / "metrics_runjob.jsonl"] = root / "outside" / "metrics.jsonl"
    for folder in ("home", "out", "data", "cwd"):
        (root / folder).mkdir(exist_ok=True)
    for path, data in files.items():
        if path.is_symlink() or path.is_dir():
            _remove(path)
        if not path.is_file() or path.read_bytes() != data:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    links[root / "data" / "shapes" / "loop.png"] = root / "data" / "shapes" / "loop.png"  # links to themselves
    links[root / "out" / "fuzzjob" / "loop.txt"] = root / "out" / "fuzzjob" / "loop.txt"
    for path, target in links.items():
        if path.is_symlink() and path.readlink() == target:
            continue
        if path.is_symlink() or path.exists():
            _remove(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every entry under `root` (links not followed): kind and a checksum of its content."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if rel.split(os.sep)[0] in skip or name.startswith("aitk_ui.db"):
                continue
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", zlib.crc32(path.read_bytes()))
    return out


def database(root: Path) -> Any:
    with sqlite3.connect(f"file:{root / 'home' / 'aitk_ui.db'}?mode=ro", uri=True) as conn:
        return (conn.execute("SELECT * FROM jobs ORDER BY id").fetchall(),
                conn.execute("SELECT * FROM settings ORDER BY key").fetchall())


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        make_world(root)
        settings = UISettings.from_env({}, home=root / "home", training_folder=root / "out",
                                       datasets_folder=root / "data")
        settings = replace(settings, auth_token=TOKEN, ui_dist=root / "dist", job_cwd=root / "cwd",
                           max_upload_bytes=1 << 20)
        self.app = create_app(settings)
        self.store = self.app.state.ctx.store
        self.dirty = True
        self.schema: Any = None
        self.restore()
        self.outside = snapshot(root / "outside")
        self.top = sorted(p.name for p in root.iterdir())

    def call(self, case: Any, **kwargs: Any) -> Any:
        """The case sent; a request that may change something (not GET) makes the world dirty."""
        self.dirty = self.dirty or case.method.upper() != "GET"
        return case.call(session=self.client, **kwargs)

    def restore(self) -> None:
        """The world as it was: files, links, the two jobs and their status, default settings (only
        after a request that may have changed something: GET changes nothing, test_ui_api checks)."""
        if not self.dirty:
            return
        self.dirty = False
        make_world(self.root)
        for job_id, (name, status) in JOBS.items():
            job = self.store.get_job(job_id)
            if job is None:
                other = self.store.get_job_by_name(name)
                if other is not None:
                    self.store.delete_job(other.id, [other.status])
                self.store.add_job(id=job_id, name=name, gpu_ids="cpu", config_yaml=_job_yaml(name, self.root),
                                   training_folder=str(self.root / "out"), status=status)
            else:
                self.store.update_job(job_id, name=name, status=status, queue_position=None,
                                      config_yaml=_job_yaml(name, self.root))
        for key in ("training_folder", "datasets_folder", "hf_token"):
            self.store.set_setting(key, None)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with tempfile.TemporaryDirectory(prefix="aitk-fuzz-api-") as tmp:
        w = World(Path(tmp))
        quick = types.SimpleNamespace(sleep=_no_sleep)  # a wrong token waits 0.5 s; not 1,000 times here
        original, routes_misc.asyncio = routes_misc.asyncio, quick
        try:
            with asgi.get_client(w.app) as client:
                w.client = client
                yield w
        finally:
            routes_misc.asyncio = original
            asgi.shutdown_lifespans()
            w.store.close()


async def _no_sleep(_seconds: float) -> None:
    return None


def _operations() -> tuple[dict[str, Any], list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        app = World(Path(tmp)).app
        document = app.openapi()
        app.state.ctx.store.close()
    labels = [f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item]
    return document, labels


DOCUMENT, LABELS = _operations()

# ------------------------------------------------------------------------------------ cases


def _safe_settings_body(body: Any) -> Any:
    """PUT /api/settings picks any folder on the machine (that is what it is for); the fuzzed
    values stay under the server's working folder, but for a `~user` that does not exist."""
    if not isinstance(body, dict):
        return body
    out = dict(body)
    for key in ("training_folder", "datasets_folder"):
        value = out.get(key)
        if isinstance(value, str) and value != "~nosuchuser_aitk" and (
            value.strip().startswith(("/", "~", "\\")) or ".." in value or "/" in value or "\\" in value
        ):
            out[key] = f"fz_{zlib.crc32(value.encode(errors='surrogatepass'))}"
    return out


def path_combinations(operation: Any) -> list[dict[str, Any]]:
    """Every combination of PATH_VALUES for the operation's path parameters."""
    names = [p.name for p in operation.path_parameters]
    if not names:
        return []
    return [dict(zip(names, values)) for values in itertools.product(*(PATH_VALUES.get(n, ["x"]) for n in names))]


BOMB = "meta:\n  a0: &a0 [x]\n" + "".join(f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))
# Bodies sent once each with the token, after the fuzzed cases.
EXPLICIT_BODIES: dict[tuple[str, str], list[Any]] = {
    ("PUT", "/api/settings"): [{"datasets_folder": "~nosuchuser_aitk"}, {"training_folder": "~nosuchuser_aitk/x"},
                               {"training_folder": "\x00"}, {"hf_token": "two words"}, {"hf_token": ""}],
    ("POST", "/api/validate"): [{"yaml": BOMB}, {"yaml": "a: &x [*x]\n"}, {"yaml": "[" * 3000}, {"yaml": "a: \x00"},
                                {"yaml": "config: {name: x, process: [{training_folder: ~nosuchuser_aitk}]}"},
                                {"config": {"config": {"name": "../../outside"}}}],
    ("POST", "/api/plan"): [{"yaml": BOMB}, {"yaml": "a: &x [*x]\n"}, {"gpu_memory": "1e999GB", "yaml": "x"}],
    ("POST", "/api/jobs"): [{"yaml": BOMB}, {"config": {"config": {"name": ".."}}}, {"yaml": "{" * 2000}],
    ("POST", "/api/datasets"): [{"name": "../outside"}, {"name": "linked"}, {"name": "shapes"}, {"name": "con"}],
    ("POST", "/api/auth/login"): [{"token": TOKEN}, {"token": ""}, {"token": TOKEN + "\x00"}],
}
# A body that reaches the route's own logic, for the explicit path cases (others send none).
PLAIN_BODIES: dict[tuple[str, str], Any] = {
    ("PUT", "/api/datasets/{name}/items/{item}/caption"): {"caption": "fuzz"},
    ("PUT", "/api/jobs/{job_id}"): {"gpu_ids": "cpu"},
    ("POST", "/api/jobs/{job_id}/clone"): {},
}


def case_strategy(operation: Any) -> st.SearchStrategy[Any]:
    strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
    if operation.path_parameters or operation.query or operation.body:
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
    combos = path_combinations(operation)
    if combos:
        strategies.append(st.sampled_from(combos).flatmap(lambda pp: operation.as_strategy(path_parameters=pp)))
    if operation.method.upper() == "PUT" and operation.path == "/api/settings":
        extra = st.fixed_dictionaries({}, optional={
            "training_folder": st.sampled_from(["~nosuchuser_aitk", "\x00", " "]),
            "datasets_folder": st.sampled_from(["~nosuchuser_aitk", "sub"]),
        })
        strategies.append(extra.flatmap(lambda body: operation.as_strategy(body=body)))
    return st.one_of(strategies)


HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)
# Besides the schema's inputs: what else a client may send (wrong tokens, cookies, origins, queries).
WRONG_AUTH = st.fixed_dictionaries({}, optional={
    "Authorization": st.sampled_from(["Bearer", "Bearer ", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"Basic {TOKEN}",
                                      f"bearer  {TOKEN[::-1]}", TOKEN]) | HEADER_TEXT,
    "Cookie": st.sampled_from(["aitk_session=", f"aitk_session={TOKEN}", "aitk_session=0" * 3, "a=b; aitk_session"])
    | HEADER_TEXT,
    "Origin": st.sampled_from(["null", "http://evil.example", "http://testserver"]) | HEADER_TEXT,
})
EXTRA = st.fixed_dictionaries({}, optional={
    "Origin": st.sampled_from(["null", "http://evil.example"]) | HEADER_TEXT,
    "Referer": HEADER_TEXT,
    "Cookie": HEADER_TEXT,
})
JUNK_QUERY = st.dictionaries(st.sampled_from(["x", "path", "name", "__proto__", "token"]), HEADER_TEXT, max_size=2)


def _body_text(response: Any) -> str:
    return response.content.decode("latin-1")


def check_with_token(world: World, case: Any, response: Any) -> None:
    text = _body_text(response)
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {text[:1500]}"
    assert response.status_code < 500, where
    assert TRACEBACK not in text, where
    assert CANARY not in text, "the canary's content was served: " + where
    linked = {str(v) for v in (case.path_parameters or {}).values()} & LINKED_OUT
    if linked and response.status_code == 200 and case.path.endswith(("/file", "/thumbnail", "/files/{path}")):
        raise AssertionError("a link leading outside was served: " + where)
    assert snapshot(world.root / "outside") == world.outside, "outside changed: " + where
    assert sorted(p.name for p in world.root.iterdir()) == world.top, "created beside the folders: " + where


def check_without_token(case: Any, response: Any, before: Any, after: Any) -> None:
    text = _body_text(response)
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {text[:1500]}"
    assert response.status_code < 500 and TRACEBACK not in text, where
    if (case.method.upper(), case.path) not in OPEN:
        assert response.status_code == 401, where
    assert after == before, "changed without the token: " + where


def _run(world: World, label: str, with_token: bool) -> int:
    if world.schema is None:
        world.schema = schemathesis.openapi.from_dict(DOCUMENT)
        world.schema.app = world.app
    method, path = label.split(" ", 1)
    operation = world.schema.find_operation_by_path(method, path)
    assert operation is not None, label
    count = Counter()

    @fuzz_settings(WITH_TOKEN_EXAMPLES if with_token else WITHOUT_TOKEN_EXAMPLES)
    @given(case=case_strategy(operation), headers=EXTRA if with_token else WRONG_AUTH, query=JUNK_QUERY)
    def run(case: Any, headers: dict[str, str], query: dict[str, str]) -> None:
        count.add()
        world.restore()
        if method == "PUT" and path == "/api/settings":
            case.body = _safe_settings_body(case.body)
        params = {k: v for k, v in query.items() if k not in (case.query or {})}
        if with_token:
            response = world.call(case, headers={**headers, **AUTH}, params=params)
            check_with_token(world, case, response)
        else:
            before = (snapshot(world.root), database(world.root))
            response = world.call(case, headers=headers, params=params)
            check_without_token(case, response, before, (snapshot(world.root), database(world.root)))

    run()
    if with_token:  # and every combination of the path values, once each (deterministic)
        for pp in path_combinations(operation):
            world.restore()
            body = PLAIN_BODIES.get((method, path))
            case = operation.Case(path_parameters=pp, **({"body": body, "media_type": "application/json"}
                                                         if body is not None else {}))
            check_with_token(world, case, world.call(case, headers=AUTH))
        for body in EXPLICIT_BODIES.get((method, path), []):
            world.restore()
            case = operation.Case(body=body, media_type="application/json")
            check_with_token(world, case, world.call(case, headers=AUTH))
    return count.n


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("with_token", [True, False], ids=["token", "no-token"])
def test_operation(world: World, label: str, with_token: bool) -> None:
    ran = _run(world, label, with_token)
    assert ran >= budget(WITH_TOKEN_EXAMPLES if with_token else WITHOUT_TOKEN_EXAMPLES)


def test_every_operation_is_fuzzed() -> None:
    """The document lists every route the app answers (a new route cannot escape the fuzzing)."""
    from aitk.ui.server import route_table

    with tempfile.TemporaryDirectory() as tmp:
        app = World(Path(tmp)).app
        routes = {f"{m} {p.replace('{path:path}', '{path}')}" for m, p in route_table(app) if p.startswith("/api/")}
        app.state.ctx.store.close()
    assert routes - {"GET /api/openapi.json", "GET /api/docs"} == set(LABELS)
    assert len(LABELS) >= 40


# ------------------------------------------------------------------------------------ regressions


def _get(world: World, url: str, method: str = "GET", **kw: Any) -> Any:
    world.dirty = True
    return world.client.request(method, url, headers=AUTH, **kw)


def test_job_id_beyond_64_bits_is_404_not_500(world: World) -> None:
    world.restore()
    for url in ("/api/jobs/9223372036854775808", "/api/jobs/-9223372036854775809/log"):
        response = _get(world, url)
        assert response.status_code == 404 and "no job" in response.json()["detail"], response.text


def test_settings_folder_under_an_unknown_users_home_is_400(world: World) -> None:
    world.restore()
    response = _get(world, "/api/settings", "PUT", json={"datasets_folder": "~nosuchuser_aitk/sets"})
    assert response.status_code == 400
    assert response.json()["detail"] == ("datasets_folder: '~nosuchuser_aitk/sets' starts with ~ but names no user "
                                         "of this machine; write the full path")


def test_run_files_linked_outside_are_not_read(world: World) -> None:
    """runjob's log.txt, status.json and metrics file are links to files outside the training folder."""
    world.restore()
    detail = _get(world, "/api/jobs/2").json()
    assert detail["log_tail"] == [] and detail["run_status"] is None
    assert _get(world, "/api/jobs/2/log").json()["lines"] == []
    metrics = _get(world, "/api/jobs/2/metrics")
    assert metrics.status_code == 403 and "leading outside" in metrics.json()["detail"]
    assert _get(world, "/api/jobs/1/log").json()["lines"] == ["line 1", "line 2"]  # the real ones are read
    assert _get(world, "/api/jobs/1").json()["run_status"]["state"] == "completed"


def test_a_link_to_itself_is_404_not_500(world: World) -> None:
    world.restore()
    for url in ("/api/datasets/shapes/items/loop.png/file", "/api/datasets/shapes/items/loop.png/caption",
                "/api/jobs/1/files/loop.txt"):
        response = _get(world, url)
        assert response.status_code == 404 and "loop" in response.json()["detail"], (url, response.text)
    assert "loop.png" not in [i["name"] for i in _get(world, "/api/datasets/shapes").json()["items"]]
