"""AITK_UI_ALLOWED_ORIGINS through the API: `aitk ui` behind a proxy (RunPod's
https://<pod>-8675.proxy.runpod.net) receives the browser's changes with the proxy's origin, not
the Host the request arrives with. A configured origin's changes are accepted, any other origin's
are refused with 403, as before; requests carrying the token itself are not browser requests and
are not checked."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from aitk.ui.server import create_app
from aitk.ui.settings import UISettings

TOKEN = "origin-test-token-0123456789"
POD = "https://abc123xyz-8675.proxy.runpod.net"


def signed_in_client(tmp_path: Path, environ: dict[str, str]) -> TestClient:
    """A browser session: signed in with the cookie, the request arriving at the pod's own address."""
    settings = UISettings.from_env({"AI_TOOLKIT_AUTH": TOKEN, **environ}, home=tmp_path / "home",
                                   training_folder=tmp_path / "out", datasets_folder=tmp_path / "data")
    client = TestClient(create_app(settings), base_url="http://127.0.0.1:8675")
    client.__enter__()
    assert client.post("/api/auth/login", json={"token": TOKEN}).status_code == 200
    return client


@pytest.fixture
def behind_proxy(tmp_path):
    client = signed_in_client(tmp_path, {"AITK_UI_ALLOWED_ORIGINS": f" {POD}/ , http://localhost:5173"})
    yield client
    client.__exit__(None, None, None)


def test_the_settings_read_the_origins_from_the_environment():
    settings = UISettings.from_env({"AITK_UI_ALLOWED_ORIGINS": f" {POD}/ ,, http://localhost:5173 "})
    assert settings.allowed_origins == (POD, "http://localhost:5173")
    assert UISettings.from_env({}).allowed_origins == ()


def test_a_change_from_the_configured_origin_is_accepted(behind_proxy, tmp_path):
    r = behind_proxy.post("/api/datasets", json={"name": "from_pod"}, headers={"Origin": POD})
    assert r.status_code == 201, r.text
    assert (tmp_path / "data" / "from_pod").is_dir()
    # the origin compares as browsers send it: scheme and host case-insensitive; a Referer alone counts
    assert behind_proxy.post("/api/datasets", json={"name": "upper"}, headers={"Origin": POD.upper()}).status_code == 201
    referer = behind_proxy.put("/api/settings", json={"hf_token": "hf_0123456789abcdef"},
                               headers={"Referer": f"{POD}/settings"})
    assert referer.status_code == 200 and behind_proxy.get("/api/settings").json()["hf_token_set"] is True
    # every other origin list entry works too
    assert behind_proxy.delete("/api/datasets/upper", headers={"Origin": "http://localhost:5173"}).status_code == 200


def test_a_change_from_another_origin_is_refused(behind_proxy, tmp_path):
    for origin in ("https://evil.example", "https://abc123xyz-8675.proxy.runpod.net.evil.example",
                   "http://abc123xyz-8675.proxy.runpod.net", "https://other-pod-8675.proxy.runpod.net"):
        r = behind_proxy.post("/api/datasets", json={"name": "refused"}, headers={"Origin": origin})
        assert r.status_code == 403, origin
        assert r.json() == {"detail": "cross-site request refused"}
    assert behind_proxy.delete("/api/datasets/x", headers={"Referer": "https://evil.example/page"}).status_code == 403
    assert not (tmp_path / "data" / "refused").exists()
    # reads are not changes: a GET from anywhere still answers (the cookie decides, not the origin)
    assert behind_proxy.get("/api/datasets", headers={"Origin": "https://evil.example"}).status_code == 200


def test_without_the_setting_the_proxy_origin_is_refused(tmp_path):
    client = signed_in_client(tmp_path, {})
    try:
        r = client.post("/api/datasets", json={"name": "from_pod"}, headers={"Origin": POD})
        assert r.status_code == 403
        # the page served by this very host is same-origin, as before
        assert client.post("/api/datasets", json={"name": "same"}, headers={"Origin": "http://127.0.0.1:8675"}).status_code == 201
    finally:
        client.__exit__(None, None, None)


def test_requests_with_the_token_are_not_origin_checked(behind_proxy):
    bearer = TestClient(behind_proxy.app, base_url="http://127.0.0.1:8675",
                        headers={"Authorization": f"Bearer {TOKEN}", "Origin": "https://script.example"})
    assert bearer.post("/api/datasets", json={"name": "scripted"}).status_code == 201
