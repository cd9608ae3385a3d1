"""What runs in the Modal container: the rewritten job saved in the volume, `aitk run` on it, the
volume committed. Standard library only at import: the container imports this module to find the
function before anything else.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from aitk.cloud.layout import JOBS, in_container


def job_file_path(job_name: str) -> Path:
    return Path(in_container(JOBS)) / f"{job_name}.yaml"


def train(job_yaml: str, job_name: str, volume_name: str) -> int:
    """`aitk run` of the job; its exit code (0 done, 130 stopped, others: docs/reliability.md)."""
    job_file = job_file_path(job_name)
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job_file.write_text(job_yaml)  # in the volume: the job as run stays beside its output
    # A process of its own, as `aitk ui`'s worker runs jobs: its output streams to Modal's log as
    # it comes, and the GPU is released when it ends. aitk is on the path where the image put it.
    package_parent = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    print(f"aitk: running {job_file}", flush=True)
    try:
        return subprocess.call([sys.executable, "-m", "aitk", "run", str(job_file)], env=env)
    finally:
        # Modal commits volumes in the background and at exit too; committing here makes the last
        # checkpoint and LoRA files visible to `aitk cloud modal-pull` as soon as the call returns.
        import modal

        modal.Volume.from_name(volume_name).commit()
