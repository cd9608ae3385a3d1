"""Request safety: the token check (every route), names that become folders, paths that must stay
inside the configured folders, and what an upload may be.

Auth model: with AI_TOOLKIT_AUTH set, a request needs `Authorization: Bearer <token>` or the
session cookie set by POST /api/auth/login. The cookie holds an HMAC of the token (not the token),
is HttpOnly and SameSite=Strict; requests that change state and carry the cookie must also come
from the same origin when the browser says where they come from (Origin/Referer). Only the login
route and the login page itself are open.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE = "aitk_session"
OPEN_ROUTES = {("POST", "/api/auth/login"), ("GET", "/login")}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]", "testserver"}

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


class Refused(Exception):
    """A request input that is not allowed; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------ names


def check_name(name: str, what: str = "name") -> str:
    """A job or dataset name that is safe as a single folder name on every OS."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name or name.endswith("."):
        raise Refused(
            f"{what} {name!r} is not valid: use 1 to 100 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (no spaces, '/', '..'), e.g. my_lora_v1"
        )
    if name.split(".")[0].lower() in WINDOWS_RESERVED:
        raise Refused(f"{what} {name!r} is a reserved device name on Windows; pick another")
    return name


def clean_upload_name(filename: str) -> str:
    """An uploaded file's name made safe: base name only, odd characters replaced."""
    base = re.split(r"[\\/]", filename or "")[-1]
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:100] or "upload"
    ext = re.sub(r"[^A-Za-z0-9]", "", ext).lower()[:8]
    return f"{stem}.{ext}" if ext else stem


# ------------------------------------------------------------------------------------ paths


def _check_segment(segment: str) -> None:
    decoded = segment
    for _ in range(4):  # %252e%252e -> %2e%2e -> ..: decode until stable so no layer sneaks through
        again = unquote(decoded)
        if again == decoded:
            break
        decoded = again
    if segment != decoded:
        raise Refused(f"path part {segment!r} is percent-encoded; refused", 400)
    if decoded in {"", ".", ".."} or "\x00" in decoded or "\\" in decoded or "/" in decoded:
        raise Refused(f"path part {segment!r} is not allowed", 400)
    if re.match(r"^[A-Za-z]:", decoded):
        raise Refused(f"path part {segment!r} looks like a drive; refused", 400)


def safe_join(root: Path, relative: str | list[str]) -> Path:
    """`root/relative`, resolved (symlinks followed), guaranteed to stay inside `root`.

    Refuses absolute paths, '..', '.', empty and percent-encoded parts, backslashes, and anything
    (e.g. a symlink) that resolves outside `root`."""
    parts = relative.split("/") if isinstance(relative, str) else list(relative)
    if isinstance(relative, str) and (relative.startswith("/") or relative.startswith("\\")):
        raise Refused("absolute paths are not allowed", 400)
    for part in parts:
        _check_segment(part)
    base = root.resolve()
    try:
        target = base.joinpath(*parts).resolve()
    except (RuntimeError, OSError):  # a link that leads back to itself
        raise Refused("path is a link loop (it leads back to itself)", 404) from None
    if target != base and not target.is_relative_to(base):
        raise Refused("path leads outside the allowed folder", 403)
    return target


def inside(root: Path, path: Path) -> bool:
    """Whether `path` resolves (links followed) to `root` or below it; a link loop is not inside."""
    try:
        base = root.resolve()
        resolved = path.resolve()
    except (RuntimeError, OSError):
        return False
    return resolved == base or resolved.is_relative_to(base)


# ------------------------------------------------------------------------------------ uploads

IMAGE_EXTS = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp", "bmp": "bmp"}
VIDEO_EXTS = {"mp4": "mp4", "mov": "mp4", "m4v": "mp4", "webm": "matroska", "mkv": "matroska", "gif": "gif"}
_MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}


def sniff(head: bytes) -> str | None:
    """The container kind the first bytes say, independent of the file name."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM") and len(head) >= 14:
        return "bmp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if len(head) >= 8 and head[4:8] in _MP4_BOXES:
        return "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    return None


def media_kind(filename: str) -> str | None:
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    return None


def check_upload_head(filename: str, content_type: str | None, head: bytes) -> str:
    """'image' or 'video' when name, declared type and content agree; else Refused (415)."""
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    expected = IMAGE_EXTS.get(ext) or VIDEO_EXTS.get(ext)
    if expected is None:
        allowed = ", ".join(sorted(IMAGE_EXTS) + sorted(VIDEO_EXTS))
        raise Refused(f"{filename}: only images and videos can be uploaded ({allowed})", 415)
    kind = "image" if ext in IMAGE_EXTS else "video"
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared and declared != "application/octet-stream" and not declared.startswith(f"{kind}/"):
        raise Refused(f"{filename}: declared as {declared!r}, which is not an {kind} type", 415)
    found = sniff(head)
    if found != expected:
        what = f"looks like {found}" if found else "is not a recognised image or video file"
        raise Refused(f"{filename}: the content {what}, not the .{ext} its name says", 415)
    return kind


# ------------------------------------------------------------------------------------ auth


def session_value(token: str) -> str:
    """The cookie's value: derived from the token so the cookie never carries the token itself."""
    return hmac.new(token.encode(), b"aitk-ui-session-v1", hashlib.sha256).hexdigest()


