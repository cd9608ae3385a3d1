"""The worker: runs queued jobs as `aitk run` processes and follows them.

- Order: queued jobs start in queue order; a job waits while an earlier queued or a running job
  uses any of its GPUs (a CPU job counts as the GPU set {"cpu"}; a job without chosen GPUs may use
  any GPU), so each GPU set runs one job at a time, first come first served.
- Each job is its own process in its own session (start_new_session), with CUDA_VISIBLE_DEVICES
  set to the job's GPUs. A worker (or a UI) that stops or crashes leaves it running; the next
  worker adopts it (same PID and start time) or, if it is gone, settles its state from the exit
  code it can no longer see: status.json's final state when the run wrote one, else error with the
  last lines of its output. Nothing stays "running" for a process that does not exist.
- Stop: the API marks the job "stopping"; the worker sends SIGINT (the run finishes its step,
  saves a complete checkpoint, exits 130) and kills the process group only after the grace period.
- One worker per UI home: a lock file (flock) keeps a second one from starting the same jobs.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Callable

import psutil

from aitk.fsutil import atomic_write_bytes
from aitk.ui.files import read_status, tail_lines
from aitk.ui.settings import UISettings
from aitk.ui.store import ACTIVE, COMPLETED, ERROR, QUEUED, RUNNING, STOPPED, STOPPING, Job, Store

EXIT_STOPPED = (130, 143)  # SIGINT / SIGTERM after a clean stop (docs/outputs.md)
ERROR_LINES = 20
HEARTBEAT_S = 3.0
HF_TOKEN_KEY = "hf_token"


ANY_GPU = "*"


def gpu_set(gpu_ids: str) -> frozenset[str]:
    """The GPUs a job may use: "0,1" -> {"0", "1"}; "cpu" -> {"cpu"} (a set of its own, one CPU job
    at a time); "" (not chosen: every GPU stays visible, the trainer picks) -> any GPU."""
    ids = frozenset(part.strip() for part in (gpu_ids or "").split(",") if part.strip())
    return ids or frozenset({ANY_GPU})


def overlap(a: frozenset[str], b: frozenset[str]) -> bool:
    return bool(a & b) or ANY_GPU in a or ANY_GPU in b


def visible_devices(gpu_ids: str) -> str | None:
    """CUDA_VISIBLE_DEVICES for a job: its GPUs, "" (none) for a CPU job, None = leave as is."""
    if not gpu_ids:
        return None
    return "" if gpu_ids == "cpu" else gpu_ids


def run_dir_of(job: Job) -> Path:
    return Path(job.training_folder) / job.name


def job_files(settings: UISettings, job_id: int) -> Path:
    return settings.home / "jobs" / str(job_id)


def output_log(settings: UISettings, job_id: int) -> Path:
    """stdout and stderr of the job's process: holds what happens before log.txt exists (a bad
    job file, a missing dataset) and the final error line `aitk run` prints."""
    return job_files(settings, job_id) / "output.log"


class WorkerLock:
    """An exclusive flock on <home>/worker.lock, held while the worker lives."""

    def __init__(self, home: Path) -> None:
        self.path = home / "worker.lock"
        self._handle: IO[str] | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def process_alive(pid: int | None, started: float | None) -> bool:
    """True when `pid` runs and is the process we started (its start time matches: PIDs are reused)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if started is not None and abs(proc.create_time() - started) > 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return False


