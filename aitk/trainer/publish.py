"""The end of a completed run: `save.push_to_hub` uploads the final LoRA file(s), a model card and the
samples to the Hugging Face Hub.

`publish_run` never raises and never touches the run's files other than writing README.md (the
model card) into the output folder: a failed upload is one warning with the reason and the command
that retries it, and the run stays completed.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from aitk.config.schema import JobFile, ProcessConfig

if TYPE_CHECKING:
    from aitk.hub import CardInfo

__all__ = ["PublishResult", "publish_run", "publish_output_dir", "final_lora_files", "card_info"]

Log = Callable[[str], None]
SAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".mp4")
_SAMPLE_NAME = re.compile(r"^(\d{9})_(\d+)\.([A-Za-z0-9]+)$")
#: when a video preview is written as .mp4 and .webp, the card shows the first found of these
_SAMPLE_PREFERENCE = (".mp4", ".webp", ".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class PublishResult:
    state: Literal["skipped", "uploaded", "failed"]
    message: str
    repo_id: str | None = None
    url: str | None = None
    retry_command: str | None = None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def final_lora_files(output_dir: Path, name: str) -> list[Path]:
    """<name>.safetensors, or one <name>_<expert>.safetensors per expert (never the step files)."""
    pattern = re.compile(rf"^{re.escape(name)}(_[A-Za-z_]+)?\.safetensors$")
    return sorted(p for p in output_dir.glob("*.safetensors") if pattern.match(p.name))


def _final_samples(samples_dir: Path, prompts: Sequence[str]) -> list[tuple[str, str]]:
    """(path in repo, prompt) of the last step's previews, one per prompt index."""
    by_step: dict[int, dict[int, dict[str, str]]] = {}
    if samples_dir.is_dir():
        for p in samples_dir.iterdir():
            m = _SAMPLE_NAME.match(p.name)
            if m and p.is_file() and p.suffix.lower() in SAMPLE_SUFFIXES:
                by_step.setdefault(int(m.group(1)), {}).setdefault(int(m.group(2)), {})[p.suffix.lower()] = p.name
    if not by_step:
        return []
    out = []
    for index, kinds in sorted(by_step[max(by_step)].items()):
        name = next(kinds[s] for s in _SAMPLE_PREFERENCE if s in kinds)
        prompt = prompts[index] if index < len(prompts) else ""
        out.append((f"samples/{name}", prompt))
    return out


def _prompts(process: ProcessConfig) -> list[str]:
    if process.sample is None:
        return []
    try:
        from aitk.trainer.sampling import preview_requests

        return [r.prompt for r in preview_requests(process.sample, process.trigger_word)]
    except Exception:  # noqa: BLE001 - the card is still useful without the prompt texts
        return []


def _settings(process: ProcessConfig) -> list[tuple[str, str]]:
    train, net = process.train, process.network
    rows: list[tuple[str, str]] = [
        ("base model", process.model.name_or_path),
        ("architecture", process.model.resolved_arch),
    ]
    if net is not None:
        text = f"{net.type}, rank {net.linear_rank}, alpha {net.linear_alpha_value:g}"
        if net.conv_rank is not None:
            text += f"; conv rank {net.conv_rank}, alpha {net.conv_alpha_value:g}"
        rows.append(("network", text))
    accumulation = train.gradient_accumulation_steps or train.gradient_accumulation
    rows += [
        ("steps", str(train.steps)),
        ("batch size", f"{train.batch_size}" + (f" x {accumulation} accumulated" if accumulation > 1 else "")),
        ("learning rate", f"{train.unet_lr or train.lr:g}"),
        ("optimizer", str(train.optimizer)),
        ("lr scheduler", str(train.lr_scheduler)),
        ("training dtype", str(train.dtype)),
        ("resolution", ", ".join(dict.fromkeys(str(r) for d in process.datasets for r in d.resolutions))),
        ("saved as", f"{process.save.save_format}, {process.save.dtype}"),
    ]
    if train.noise_offset:
        rows.append(("noise offset", f"{train.noise_offset:g}"))
    if train.timestep_type:
        rows.append(("timestep type", str(train.timestep_type)))
    if process.trigger_word:
        rows.append(("trigger word", process.trigger_word))
    return rows


