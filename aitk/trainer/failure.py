"""Why a run ended in error: one reason per kind of failure, with a message, a fix and an exit code.

Reasons (docs/outputs.md): oom, nan, io, config, data, model, killed, internal. The run writes the
reason into status.json and one paragraph into log.txt; `aitk run` exits with the reason's code; the
UI worker reads both and shows reason, message and fix. `killed` is never written by the run itself
(a killed process writes nothing): the worker gives it to a run whose process died of a signal.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

REASONS = ("oom", "nan", "io", "config", "data", "model", "killed", "internal")

EXIT_CODES = {"internal": 1, "config": 2, "data": 3, "model": 4, "nan": 5, "oom": 6, "io": 7}
KILLED_EXIT_CODES = (137, -9)  # a shell's / subprocess' view of SIGKILL (kill -9, the host's OOM killer)

# errno values that mean "the disk or the folder refuses the write", not a bug
IO_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG,
})

DEFAULT_FIXES = {
    "oom": "lower train.batch_size or the dataset resolution, turn on train.gradient_checkpointing, quantize "
           "the base model (model.quantize) or offload layers (model.layer_offloading); `aitk plan JOB "
           "--gpu-memory <size>` prints the cheapest settings that fit",
    "nan": "lower train.lr, set train.max_grad_norm (e.g. 1.0), train in bf16 or fp32 rather than fp16, or set "
           "train.nan_policy: rollback; starting the job again resumes from the last checkpoint",
    "io": "free space on that disk (or point training_folder at one with room) and make the folder writable, "
          "then start the same job again: it resumes from the last complete checkpoint",
    "config": "correct the job file (`aitk validate JOB` lists every problem before anything loads)",
    "data": "check the dataset folders in datasets[].folder_path (`aitk dataset inspect JOB` shows what is "
            "read), then start the job again",
    "model": "check model.name_or_path and the model's files (a download cut short or a damaged file: delete it "
             "and download again), then start the job again",
    "killed": "start the same job again: it resumes from the last complete checkpoint. If nobody stopped it, "
              "the machine may have run out of host memory (the kernel's OOM killer): see `aitk plan JOB` for "
              "the host memory the run needs",
    "internal": "this is a bug in aitk: the traceback is in log.txt; please report it with that log and the job file",
}


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str
    fix: str

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.reason, 1)

    def fields(self) -> dict[str, Any]:
        return {"reason": self.reason, "message": self.message, "fix": self.fix}


def _out_of_memory_types() -> tuple[type[BaseException], ...]:
    import sys

    found: list[type[BaseException]] = [MemoryError]
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "OutOfMemoryError"):
        found.append(torch.OutOfMemoryError)  # torch.cuda.OutOfMemoryError is the same class
    return tuple(found)


def _reason_of(exc: BaseException) -> str:
    from aitk.trainer.errors import TrainingAborted

    if isinstance(exc, TrainingAborted):
        return exc.reason
    if isinstance(exc, _out_of_memory_types()):
        return "oom"
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return "killed"
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "NonFiniteWeightsError" in names:
        return "nan"
    if names & {"JobFileError", "OptimizerConfigError", "SamplePromptError", "UnknownArchitectureError",
                "PlanInputError"}:
        return "config"
    if "DatasetError" in names:
        return "data"
    if names & {"ModelLoadError", "HubFileError", "SafetensorError"}:
        return "model"
    if isinstance(exc, FileNotFoundError):
        return "config"  # a path the job file names (the loaders name the key when they can)
    if isinstance(exc, OSError) and exc.errno in IO_ERRNOS:
        return "io"
    return "internal"


def _message_of(exc: BaseException, reason: str) -> str:
    text = str(exc).strip()
    if isinstance(exc, OSError) and reason == "io":
        what = errno.errorcode.get(exc.errno or 0, "")
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"a write failed{where}: {exc.strerror or text} ({what})".strip()
    if reason == "oom":
        head = "out of device memory" if type(exc).__name__ == "OutOfMemoryError" else "out of host memory"
        return f"{head} during the training step" + (f": {text.splitlines()[0]}" if text else "")
    if reason == "internal":
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text or type(exc).__name__


def classify(exc: BaseException, job_path: str | None = None) -> Failure:
    """The reason, message and fix of an exception that ends a run (`job_path` replaces the fix's JOB)."""
    reason = _reason_of(exc)
    fix = getattr(exc, "fix", None) or DEFAULT_FIXES[reason]
    if job_path:
        fix = fix.replace("JOB", job_path)
    return Failure(reason, _message_of(exc, reason), fix)


def reason_of_exit_code(code: int | None) -> str | None:
    """The reason an `aitk run` exit code stands for (the worker's view when status.json has none)."""
    if code is None:
        return None
    if code in KILLED_EXIT_CODES:
        return "killed"
    if code < 0:
        return "internal"  # another signal (SIGSEGV, SIGABRT): a crash
    return next((reason for reason, value in EXIT_CODES.items() if value == code), None)


def paragraph(failure: Failure, step: int, last_checkpoint: str | None) -> str:
    """The log's one paragraph about a failed run."""
    kept = (f"the last complete checkpoint is {last_checkpoint} (starting the job again resumes from it)"
            if last_checkpoint else "no checkpoint was written yet")
    return (f"error ({failure.reason}) at step {step}: {failure.message}\n"
            f"  fix: {failure.fix}\n  {kept}; exit code {failure.exit_code}")


DISK_WORDS = ("No space left", "Disk quota", "Read-only file system", "Permission denied", "Input/output error")


def disk_failure(exc: BaseException, what: str, folder: "Path") -> BaseException | None:
    """A TrainingAborted with reason io when `exc` is a refused write (full disk, quota, read-only
    or unwritable folder), whether it came as an OSError or inside another library's error; else None."""
    import shutil

    from aitk.trainer.errors import TrainingAborted

    text = str(exc)
    refused = (isinstance(exc, OSError) and exc.errno in IO_ERRNOS) or any(word in text for word in DISK_WORDS)
    if not refused:
        return None
    cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else text.splitlines()[0][:200]
    try:
        free = f"; {shutil.disk_usage(folder).free / 2**30:.2f} GiB free there"
    except OSError:
        free = ""
    return TrainingAborted(f"cannot write {what} in {folder}: {cause}{free}", reason="io")
