"""The UI's database: jobs and settings (SQLAlchemy 2; SQLite by default, any URL via
AITK_DATABASE_URL, e.g. postgresql+psycopg://user@host/aitk).

The schema is created and migrated when a Store opens. Migration policy: new columns are added by
`_add_missing_columns` (they must be nullable or carry a server default, so old rows stay valid);
anything else (renames, data fixes) goes into MIGRATIONS under the version it brings the database
to. A database written by a newer version is refused rather than silently misread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Float,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

SCHEMA_VERSION = 1

# Job lifecycle in the store. "running"/"stopping" have a process; the run's own finer state
# (caching, training, sampling, saving...) is `run_state`, copied from its status.json.
IDLE, QUEUED, RUNNING, STOPPING, COMPLETED, STOPPED, ERROR = (
    "idle", "queued", "running", "stopping", "completed", "stopped", "error",
)
JOB_STATUSES = (IDLE, QUEUED, RUNNING, STOPPING, COMPLETED, STOPPED, ERROR)
ACTIVE = (RUNNING, STOPPING)
STARTABLE = (IDLE, COMPLETED, STOPPED, ERROR)


DELETED_HIGH_WATER = "deleted_job_id_high_water"  # settings row: the highest id a deleted job had


class StoreError(RuntimeError):
    pass


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    gpu_ids: Mapped[str] = mapped_column(String(64), default="")  # "0", "0,1"; "" = no GPU (CPU)
    config_yaml: Mapped[str] = mapped_column(Text)
    training_folder: Mapped[str] = mapped_column(Text)  # fixed at creation: the job's files stay findable
    status: Mapped[str] = mapped_column(String(16), default=IDLE, index=True)
    queue_position: Mapped[int | None] = mapped_column(Integer, nullable=True)
    run_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    speed: Mapped[float | None] = mapped_column(Float, nullable=True)
    eta_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The process's start time guards against PID reuse when a restarted worker adopts a job.
    pid_started: Mapped[float | None] = mapped_column(Float, nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)  # the message and the log's last lines
    # Why an error ended the run (aitk/trainer/failure.py): oom, nan, io, config, data, model, killed, internal
    reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    fix: Mapped[str | None] = mapped_column(Text, nullable=True)
    info: Mapped[str | None] = mapped_column(Text, nullable=True)
    stop_requested_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    stop_signaled_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Setting(Base):
    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class SchemaInfo(Base):
    __tablename__ = "schema_info"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


# version -> step that brings a database from version-1 to version (beyond added columns).
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the server read while the worker (maybe another process) writes; the busy timeout
    # makes a writer wait for the other instead of failing with "database is locked".
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _add_missing_columns(conn: Connection) -> list[str]:
    added = []
    inspector = inspect(conn)
    for table in Base.metadata.sorted_tables:
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            ddl_type = column.type.compile(dialect=conn.dialect)
            default = f" DEFAULT {column.server_default.arg}" if column.server_default is not None else ""
            conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {ddl_type}{default}'))
            added.append(f"{table.name}.{column.name}")
    return added


def migrate(engine: Engine) -> int:
    """Create missing tables and columns, run pending migrations; returns the schema version."""
    with engine.begin() as conn:
        fresh = not inspect(conn).has_table(SchemaInfo.__tablename__)
        Base.metadata.create_all(conn)
        _add_missing_columns(conn)
        row = conn.execute(select(SchemaInfo.version).where(SchemaInfo.id == 1)).scalar_one_or_none()
        if row is None:
            current = SCHEMA_VERSION if fresh else 0
            conn.execute(SchemaInfo.__table__.insert().values(id=1, version=current))
        else:
            current = row
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"the UI database is at schema version {current}, newer than this aitk ({SCHEMA_VERSION}); "
                "upgrade aitk or point AITK_DATABASE_URL at another database"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            step = MIGRATIONS.get(version)
            if step is not None:
                step(conn)
        if current != SCHEMA_VERSION:
            conn.execute(update(SchemaInfo).where(SchemaInfo.id == 1).values(version=SCHEMA_VERSION))
    return SCHEMA_VERSION


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        for attempt in range(5):
            try:
                self.version = migrate(self.engine)
                break
            except OperationalError:
                # `aitk ui` and `aitk worker` starting together both try to create the tables; the
                # loser sees "already exists" or a lock, and simply looks again.
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()

    # ---------------------------------------------------------------- jobs
    def list_jobs(self, statuses: Iterable[str] | None = None) -> list[Job]:
        query = select(Job).order_by(Job.id)
        if statuses is not None:
            query = query.where(Job.status.in_(list(statuses)))
        with self.session() as s:
            return list(s.scalars(query))

    def queued_jobs(self) -> list[Job]:
        query = select(Job).where(Job.status == QUEUED).order_by(Job.queue_position, Job.id)
        with self.session() as s:
            return list(s.scalars(query))

    def get_job(self, job_id: int) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def get_job_by_name(self, name: str) -> Job | None:
        with self.session() as s:
            return s.scalars(select(Job).where(Job.name == name)).first()

    def add_job(self, **fields: Any) -> Job:
        now = time.time()
        job = Job(created_at=now, updated_at=now, **fields)
        with self.session() as s:
            if self.engine.dialect.name == "sqlite":
                # SQLite gives a deleted last row's id to the next row: a page or a client still
                # following the deleted job would show the new one. Ids only go up.
                deleted = s.get(Setting, DELETED_HIGH_WATER)
                newest = s.execute(select(func.max(Job.id))).scalar() or 0
                if deleted is not None and int(deleted.value) >= newest:
                    job.id = int(deleted.value) + 1
            s.add(job)
        return job

    def update_job(self, job_id: int, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(**fields))

    def transition(self, job_id: int, from_statuses: Iterable[str], **fields: Any) -> bool:
        """Compare-and-set: apply `fields` only while the job's status is one of `from_statuses`.

        The API and the worker (maybe another process) change the same rows; a conditional UPDATE
        makes each change atomic without holding locks across them."""
        fields["updated_at"] = time.time()
        with self.session() as s:
            result = s.execute(
                update(Job).where(Job.id == job_id, Job.status.in_(list(from_statuses))).values(**fields)
            )
            return result.rowcount == 1

    def next_queue_position(self) -> int:
        with self.session() as s:
            top = s.execute(select(func.max(Job.queue_position))).scalar()
        return (top or 0) + 1

    def delete_job(self, job_id: int, allowed: Iterable[str]) -> bool:
        with self.session() as s:
            job = s.get(Job, job_id)
            if job is None or job.status not in set(allowed):
                return False
            s.delete(job)
            mark = s.get(Setting, DELETED_HIGH_WATER)
            if mark is None:
                s.add(Setting(key=DELETED_HIGH_WATER, value=str(job_id)))
            elif int(mark.value) < job_id:
                mark.value = str(job_id)
            return True

    # ---------------------------------------------------------------- settings
    def get_setting(self, key: str) -> str | None:
        with self.session() as s:
            row = s.get(Setting, key)
            return row.value if row else None

    def set_setting(self, key: str, value: str | None) -> None:
        with self.session() as s:
            row = s.get(Setting, key)
            if value is None:
                if row is not None:
                    s.delete(row)
            elif row is None:
                s.add(Setting(key=key, value=value))
            else:
                row.value = value

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table (tests compare snapshots to prove a request changed nothing)."""
        out = {}
        with self.engine.connect() as conn:
            for table in Base.metadata.sorted_tables:
                out[table.name] = [tuple(r) for r in conn.execute(table.select().order_by(*table.primary_key))]
        return out
