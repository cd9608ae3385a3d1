"""`aitk ui`: the FastAPI app (JSON API under /api, the single-page app from ui/dist) and the
worker thread. `create_app(settings)` builds it; `serve()` is the command."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from aitk.ui import routes_caption, routes_datasets, routes_jobs, routes_misc, routes_models, routes_plan
from aitk.ui.context import Context
from aitk.ui.metrics_index import MetricsRegistry
from aitk.ui.security import LOGIN_PAGE, Refused, SecurityMiddleware, safe_join
from aitk.ui.settings import DEFAULT_PORT, UISettings
from aitk.ui.store import Store
from aitk.ui.worker import WorkerThread

PLACEHOLDER = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>AI Toolkit</title>
<style>body{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem;line-height:1.5}</style>
</head><body><h1>AI Toolkit</h1>
<p>The server is running, but the web app is not built yet (no <code>ui/dist/index.html</code>).
Build it with <code>make</code>, or drive the JSON API directly: see <a href="/api/docs">/api/docs</a>.</p>
</body></html>
"""
JSON_ERROR_PAGE_PREFIXES = ("/api/",)


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuses a request body over `limit` bytes with 413, by its Content-Length before reading,
    and by counting while reading (chunked uploads), so an oversize upload never fills the disk."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        slack = 1 << 20  # multipart boundaries and form fields around the files
        if declared is not None and declared.isdigit() and int(declared) > self.limit + slack:
            await _send_json(send, 413, f"request body over the upload limit of {self.limit} bytes")
            return
        seen = 0
        started = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit + slack:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _send_json(send, 413, f"request body over the upload limit of {self.limit} bytes")


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(settings: UISettings, *, start_worker: bool = False, loopback_only: bool = False) -> FastAPI:
    """The app. `start_worker`: run the worker in a thread while the app runs (as `aitk ui` does);
    `loopback_only`: answer only requests addressed to localhost (no token, default bind)."""
    settings.ensure_folders()
    store = Store(settings.database_url)
    context = Context(settings=settings, store=store, metrics=MetricsRegistry())
    worker = WorkerThread(store, settings) if start_worker else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if worker is not None:
            worker.start()
        try:
            yield
        finally:
            if worker is not None:
                worker.stop()  # running jobs go on in their own sessions; the next worker adopts them
            context.metrics.close()

    app = FastAPI(title="AI Toolkit", version="1", lifespan=lifespan, docs_url="/api/docs",
                  openapi_url="/api/openapi.json", redoc_url=None,
                  swagger_ui_oauth2_redirect_url=None)
    app.state.ctx = context
    app.state.worker = worker

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(problems), "problems": problems}, status_code=422)

    @app.get("/login", include_in_schema=False)
    def login_page() -> HTMLResponse:
        return HTMLResponse(LOGIN_PAGE)

    app.include_router(routes_misc.router)
    app.include_router(routes_jobs.router)
    app.include_router(routes_datasets.router)
    app.include_router(routes_plan.router)
    app.include_router(routes_caption.router)
    app.include_router(routes_models.router)

    @app.get("/{path:path}", include_in_schema=False)
    def spa(path: str) -> Any:
        """The single-page app: its files, and index.html for its own routes (/jobs/3, ...)."""
        if path.startswith("api/") or path == "api":
            raise HTTPException(404, f"no API route /{path}")
        dist = settings.ui_dist
        target = safe_join(dist, path) if path else dist  # refuses '..' and the like, built or not
        index = dist / "index.html"
        if not index.is_file():
            return HTMLResponse(PLACEHOLDER)
        if path:
            if target.is_file():
                return FileResponse(target)
            if "." in Path(path).name:
                raise HTTPException(404, f"no file /{path}")
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    # Starlette: the middleware added last is outermost; the token check runs before anything else.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes)
    app.add_middleware(SecurityMiddleware, token=settings.auth_token, loopback_only=loopback_only,
                       allowed_origins=settings.allowed_origins)
    return app


def route_table(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route the app answers, included routers flattened (tests walk it
    so that a new route cannot escape the auth and read-only checks)."""
    out: list[tuple[str, str]] = []

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            inner = getattr(route, "original_router", None)  # FastAPI's included router
            if inner is not None:
                context = getattr(route, "include_context", None)
                walk(list(inner.routes), prefix + (getattr(context, "prefix", "") or ""))
                continue
            path = getattr(route, "path", None)
            for method in sorted(getattr(route, "methods", None) or []):
                if path is not None and method != "HEAD":
                    out.append((method, prefix + path))

    walk(list(app.routes), "")
    return sorted(set(out))


LOOPBACK_BIND = ("127.0.0.1", "localhost", "::1")


class ExposedWithoutToken(Exception):
    """--host names an address other machines reach, and AI_TOOLKIT_AUTH is not set."""


def bind_address(settings: UISettings, host: str | None) -> tuple[str, list[str]]:
    """Where to listen, and what to tell the user about it. Raises ExposedWithoutToken for an
    address other machines reach without a token."""
    notes = []
    if host is None:
        if settings.auth_token:
            host = "0.0.0.0"
            notes.append("AI_TOOLKIT_AUTH is set: listening on all interfaces; every request needs the token")
        else:
            host = "127.0.0.1"
            notes.append("AI_TOOLKIT_AUTH is not set: listening on 127.0.0.1 only (this machine). To open it "
                         "to the network, set AI_TOOLKIT_AUTH=<a long random token> and pass --host 0.0.0.0")
    elif not settings.auth_token and host not in LOOPBACK_BIND:
        # Refused, not warned: in a container, on a rented GPU or behind a cloud proxy the port is
        # public, and a warning in a log nobody reads left the jobs API and every served file open.
        raise ExposedWithoutToken(
            f"refusing to listen on {host} without a token: anyone who reaches this port could run jobs and "
            "read your files. Set AI_TOOLKIT_AUTH to a long random token (e.g. export "
            "AI_TOOLKIT_AUTH=$(openssl rand -hex 24)); every request then needs it. Or leave out --host to "
            "listen on 127.0.0.1 only")
    return host, notes


def serve(settings: UISettings, host: str | None = None, port: int = DEFAULT_PORT, worker: bool = True) -> int:
    import uvicorn

    try:
        host, notes = bind_address(settings, host)
    except ExposedWithoutToken as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    loopback_only = not settings.auth_token and host in LOOPBACK_BIND
    for note in notes:
        print(note, file=sys.stderr)
    app = create_app(settings, start_worker=worker, loopback_only=loopback_only)
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host
    print(f"AI Toolkit UI: http://{shown}:{port}  (data: {settings.home})", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