class Worker:
    def __init__(self, store: Store, settings: UISettings, log: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.settings = settings
        self.procs: dict[int, subprocess.Popen] = {}
        self.stop_event = threading.Event()
        self._last_heartbeat = 0.0
        self._last_running: list[int] = []
        self._log = log or (lambda message: print(message, file=sys.stderr, flush=True))

    def log(self, message: str) -> None:
        stamp = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S")
        self._log(f"{stamp} worker: {message}")

    # ------------------------------------------------------------------------- loop
    def run(self) -> None:
        try:
            self.reconcile()
        except Exception as exc:  # noqa: BLE001 - the first tick settles what reconcile could not
            self.log(f"error while reconciling ({type(exc).__name__}: {exc}); the ticks will retry")
        while not self.stop_event.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - one bad tick (e.g. a locked database) must not end the worker
                self.log(f"error in a tick ({type(exc).__name__}: {exc}); trying again")
            self.stop_event.wait(self.settings.poll_interval_s)

    def tick(self) -> None:
        for job in self.store.list_jobs(ACTIVE):
            self._follow(job)
        self._start_queued()
        self._heartbeat()

    def reconcile(self) -> None:
        """At start: every job the store calls running or stopping is adopted when its process is
        alive, and settled (completed / stopped / error) when it is gone."""
        for job in self.store.list_jobs(ACTIVE):
            if job.id in self.procs:
                continue
            if process_alive(job.pid, job.pid_started):
                self.log(f"adopted job {job.id} ({job.name}), pid {job.pid}, still running")
            self._follow(job)

    def _heartbeat(self) -> None:
        """<home>/worker.json, for the dashboard's "worker alive" (every HEARTBEAT_S, not every tick)."""
        now = time.time()
        running = sorted(self.procs)
        if now - self._last_heartbeat < HEARTBEAT_S and running == self._last_running:
            return
        self._last_heartbeat, self._last_running = now, running
        path = self.settings.home / "worker.json"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "updated": now, "running": running}))
        os.replace(tmp, path)  # no fsync: a heartbeat lost in a crash is exactly right

    # ------------------------------------------------------------------------- following
    def _exit_code(self, job: Job) -> tuple[bool, int | None]:
        """(alive, exit code when this worker is the parent and the process ended)."""
        proc = self.procs.get(job.id)
        if proc is not None and proc.pid == job.pid:
            code = proc.poll()
            if code is None:
                return True, None
            del self.procs[job.id]
            return False, code
        return process_alive(job.pid, job.pid_started), None

    def _follow(self, job: Job) -> None:
        alive, code = self._exit_code(job)
        run_dir = run_dir_of(job)
        status = read_status(run_dir)
        own = status if status and job.pid and status.get("pid") == job.pid else None
        progress: dict[str, Any] = {}
        if own is not None:
            progress = {
                "run_state": own.get("state"), "step": int(own.get("step") or 0),
                "total_steps": own.get("total_steps"), "speed": own.get("speed"), "eta_s": own.get("eta_s"),
            }
        if alive:
            progress.update(self._stop_if_asked(job))
            if progress:
                self.store.transition(job.id, ACTIVE, **progress)
            return
        self._settle(job, code, own, progress)

    def _stop_if_asked(self, job: Job) -> dict[str, Any]:
        if job.status != STOPPING:
            return {}
        now = time.time()
        if job.stop_signaled_at is None:
            self._signal(job, signal.SIGINT, group=False)
            self.log(f"job {job.id} ({job.name}): SIGINT sent; it saves a checkpoint and stops")
            return {"stop_signaled_at": now}
        if now - job.stop_signaled_at > self.settings.stop_grace_s:
            self._signal(job, signal.SIGKILL, group=True)
            self.log(f"job {job.id} ({job.name}): still running {self.settings.stop_grace_s:.0f} s after "
                     "SIGINT; killed")
            return {"info": f"killed {self.settings.stop_grace_s:.0f} s after the stop request; a resume "
                            "uses the last complete checkpoint"}
        return {}

    def _signal(self, job: Job, sig: signal.Signals, group: bool) -> None:
        if not process_alive(job.pid, job.pid_started):
            return
        try:
            if group:  # the job's own session: takes its data-loader workers along
                os.killpg(os.getpgid(job.pid), sig)
            else:  # the main process only: it tells its helpers itself
                os.kill(job.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _settle(self, job: Job, code: int | None, own: dict[str, Any] | None, progress: dict[str, Any]) -> None:
        state = own.get("state") if own else None
        if code is not None:
            final = COMPLETED if code == 0 else STOPPED if code in EXIT_STOPPED else ERROR
            if final == ERROR and job.status == STOPPING and code in (-signal.SIGKILL, -signal.SIGINT):
                final = STOPPED  # killed after the grace period: stopped, as asked, but not cleanly
        else:  # not our child: its exit code is lost, the run's own final state says what happened
            final = {"completed": COMPLETED, "stopped": STOPPED}.get(state or "", ERROR)
            if final == ERROR and job.status == STOPPING and job.stop_signaled_at is not None:
                final = STOPPED
        fields: dict[str, Any] = {
            **progress, "status": final, "exit_code": code, "finished_at": time.time(),
            "pid": None, "pid_started": None, "eta_s": None,
        }
        if final == ERROR:
            fields["error"] = self._error_text(job, code, own)
            fields.update(self._failure_fields(job, code, own))
        if self.store.transition(job.id, ACTIVE, **fields):
            self.log(f"job {job.id} ({job.name}) ended: {final}" + (f" (exit code {code})" if code is not None else ""))

    def _error_text(self, job: Job, code: int | None, own: dict[str, Any] | None) -> str:
        if not job.pid:
            head = "the worker stopped while starting this job; start it again"
        elif code is not None:
            head = f"the run exited with code {code}"
        else:
            head = "the run's process is gone without a final state (killed, out of memory, or the machine restarted)"
        if own and own.get("error"):
            head += f": {own['error']}"
        lines = tail_lines(output_log(self.settings, job.id), ERROR_LINES) or tail_lines(
            run_dir_of(job) / "log.txt", ERROR_LINES
        )
        lines = [line for line in lines if line.strip()]
        return head + ("\n" + "\n".join(lines) if lines else "")

    def _failure_fields(self, job: Job, code: int | None, own: dict[str, Any] | None) -> dict[str, Any]:
        """reason, message and fix of a job that ended in error: the run's own (status.json), else
        what the exit code and the output's last lines say (a job file refused before the run
        started, a process killed with no chance to write)."""
        from aitk.trainer.failure import DEFAULT_FIXES, reason_of_exit_code

        if own and own.get("state") == "error" and own.get("reason"):
            return {"reason": own["reason"], "message": own.get("message") or own.get("error"), "fix": own.get("fix")}
        if not job.pid:
            return {"reason": "internal", "message": "the worker stopped while starting this job",
                    "fix": "start it again"}
        reason = (reason_of_exit_code(code) if code is not None else "killed") or "internal"
        if reason == "killed":
            message = ("the run's process was killed (SIGKILL) without a chance to save" if code is not None else
                       "the run's process is gone without a final state (killed, or the machine restarted)")
        else:
            lines = [line for line in tail_lines(output_log(self.settings, job.id), 8) if line.strip()]
            message = "\n".join(lines[-4:]) or f"the run exited with code {code}"
        return {"reason": reason, "message": message, "fix": DEFAULT_FIXES[reason]}

    # ------------------------------------------------------------------------- starting
    def _start_queued(self) -> None:
        busy = [gpu_set(j.gpu_ids) for j in self.store.list_jobs(ACTIVE)]
        for job in self.store.queued_jobs():
            wanted = gpu_set(job.gpu_ids)
            if any(overlap(wanted, other) for other in busy):
                busy.append(wanted)  # later jobs that share a GPU with this one wait behind it
                continue
            busy.append(wanted)
            self._launch(job)

    def _launch(self, job: Job) -> None:
        now = time.time()
        claimed = self.store.transition(
            job.id, [QUEUED], status=RUNNING, run_state="starting", started_at=now, finished_at=None,
            exit_code=None, error=None, reason=None, message=None, fix=None, info=None, stop_requested_at=None, stop_signaled_at=None,
            pid=None, pid_started=None, speed=None, eta_s=None,
        )
        if not claimed:
            return  # stopped or deleted in the meantime
        folder = job_files(self.settings, job.id)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            job_file = folder / "job.yaml"
            atomic_write_bytes(job_file, job.config_yaml.encode("utf-8"))
            control = run_dir_of(job) / "control"
            for stale in ("save_now", "sample_now"):  # a request left from an earlier run is void
                (control / stale).unlink(missing_ok=True)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            devices = visible_devices(job.gpu_ids)
            if devices is not None:
                env["CUDA_VISIBLE_DEVICES"] = devices
            token = self.store.get_setting(HF_TOKEN_KEY)
            if token:
                env["HF_TOKEN"] = token
            with open(output_log(self.settings, job.id), "ab") as out:
                out.write(f"\n===== {datetime.now().astimezone().isoformat()} aitk run {job_file}\n".encode())
                out.flush()
                proc = subprocess.Popen(
                    [self.settings.python, "-m", "aitk", "run", str(job_file)],
                    cwd=self.settings.job_cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
            try:
                started = psutil.Process(proc.pid).create_time()
            except psutil.NoSuchProcess:
                started = None
        except Exception as exc:  # noqa: BLE001 - the job fails, the worker goes on
            self.store.transition(job.id, [RUNNING], status=ERROR, finished_at=time.time(),
                                  error=f"could not start the run: {type(exc).__name__}: {exc}")
            self.log(f"job {job.id} ({job.name}) could not start: {exc}")
            return
        self.procs[job.id] = proc
        self.store.update_job(job.id, pid=proc.pid, pid_started=started)
        where = "CPU" if job.gpu_ids == "cpu" else f"GPU {job.gpu_ids}" if job.gpu_ids else "the default devices"
        self.log(f"started job {job.id} ({job.name}) on {where}, pid {proc.pid}")


class WorkerThread:
    """The worker inside `aitk ui`: a daemon thread; when the server stops, jobs keep running."""

    def __init__(self, store: Store, settings: UISettings) -> None:
        self.lock = WorkerLock(settings.home)
        self.worker = Worker(store, settings)
        self.thread: threading.Thread | None = None

    def start(self) -> bool:
        if not self.lock.acquire():
            self.worker.log(f"another worker (pid {self.lock.holder()}) serves {self.worker.settings.home}; "
                            "not starting one here")
            return False
        self.thread = threading.Thread(target=self.worker.run, name="aitk-worker", daemon=True)
        self.thread.start()
        return True

    def stop(self) -> None:
        self.worker.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.lock.release()


def worker_status(settings: UISettings) -> dict[str, Any]:
    """For the dashboard: is a worker alive (its heartbeat file is fresh and its process exists)."""
    try:
        data = json.loads((settings.home / "worker.json").read_text())
    except (OSError, ValueError):
        return {"alive": False, "pid": None, "updated": None}
    fresh = time.time() - float(data.get("updated", 0)) < max(4 * HEARTBEAT_S, 5 * settings.poll_interval_s)
    pid = data.get("pid")
    return {"alive": bool(fresh and pid and psutil.pid_exists(pid)), "pid": pid, "updated": data.get("updated")}


def run_standalone(settings: UISettings) -> int:
    """`aitk worker`: the worker alone, in the foreground, until SIGINT/SIGTERM."""
    settings.ensure_folders()
    store = Store(settings.database_url)
    lock = WorkerLock(settings.home)
    if not lock.acquire():
        print(f"another worker (pid {lock.holder()}) already serves {settings.home}", file=sys.stderr)
        return 1
    worker = Worker(store, settings)

    def stop(signum: int, _frame: Any) -> None:
        worker.log(f"{signal.Signals(signum).name}: stopping; running jobs go on and the next worker adopts them")
        worker.stop_event.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    worker.log(f"serving {settings.home} (database {settings.database_url.split('://')[0]})")
    try:
        worker.run()
    finally:
        lock.release()
        store.close()
    return 0
