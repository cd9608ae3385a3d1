"""Where things live on a rented GPU: one persistent folder, /workspace, holding the datasets, the
training output, the Hugging Face cache and (docker image) the web UI's data.

The docker image (docker/Dockerfile, the RunPod template) and the Modal volume use the same layout,
so a job file rewritten for one reads the same on the other. Paths in the Modal volume are relative
to its root ("output/<name>"); inside a container they sit under MOUNT ("/workspace/output/<name>").
"""

from __future__ import annotations

from pathlib import PurePosixPath

MOUNT = PurePosixPath("/workspace")
"""Where the volume is mounted in the container (RunPod's default volume mount path too)."""

OUTPUT = "output"
"""Every job's training_folder: the run writes <MOUNT>/output/<name>/."""
DATASETS = "datasets"
"""Uploaded dataset folders: <MOUNT>/datasets/<folder name>-<hash of its local path>/."""
MANIFESTS = "manifests"
"""What was uploaded of each dataset folder (size and mtime per file), to upload only changes."""
JOBS = "jobs"
"""The rewritten job files, as run."""
HF_CACHE = "hf-cache"
"""HF_HOME: models downloaded once per volume, not once per run."""
UI_HOME = "ui"
"""The web UI's --home (docker image only)."""


def in_container(relative: str) -> str:
    """The absolute path inside the container of a volume-relative path."""
    return str(MOUNT / relative)
