"""The Modal app of one job: the image (aitk's pinned requirements with the CUDA build of torch),
the volume mounted at /workspace (training_folder /workspace/output is inside it), the Hugging
Face token as a secret, the GPU and the timeout.

What the app will be is first plain data (`ModalRun`, with the image as a list of `ImageStep`),
then turned into Modal objects by `build_app`: the tests check both without contacting Modal
(building Modal objects is local; they reach Modal's servers only when the app runs).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aitk.cloud.layout import HF_CACHE, MOUNT, in_container

if TYPE_CHECKING:  # the parser reads this module's constants at every `aitk` start: no job loader then
    from aitk.cloud.job_rewrite import RewrittenJob

#: PyTorch's CUDA wheels for the torch pinned in requirements.txt (docker/Dockerfile's default too;
#: the wheels bring their own CUDA libraries, so the host needs only a driver that runs CUDA 13.0)
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu130"
#: what `make install` puts in <venv>/extras (outside site-packages, aitk/extras.py says why)
EXTRAS = ("bitsandbytes==0.50.2", "torchao==0.18.0")
PYTHON_VERSION = "3.11"
GPUS = ("A100-80GB", "H100", "L40S", "H200", "B200", "A100-40GB")
DEFAULT_GPU = "A100-80GB"
MAX_TIMEOUT_HOURS = 24.0  # Modal's limit for one function call
DEFAULT_VOLUME = "aitk"
HF_SECRET_KEY = "HF_TOKEN"


class CloudSetupError(Exception):
    """Something to fix before anything is sent (one user-facing line)."""


@dataclass(frozen=True)
class ImageStep:
    """One call of modal.Image's builder: the first is a constructor (debian_slim), then methods."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SecretChoice:
    """Where HF_TOKEN comes from: a Modal secret by name, or a token found here (sent for this run)."""

    kind: str  # "modal" | "local"
    name: str  # the Modal secret's name, or where the local token was found
    token: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        if self.kind == "modal":
            return f"HF_TOKEN: from the Modal secret {self.name!r}"
        return f"HF_TOKEN: from {self.name}, sent to Modal as a secret of this run"


@dataclass(frozen=True)
class ModalRun:
    job: RewrittenJob
    gpu: str
    timeout_s: int
    volume_name: str
    app_name: str
    secret: SecretChoice | None
    image: tuple[ImageStep, ...]


def source_root() -> Path:
    """The checkout aitk runs from (requirements.txt lives there)."""
    return Path(__file__).resolve().parents[2]


def requirements_file(root: Path | None = None) -> Path:
    path = (root or source_root()) / "requirements.txt"
    if not path.is_file():
        raise CloudSetupError(f"{path} not found: `aitk cloud modal` builds its image from aitk's pinned "
                              "requirements, so run it from a source checkout (git clone ...; make install)")
    return path


def torch_pin(requirements: Path) -> str:
    """The `torch==X` line of requirements.txt: the CUDA image installs that version from TORCH_CUDA_INDEX."""
    for line in requirements.read_text().splitlines():
        if re.match(r"^torch==[\w.]+\s*$", line.strip()):
            return line.strip()
    raise CloudSetupError(f"{requirements} has no `torch==<version>` line; the image needs the pinned torch")


def image_recipe(requirements: Path) -> tuple[ImageStep, ...]:
    """The image's steps. Same software as `make install` and docker/Dockerfile, on Modal's Debian."""
    extras = " ".join(EXTRAS)
    return (
        ImageStep("debian_slim", kwargs={"python_version": PYTHON_VERSION}),
        # The CUDA build first; the requirements pin the same version, which it then satisfies
        # (pip keeps an installed 2.13.0+cu130 for torch==2.13.0).
        ImageStep("pip_install", (torch_pin(requirements),), {"index_url": TORCH_CUDA_INDEX}),
        ImageStep("pip_install_from_requirements", (str(requirements),)),
        ImageStep("run_commands", (
            f'python -m pip install --no-deps --target "$(python -c "import sys; print(sys.prefix)")/extras" {extras}',
        )),
        ImageStep("env", ({"HF_HOME": in_container(HF_CACHE), "PYTHONUNBUFFERED": "1"},)),
        # aitk's own code last, added when a container starts rather than built in: a code change
        # rebuilds no layer. Not only .py files: aitk/plan/configs/*.json is package data.
        ImageStep("add_local_python_source", ("aitk",), {"ignore": ["**/__pycache__", "**/*.pyc"]}),
    )