def _meta_text(meta: Mapping[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = meta.get(key)
        if value:
            return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return None


def card_info(
    job: JobFile, process: ProcessConfig, output_dir: Path, lora_files: Sequence[Path], repo_id: str | None = None
) -> "CardInfo":
    """The model card's content for this run."""
    from aitk.hub import CardInfo

    meta = dict(job.meta or {})
    tags = meta.get("tags")
    extra_tags = [str(t) for t in tags] if isinstance(tags, (list, tuple)) else ([str(tags)] if tags else [])
    return CardInfo(
        title=_meta_text(meta, "modelspec.title", "title") or job.config.name,
        base_model=process.model.name_or_path,
        architecture=process.model.resolved_arch,
        trigger_word=process.trigger_word,
        lora_files=[p.name for p in lora_files],
        samples=_final_samples(output_dir / "samples", _prompts(process)),
        settings=_settings(process),
        description=_meta_text(meta, "modelspec.description", "description"),
        license=_meta_text(meta, "modelspec.license", "license"),
        extra_tags=extra_tags,
        repo_id=repo_id,
    )


def _retry_command(output_dir: Path, job_path: Path | None) -> str:
    command = f"python -m aitk push {shlex.quote(str(output_dir))}"
    if job_path is not None:
        command += f" --job {shlex.quote(str(job_path))}"
    return command


def _default_repo_id(token: str, endpoint: str | None, name: str) -> str:
    """<the token's user>/<run name> when save.hf_repo_id is not set."""
    from huggingface_hub import HfApi

    from aitk.hub import HubUploadError

    try:
        user = HfApi(endpoint=endpoint, token=token).whoami()["name"]
    except Exception as exc:  # noqa: BLE001
        raise HubUploadError(
            f"save.hf_repo_id is not set and the token's user name could not be looked up ({type(exc).__name__}); "
            "set save.hf_repo_id: your-name/model-name"
        ) from None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "lora"
    return f"{user}/{slug}"


def publish_run(
    job: JobFile,
    process: ProcessConfig,
    *,
    output_dir: Path,
    lora_files: Sequence[Path],
    job_path: str | Path | None = None,
    log: Log | None = None,
    environ: Mapping[str, str] | None = None,
) -> PublishResult:
    """Upload a completed run when `save.push_to_hub` is on; otherwise do nothing ("skipped").

    `lora_files`: the final LoRA file(s) (one per expert for WAN 2.2). `job_path`: the job file, for
    a .env next to it. `log`: the run's log (messages, and one "warning: ..." line on failure).
    Call it in the main process only. Never raises; the result says what happened.
    """
    log = log or _stderr
    save = process.save
    if not save.push_to_hub:
        return PublishResult("skipped", "save.push_to_hub is off")
    output_dir = Path(output_dir)
    job_path = Path(job_path) if job_path is not None else None
    retry = _retry_command(output_dir, job_path)
    repo_id = save.hf_repo_id
    try:
        from aitk.fsutil import atomic_write_bytes
        from aitk.hub import HubUploadError, hub_endpoint, model_card, resolve_token, upload_files

        try:
            from huggingface_hub import constants as hf_constants

            # is_offline_mode() is newer than the HF_HUB_OFFLINE constant it reads
            offline = getattr(hf_constants, "is_offline_mode", lambda: hf_constants.HF_HUB_OFFLINE)()
            if offline:
                raise HubUploadError("HF_HUB_OFFLINE is set, so huggingface_hub makes no requests; unset it to upload")
            token, token_source = resolve_token(job_path, environ)
            if not token:
                raise HubUploadError(
                    "no Hugging Face token: set HF_TOKEN in the environment or in a .env file next to the job "
                    "file or in the working directory (HF_TOKEN=hf_...), or run `hf auth login`"
                )
            folders = [Path(p) for p in lora_files if Path(p).is_dir()]
            if folders:  # a full fine-tune saves diffusers folders; the card and upload are for LoRA files
                raise HubUploadError(
                    f"push_to_hub uploads LoRA files; the full fine-tune's model folder {folders[0]} is not "
                    f"uploaded (upload it with: hf upload <user>/<name> {shlex.quote(str(folders[0]))} .)"
                )
            missing = [str(p) for p in lora_files if not Path(p).is_file()]
            if not lora_files or missing:
                raise HubUploadError(f"the final LoRA file is missing: {', '.join(missing) or output_dir}")
            endpoint = hub_endpoint(environ)
            if not repo_id:
                repo_id = _default_repo_id(token, endpoint, job.config.name)
            # the card is written next to the LoRA first: it documents the run even if the upload fails
            readme = model_card(card_info(job, process, output_dir, lora_files, repo_id))
            atomic_write_bytes(output_dir / "README.md", readme.encode("utf-8"))
            files = [(Path(p), Path(p).name) for p in lora_files]
            samples = output_dir / "samples"
            if samples.is_dir():
                files += [
                    (p, f"samples/{p.name}") for p in sorted(samples.iterdir())
                    if p.is_file() and p.suffix.lower() in SAMPLE_SUFFIXES and not p.name.startswith(".")
                ]
            log(
                f"uploading {len(lora_files)} LoRA file(s), README.md and {len(files) - len(lora_files)} sample(s) "
                f"to the Hugging Face Hub: {repo_id} ({'private' if save.hf_private else 'public'}; "
                f"token from {token_source})"
            )
            url = upload_files(
                repo_id, files, readme=readme, private=save.hf_private, token=token, endpoint=endpoint,
                commit_message=f"{job.config.name}: LoRA, model card and samples (aitk)",
            )
        except HubUploadError as exc:
            reason = str(exc)
        else:
            log(f"uploaded to {url}")
            return PublishResult("uploaded", f"uploaded to {url}", repo_id, url)
    except Exception as exc:  # noqa: BLE001 - nothing in here may fail the completed run
        text = str(exc).strip()
        reason = f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no message'}"
    where = f" ({repo_id})" if repo_id else ""
    message = (
        f"warning: uploading to the Hugging Face Hub{where} failed: {reason}. The run is complete; its "
        f"files are in {output_dir}. Retry with: {retry}"
    )
    log(message)
    return PublishResult("failed", message, repo_id, None, retry)


def publish_output_dir(
    output_dir: Path,
    *,
    job_path: str | Path | None = None,
    repo_id: str | None = None,
    private: bool | None = None,
    log: Log | None = None,
    environ: Mapping[str, str] | None = None,
) -> PublishResult:
    """Upload a finished run again from its folder (config.yaml there is the job as run).

    Uploads even when the job had push_to_hub off: running this is the request. `repo_id` /
    `private` override save.hf_repo_id / hf_private.
    """
    log = log or _stderr
    output_dir = Path(output_dir)
    try:
        from aitk.config.loader import load_job_file

        # config.yaml, not the job file: it is the job as run (defaults, ${ENV} and [name] applied);
        # job_path only says where a .env may be
        loaded = load_job_file(output_dir / "config.yaml")
    except Exception as exc:  # noqa: BLE001
        message = f"error: cannot read {output_dir / 'config.yaml'} (the job as run): {exc}"
        log(message)
        return PublishResult("failed", message)
    job = loaded.job
    process = job.config.process[0]
    for candidate in job.config.process:
        if (Path(candidate.training_folder) / job.config.name).resolve() == output_dir.resolve():
            process = candidate
    updates: dict[str, Any] = {"push_to_hub": True}
    if repo_id:
        updates["hf_repo_id"] = repo_id
    if private is not None:
        updates["hf_private"] = private
    process = process.model_copy(update={"save": process.save.model_copy(update=updates)})
    return publish_run(
        job, process, output_dir=output_dir, lora_files=final_lora_files(output_dir, job.config.name),
        job_path=job_path, log=log, environ=environ,
    )
