"""The web UI's back end: a FastAPI server (JSON API + the single-page app in ui/dist), a SQLite
(or PostgreSQL) store of jobs and settings, and a worker that runs queued jobs as `aitk run`
processes. See docs/ui.md."""