def choose_secret(hf_secret: str | None, job_path: str | Path | None,
                  environ: Mapping[str, str] | None = None) -> SecretChoice | None:
    """A named Modal secret when given; else the token this machine would use (HF_TOKEN, a .env next to
    the job, the stored `hf auth login`); else none (public models only)."""
    if hf_secret:
        return SecretChoice("modal", hf_secret)
    from aitk.hub import resolve_token

    token, source = resolve_token(job_path, environ)
    return SecretChoice("local", source, token) if token else None


def app_name(job_name: str) -> str:
    """Modal app names: letters, digits, '-', '_', '.'; at most 64 characters."""
    return ("aitk-" + re.sub(r"[^A-Za-z0-9._-]+", "-", job_name))[:64]


def plan_run(job: RewrittenJob, *, gpu: str = DEFAULT_GPU, timeout_hours: float = 6.0,
             volume_name: str = DEFAULT_VOLUME, secret: SecretChoice | None = None,
             requirements: Path | None = None) -> ModalRun:
    if gpu not in GPUS:
        raise CloudSetupError(f"--gpu {gpu!r} is not one of {', '.join(GPUS)}")
    if not 0 < timeout_hours <= MAX_TIMEOUT_HOURS:
        raise CloudSetupError(f"--timeout {timeout_hours:g} hours: give more than 0 and at most "
                              f"{MAX_TIMEOUT_HOURS:g} (Modal's limit for one call); a stopped run resumes when started again")
    return ModalRun(job=job, gpu=gpu, timeout_s=int(timeout_hours * 3600), volume_name=volume_name,
                    app_name=app_name(job.name), secret=secret,
                    image=image_recipe(requirements or requirements_file()))


@dataclass
class BuiltApp:
    """The Modal objects of a run (lazy: nothing has contacted Modal yet)."""

    app: Any
    function: Any
    image: Any
    volume: Any
    secrets: list[Any]
    options: dict[str, Any]
    """What app.function() was given (the timeout is not readable back from the function)."""


def build_image(steps: tuple[ImageStep, ...]) -> Any:
    import modal

    first, *rest = steps
    image = getattr(modal.Image, first.method)(*first.args, **first.kwargs)
    for step in rest:
        image = getattr(image, step.method)(*step.args, **step.kwargs)
    return image


def build_secrets(choice: SecretChoice | None) -> list[Any]:
    import modal

    if choice is None:
        return []
    if choice.kind == "modal":
        return [modal.Secret.from_name(choice.name, required_keys=[HF_SECRET_KEY])]
    return [modal.Secret.from_dict({HF_SECRET_KEY: choice.token})]


def build_app(run: ModalRun) -> BuiltApp:
    import modal

    from aitk.cloud import remote

    image = build_image(run.image)
    volume = modal.Volume.from_name(run.volume_name, create_if_missing=True)
    secrets = build_secrets(run.secret)
    app = modal.App(run.app_name, image=image)
    # serialized: the app is built here, per job, not at a module's top level; the function itself
    # is pickled by reference and imported from the aitk source added to the image.
    options: dict[str, Any] = {"image": image, "gpu": run.gpu, "timeout": run.timeout_s,
                               "volumes": {str(MOUNT): volume}, "secrets": secrets, "serialized": True, "name": "train"}
    function = app.function(**options)(remote.train)
    return BuiltApp(app=app, function=function, image=image, volume=volume, secrets=secrets, options=options)


def launch(run: ModalRun, built: BuiltApp, *, detach: bool, log: Callable[[str], None]) -> int:
    """Run the job on Modal, its output streamed here; the exit code of `aitk run` there."""
    import modal

    result: int | None = None
    with modal.enable_output(), built.app.run(detach=detach):
        result = int(built.function.remote(run.job.yaml, run.job.name, run.volume_name))
    if result is not None:
        return result
    # Ctrl+C: Modal's context ends quietly. Detached, the app goes on (Modal printed how to follow
    # it); otherwise Modal stops it, and starting the job again resumes from its last checkpoint.
    if detach:
        log(f"the run goes on on Modal; when it is done: {pull_command(run)}")
        return 0
    log("stopped: the Modal app was stopped; start the same job again to resume from its last checkpoint")
    return 130


def pull_command(run: ModalRun) -> str:
    volume = f" --volume {run.volume_name}" if run.volume_name != DEFAULT_VOLUME else ""
    return f"aitk cloud modal-pull {run.job.name}{volume}"