def token_ok(token: str | None, given: str | None) -> bool:
    if not token or given is None:
        return False
    return hmac.compare_digest(token.encode(), given.encode())


def cookie_ok(token: str | None, cookie: str | None) -> bool:
    if not token or cookie is None:
        return False
    return hmac.compare_digest(session_value(token).encode(), cookie.encode())


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>AI Toolkit: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font-family:system-ui,sans-serif;background:#111;color:#eee;display:grid;place-items:center;height:100vh;margin:0}
form{background:#222;padding:2rem;border-radius:8px;min-width:18rem}input,button{font:inherit;padding:.5rem;width:100%;
box-sizing:border-box;margin-top:.5rem}p.e{color:#f77;min-height:1.2em}</style></head>
<body><form id="f"><h1>AI Toolkit</h1><label for="t">Access token (AI_TOOLKIT_AUTH)</label>
<input id="t" type="password" autocomplete="current-password" autofocus><button type="submit">Sign in</button>
<p class="e" id="e"></p></form>
<script>
document.getElementById("f").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const r = await fetch("/api/auth/login", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({token: document.getElementById("t").value})});
  if (r.ok) {
    // back to the page asked for: `next` only when it is a path of this site (not //host or /\\host),
    // else the page this sign-in page was served for
    const next = new URLSearchParams(location.search).get("next") || "";
    const local = next[0] === "/" && next[1] !== "/" && next.charCodeAt(1) !== 92;
    location.href = local ? next : (location.pathname === "/login" ? "/" : location.pathname + location.search);
  }
  else { document.getElementById("e").textContent = "Wrong token."; }
});
</script></body></html>
"""


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def _cookie(scope: Scope, name: str) -> str | None:
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    for part in raw.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def _host_name(host: str) -> str:
    """The name part of a Host header: "[::1]:8675" -> "[::1]", "localhost:8675" -> "localhost"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host


def _same_origin(scope: Scope, allowed: tuple[str, ...] = ()) -> bool:
    """False only when the browser names another origin than the Host it sent to (CSRF), unless
    that origin is explicitly allowed."""
    source = _header(scope, b"origin") or _header(scope, b"referer")
    if not source or source == "null":
        return source is None
    parts = urlsplit(source)
    if f"{parts.scheme}://{parts.netloc}".lower() in allowed:
        return True
    host = _header(scope, b"host") or ""
    return parts.netloc.lower() == host.lower()


class SecurityMiddleware:
    """Pure ASGI, so it sits in front of everything: API, files, static app, 404s and 405s."""

    def __init__(self, app: ASGIApp, token: str | None, loopback_only: bool = False,
                 allowed_origins: tuple[str, ...] = ()) -> None:
        self.app = app
        self.token = token or None
        self.loopback_only = loopback_only
        self.allowed_origins = tuple(o.lower() for o in allowed_origins)

    async def _send_json(self, send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] = ()) -> None:
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        path = scope.get("path", "")
        if self.loopback_only:
            # Without a token the server listens on localhost only; refusing other Host names also
            # stops DNS-rebinding pages from reaching it through the user's browser.
            host = _host_name(_header(scope, b"host") or "")
            if host not in LOOPBACK_HOSTS:
                await self._send_json(send, 403, f"host {host!r} refused: this server only answers on localhost")
                return
        via_cookie = False
        if self.token and (method, path) not in OPEN_ROUTES:
            auth = _header(scope, b"authorization") or ""
            scheme, _, given = auth.partition(" ")
            if scheme.lower() == "bearer" and token_ok(self.token, given.strip()):
                pass
            elif cookie_ok(self.token, _cookie(scope, COOKIE)):
                via_cookie = True
            else:
                await self._refuse(scope, send, method, path)
                return
        else:
            via_cookie = True  # no token: the browser's own requests are what CSRF abuses
        if method not in SAFE_METHODS and via_cookie and not _same_origin(scope, self.allowed_origins):
            await self._send_json(send, 403, "cross-site request refused")
            return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, send: Send, method: str, path: str) -> None:
        accept = _header(scope, b"accept") or ""
        if method == "GET" and not path.startswith("/api/") and "text/html" in accept:
            body = LOGIN_PAGE.encode()
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="aitk"'),
            ]})
            await send({"type": "http.response.body", "body": body})
            return
        await self._send_json(send, 401, "authentication required: send Authorization: Bearer <AI_TOOLKIT_AUTH> "
                              "or sign in at /login", [(b"www-authenticate", b'Bearer realm="aitk"')])
