"""`aitk cloud modal`: the job file rewritten for the volume (and the user told), the Modal app built
from it (GPU, volume at /workspace holding the training folder, secret, image steps), the dataset
upload (changed files only, against a manifest in the volume) and `modal-pull`. Modal objects are
built for real; nothing contacts Modal: the volume is a folder-backed stand-in with modal.Volume's
methods."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import modal
import pytest
import yaml

from aitk.cli import main
from aitk.cloud import remote
from aitk.cloud.job_rewrite import CloudJobError, folder_key, rewrite_job
from aitk.cloud.layout import MOUNT
from aitk.cloud.modal_app import (
    TORCH_CUDA_INDEX,
    CloudSetupError,
    ImageStep,
    build_app,
    choose_secret,
    plan_run,
    requirements_file,
)
from aitk.cloud.pull import NothingToPull, pull_run
from aitk.cloud.upload_plan import manifest_path, parse_manifest, plan_upload, sync_folders
from aitk.config.loader import parse_job_text

ROOT = Path(__file__).resolve().parent.parent


def write_job(tmp_path: Path, training_folder: str = "/home/someone/lora_runs", **dataset: object) -> Path:
    images = tmp_path / "my images"
    images.mkdir(exist_ok=True)
    for i in range(3):
        (images / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes([i]) * (100 + i))
        (images / f"{i}.txt").write_text(f"a photo {i}")
    process: dict[str, object] = {
        "type": "sd_trainer",
        "network": {"type": "lora", "linear": 4},
        "model": {"name_or_path": "some-org/some-model"},
        "train": {"steps": 10},
        "datasets": [{"folder_path": str(images), **dataset}],
        "training_folder": training_folder,
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"job": "extension", "config": {"name": "cat_lora", "process": [process]}}))
    return job


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------ the job file


def test_training_folder_outside_the_volume_is_rewritten_and_the_user_told(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    job = write_job(tmp_path, training_folder="/home/someone/lora_runs")
    code, out, err = run_cli(["cloud", "modal", str(job), "--dry-run"], capsys)
    assert code == 0, err
    assert ("training_folder rewritten: config.process[0].training_folder: '/home/someone/lora_runs' -> "
            "'/workspace/output': the output goes to the Modal volume 'aitk'") in err
    assert "aitk cloud modal-pull cat_lora" in err
    rewritten = parse_job_text(out).job.config.process[0]  # the printed job is the one sent, and valid
    assert rewritten.training_folder == "/workspace/output"
    assert rewritten.datasets[0].folder_path == f"/workspace/datasets/{folder_key((tmp_path / 'my images').resolve())}"


def test_a_relative_training_folder_is_told_too_and_one_already_in_the_volume_is_not(tmp_path):
    relative = rewrite_job(write_job(tmp_path, training_folder="output"))
    assert [c.describe() for c in relative.training_folder_changes] == [
        "config.process[0].training_folder: 'output' -> '/workspace/output'"]
    inside = rewrite_job(write_job(tmp_path, training_folder="/workspace/output"))
    assert inside.training_folder_changes == []
    assert yaml.safe_load(inside.yaml)["config"]["process"][0]["training_folder"] == "/workspace/output"


def test_dataset_folders_become_their_copies_in_the_volume(tmp_path, monkeypatch):
    control = tmp_path / "controls"
    control.mkdir()
    masks = tmp_path / "masks"
    masks.mkdir()
    monkeypatch.chdir(tmp_path)  # relative paths mean what they mean to `aitk run` started here
    job = rewrite_job(write_job(tmp_path, control_path=["controls", str(control)], mask_path="masks"))
    dataset = yaml.safe_load(job.yaml)["config"]["process"][0]["datasets"][0]
    images = (tmp_path / "my images").resolve()
    assert [(f.local, f.remote, f.used_at) for f in job.folders] == [
        (images, f"datasets/{folder_key(images)}", ["config.process[0].datasets[0].folder_path"]),
        (control.resolve(), f"datasets/{folder_key(control.resolve())}",
         ["config.process[0].datasets[0].control_path[0]", "config.process[0].datasets[0].control_path[1]"]),
        (masks.resolve(), f"datasets/{folder_key(masks.resolve())}", ["config.process[0].datasets[0].mask_path"]),
    ]
    assert dataset["folder_path"] == f"/workspace/datasets/{folder_key(images)}"
    assert dataset["control_path"] == [f"/workspace/datasets/{folder_key(control.resolve())}"] * 2
    assert folder_key(images).startswith("my_images-")  # readable in Modal's dashboard, unique by path
    assert folder_key(Path("/a/images")) != folder_key(Path("/b/images"))


def test_a_missing_dataset_folder_stops_before_anything_is_sent(tmp_path, capsys):
    job = write_job(tmp_path, control_path="/nowhere/controls")
    with pytest.raises(CloudJobError, match="control_path: folder '/nowhere/controls' does not exist"):
        rewrite_job(job)
    code, _, err = run_cli(["cloud", "modal", str(job), "--dry-run"], capsys)
    assert code == 2 and "does not exist on this machine" in err


def test_local_model_paths_are_warned_about(tmp_path):
    job = write_job(tmp_path)
    model = tmp_path / "my_model"
    model.mkdir()
    data = yaml.safe_load(job.read_text())
    data["config"]["process"][0]["model"]["name_or_path"] = str(model)
    job.write_text(yaml.safe_dump(data))
    warnings = rewrite_job(job).warnings
    assert any("model.name_or_path" in w and "the remote run cannot read it" in w for w in warnings), warnings


def test_a_cpu_device_is_warned_about(tmp_path):
    job = write_job(tmp_path)
    assert not any(".device" in w for w in rewrite_job(job).warnings)
    data = yaml.safe_load(job.read_text())
    data["config"]["process"][0]["device"] = "cpu"
    job.write_text(yaml.safe_dump(data))
    warnings = rewrite_job(job).warnings
    assert any("config.process[0].device: 'cpu'" in w and "GPU idle" in w for w in warnings), warnings


def test_environment_variables_are_substituted_here(tmp_path, monkeypatch):
    job = write_job(tmp_path)
    monkeypatch.setenv("AITK_TEST_STEPS", "77")
    job.write_text(job.read_text().replace("steps: 10", "steps: ${AITK_TEST_STEPS}"))
    assert yaml.safe_load(rewrite_job(job).yaml)["config"]["process"][0]["train"]["steps"] == 77


# ------------------------------------------------------------------------------- the Modal app


def test_the_app_has_the_gpu_the_volume_at_the_training_folder_and_the_secret(tmp_path):
    job = rewrite_job(write_job(tmp_path))
    secret = choose_secret(None, None, environ={"HF_TOKEN": "hf_local_token"})
    run = plan_run(job, gpu="H100", timeout_hours=2.5, secret=secret)
    built = build_app(run)
    spec = built.function._spec_  # what Modal will ask for when the app runs
    assert spec.gpus == "H100"
    assert list(spec.volumes) == [str(MOUNT)] and spec.volumes[str(MOUNT)].name == built.volume.name == "aitk"
    training_folder = PurePosixPath(yaml.safe_load(job.yaml)["config"]["process"][0]["training_folder"])
    assert training_folder.is_relative_to(MOUNT)  # the output lands in the volume
    assert built.options["timeout"] == 9000 and built.options["gpu"] == "H100"
    assert [repr(s) for s in spec.secrets] == ["Secret.from_dict([HF_TOKEN])"]
    assert secret.kind == "local" and secret.token == "hf_local_token"
    assert "hf_local_token" not in repr(secret)  # never printed
    assert isinstance(built.image, modal.Image) and built.options["image"] is built.image


def test_a_named_modal_secret_and_other_choices(tmp_path):
    job = rewrite_job(write_job(tmp_path))
    run = plan_run(job, gpu="L40S", volume_name="my-vol", secret=choose_secret("huggingface", None, environ={}))
    built = build_app(run)
    spec = built.function._spec_
    assert spec.gpus == "L40S" and built.volume.name == "my-vol"
    assert [s.name for s in spec.secrets] == ["huggingface"]
    assert choose_secret(None, None, environ={}) is None  # no token anywhere: no secret
    assert run.app_name == "aitk-cat_lora"
    with pytest.raises(CloudSetupError, match="at most 24"):
        plan_run(job, timeout_hours=30)
    with pytest.raises(CloudSetupError, match="is not one of"):
        plan_run(job, gpu="T4")


def test_the_image_installs_the_pinned_requirements_with_cuda_torch(tmp_path):
    run = plan_run(rewrite_job(write_job(tmp_path)))
    steps = {step.method: step for step in run.image}
    requirements = requirements_file()
    assert run.image[0] == ImageStep("debian_slim", kwargs={"python_version": "3.11"})
    torch_line = next(line for line in requirements.read_text().splitlines() if line.startswith("torch=="))
    assert steps["pip_install"].args == (torch_line,) and steps["pip_install"].kwargs == {"index_url": TORCH_CUDA_INDEX}
    assert steps["pip_install_from_requirements"].args == (str(requirements),)
    methods = [step.method for step in run.image]
    assert methods.index("pip_install") < methods.index("pip_install_from_requirements")  # CUDA torch first
    assert "bitsandbytes==0.50.2 torchao==0.18.0" in steps["run_commands"].args[0]
    assert steps["env"].args[0]["HF_HOME"] == "/workspace/hf-cache"  # downloads kept in the volume
    assert methods[-1] == "add_local_python_source" and steps["add_local_python_source"].args == ("aitk",)
    # package data (the plan's configs) is not ignored: only caches are
    assert steps["add_local_python_source"].kwargs["ignore"] == ["**/__pycache__", "**/*.pyc"]


def test_starting_aitk_does_not_import_modal():
    code = "import sys, aitk.cli; aitk.cli.build_parser(); print('modal' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_without_modal_credentials_nothing_is_sent(tmp_path):
    job = write_job(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env.update(HOME=str(tmp_path), MODAL_CONFIG_PATH=str(tmp_path / "none.toml"))
    result = subprocess.run([sys.executable, "-m", "aitk", "cloud", "modal", str(job)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "run `modal setup` once" in result.stderr


# ------------------------------------------------------------------ the volume (a stand-in)


class FolderVolume:
    """modal.Volume's upload / download methods on a local folder (the volume's root)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uploads: list[str] = []
        self.removed: list[str] = []

    def read_file(self, path: str) -> Iterator[bytes]:
        data = (self.root / path).read_bytes()  # FileNotFoundError like modal's NotFoundError
        yield data[: len(data) // 2]
        yield data[len(data) // 2:]

    def remove_file(self, path: str, recursive: bool = False) -> None:
        target = self.root / path
        if target.is_dir():
            assert recursive
            import shutil

            shutil.rmtree(target)
        else:
            target.unlink()
        self.removed.append(path)

    @contextlib.contextmanager
    def batch_upload(self, force: bool = False) -> Iterator[FolderVolume]:
        assert force  # files sent again replace the old ones
        yield self

    def put_file(self, local: Path | io.BytesIO, remote_path: str) -> None:
        target = self.root / remote_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(local.getvalue() if isinstance(local, io.BytesIO) else Path(local).read_bytes())
        self.uploads.append(remote_path)

    def listdir(self, path: str, *, recursive: bool = False) -> list[modal.volume.FileEntry]:
        folder = self.root / path
        if not folder.is_dir():
            raise FileNotFoundError(path)
        found = []
        for item in sorted(folder.rglob("*") if recursive else folder.iterdir()):
            stat = item.stat()
            kind = modal.volume.FileEntryType.FILE if item.is_file() else modal.volume.FileEntryType.DIRECTORY
            found.append(modal.volume.FileEntry(path=item.relative_to(self.root).as_posix(), type=kind,
                                                mtime=int(stat.st_mtime), size=stat.st_size))
        return found


def remote_files(volume: FolderVolume, remote: str) -> dict[str, bytes]:
    folder = volume.root / remote
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and "_latent_cache" not in p.parts and not p.name.startswith(".")}


def test_datasets_upload_only_what_changed(tmp_path):
    job = rewrite_job(write_job(tmp_path))
    (folder,) = job.folders
    (folder.local / "_latent_cache").mkdir()
    (folder.local / "_latent_cache" / "x.safetensors").write_bytes(b"cache")
    (folder.local / ".DS_Store").write_bytes(b"junk")
    volume = FolderVolume(tmp_path / "volume")
    plans = sync_folders(volume, [(folder.local, folder.remote)])
    assert sorted(plans[0].upload) == ["0.png", "0.txt", "1.png", "1.txt", "2.png", "2.txt"]
    assert remote_files(volume, folder.remote) == local_files(folder.local)
    assert set(parse_manifest((volume.root / manifest_path(folder.remote)).read_bytes())) == set(plans[0].upload)
    assert volume.uploads[-1] == manifest_path(folder.remote)  # the manifest last

    volume.uploads.clear()
    (again,) = sync_folders(volume, [(folder.local, folder.remote)])
    assert again.upload == [] and again.delete == [] and again.unchanged == 6 and volume.uploads == []

    (folder.local / "1.txt").write_text("a better caption")
    os.utime(folder.local / "1.txt", ns=(1, 1_000_000_000))
    (folder.local / "2.png").unlink()
    (folder.local / "2.txt").unlink()
    (folder.local / "3.png").write_bytes(b"new image")
    (changed,) = sync_folders(volume, [(folder.local, folder.remote)])
    assert sorted(changed.upload) == ["1.txt", "3.png"] and changed.delete == ["2.png", "2.txt"]
    assert remote_files(volume, folder.remote) == local_files(folder.local)

    # removed from the volume by hand (`modal volume rm`): the listing shows it, it is sent again;
    # a file put there by hand is not in the folder here, so it goes
    (volume.root / folder.remote / "0.png").unlink()
    (volume.root / folder.remote / "stray.png").write_bytes(b"x")
    (repaired,) = sync_folders(volume, [(folder.local, folder.remote)])
    assert repaired.upload == ["0.png"] and repaired.delete == ["stray.png"]
    assert remote_files(volume, folder.remote) == local_files(folder.local)

    (forced,) = sync_folders(volume, [(folder.local, folder.remote)], force=True)
    assert forced.replace and sorted(forced.upload) == sorted(local_files(folder.local))
    assert volume.removed[-1] == folder.remote
    assert remote_files(volume, folder.remote) == local_files(folder.local)


def test_the_upload_plan_reads_size_and_mtime(tmp_path):
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.png").write_bytes(b"12345")
    stat = (folder / "sub" / "a.png").stat()
    same = plan_upload(folder, "datasets/d-1", {"sub/a.png": (5, stat.st_mtime_ns)})
    assert same.upload == [] and same.unchanged == 1
    touched = plan_upload(folder, "datasets/d-1", {"sub/a.png": (5, stat.st_mtime_ns - 1)})
    assert touched.upload == ["sub/a.png"] and touched.upload_bytes == 5
    assert parse_manifest(b"not json") == {} and parse_manifest(b'{"version": 0, "files": {}}') == {}


def test_pull_copies_the_run_home_and_only_new_files_again(tmp_path):
    volume = FolderVolume(tmp_path / "volume")
    run = volume.root / "output" / "cat_lora"
    (run / "samples").mkdir(parents=True)
    (run / "cat_lora.safetensors").write_bytes(b"lora" * 1000)
    (run / "samples" / "0_0.jpg").write_bytes(b"jpeg")
    (volume.root / "output" / "other_run").mkdir()
    (volume.root / "output" / "other_run" / "x.txt").write_text("not this one")
    dest = tmp_path / "home_output"
    first = pull_run(volume, "cat_lora", dest)
    assert sorted(first.downloaded) == ["cat_lora.safetensors", "samples/0_0.jpg"]
    assert local_files(dest / "cat_lora") == local_files(run) and not (dest / "other_run").exists()
    assert not list(dest.rglob("*.partial"))

    (run / "cat_lora_000000250.safetensors").write_bytes(b"step 250")
    second = pull_run(volume, "cat_lora", dest)
    assert second.downloaded == ["cat_lora_000000250.safetensors"] and second.skipped == 2
    with pytest.raises(NothingToPull, match="no run 'nope'"):
        pull_run(volume, "nope", dest)
    with pytest.raises(NothingToPull, match="not a run name"):
        pull_run(volume, "../output", dest)


# ----------------------------------------------------------------------- in the container


def test_the_remote_function_runs_the_job_and_commits_the_volume(tmp_path, monkeypatch):
    calls: list[tuple[list[str], dict[str, str]]] = []
    commits: list[str] = []

    class FakeVolume:
        def __init__(self, name: str) -> None:
            self.name = name

        def commit(self) -> None:
            commits.append(self.name)

    monkeypatch.setattr(remote, "job_file_path", lambda name: tmp_path / "jobs" / f"{name}.yaml")
    monkeypatch.setattr(remote.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 130)
    monkeypatch.setattr(modal.Volume, "from_name", staticmethod(lambda name, **_: FakeVolume(name)))
    job = rewrite_job(write_job(tmp_path))
    assert remote.train(job.yaml, job.name, "aitk") == 130  # aitk's exit code comes back
    (cmd, env), = calls
    assert cmd == [sys.executable, "-m", "aitk", "run", str(tmp_path / "jobs" / "cat_lora.yaml")]
    assert (tmp_path / "jobs" / "cat_lora.yaml").read_text() == job.yaml
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)  # where aitk's source sits
    assert commits == ["aitk"]  # committed even when the run did not complete
