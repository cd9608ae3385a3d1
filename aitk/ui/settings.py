"""Where the UI keeps things and how it behaves; read from the environment (and `aitk ui` flags).

Folders for training output and datasets have defaults here; the settings page can change them,
and what it stores in the database wins over these defaults (see `Context.training_folder`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

DEFAULT_PORT = 8675
AUTH_ENV = "AI_TOOLKIT_AUTH"
DATABASE_ENV = "AITK_DATABASE_URL"


def _repo_ui_dist() -> Path:
    return Path(__file__).resolve().parents[2] / "ui" / "dist"


@dataclass(frozen=True)
class UISettings:
    home: Path
    """Database (SQLite), job files, process output, thumbnail cache, worker lock."""
    training_folder: Path
    datasets_folder: Path
    database_url: str
    auth_token: str | None = None
    max_upload_bytes: int = 2 << 30  # a video clip can be large; images are far below this
    stop_grace_s: float = 300.0  # SIGINT, then SIGKILL after this long (saving a big model takes a while)
    poll_interval_s: float = 1.0
    python: str = sys.executable
    job_cwd: Path = field(default_factory=Path.cwd)
    """Working folder of job processes: relative paths in a job file mean what they mean in a shell here."""
    ui_dist: Path = field(default_factory=_repo_ui_dist)
    allowed_origins: tuple[str, ...] = ()
    """Other origins whose pages may send changes (e.g. the Vite dev server, http://localhost:5173)."""

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        home: Path | None = None,
        training_folder: Path | None = None,
        datasets_folder: Path | None = None,
    ) -> "UISettings":
        env = os.environ if environ is None else environ
        cwd = Path.cwd()
        home = (home or Path(env.get("AITK_UI_HOME", cwd / ".aitk-ui"))).expanduser().absolute()
        url = env.get(DATABASE_ENV) or f"sqlite:///{home / 'aitk_ui.db'}"
        token = env.get(AUTH_ENV) or None
        settings = cls(
            home=home,
            training_folder=Path(training_folder or env.get("AITK_TRAINING_FOLDER", cwd / "output")).expanduser().absolute(),
            datasets_folder=Path(datasets_folder or env.get("AITK_DATASETS_FOLDER", cwd / "datasets")).expanduser().absolute(),
            database_url=url,
            auth_token=token,
        )
        if env.get("AITK_UI_DIST"):
            settings = replace(settings, ui_dist=Path(env["AITK_UI_DIST"]).expanduser().absolute())
        if env.get("AITK_UI_MAX_UPLOAD_MB"):
            settings = replace(settings, max_upload_bytes=int(float(env["AITK_UI_MAX_UPLOAD_MB"]) * (1 << 20)))
        if env.get("AITK_UI_ALLOWED_ORIGINS"):
            origins = tuple(o.strip().rstrip("/") for o in env["AITK_UI_ALLOWED_ORIGINS"].split(",") if o.strip())
            settings = replace(settings, allowed_origins=origins)
        if env.get("AITK_UI_STOP_GRACE_S"):
            settings = replace(settings, stop_grace_s=float(env["AITK_UI_STOP_GRACE_S"]))
        return settings

    def ensure_folders(self) -> None:
        for folder in (self.home, self.home / "jobs", self.home / "thumbs"):
            folder.mkdir(parents=True, exist_ok=True)
