"""`aitk cloud modal JOB` and `aitk cloud modal-pull NAME` (docs/cloud.md).

Registered on aitk's parser by aitk/cli.py; nothing heavy (modal, torch) is imported until a
command runs. Bad input prints one `error:` block and returns 2 (no traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _modal_configured() -> bool:
    from modal.config import config

    return bool(config.get("token_id") and config.get("token_secret"))


def cmd_modal(args: argparse.Namespace) -> int:
    from aitk.cloud.job_rewrite import CloudJobError, rewrite_job
    from aitk.cloud.layout import MOUNT
    from aitk.cloud.modal_app import CloudSetupError, build_app, choose_secret, launch, plan_run, pull_command
    from aitk.config.loader import JobFileError

    try:
        job = rewrite_job(args.job)
        run = plan_run(job, gpu=args.gpu, timeout_hours=args.timeout, volume_name=args.volume,
                       secret=choose_secret(args.hf_secret, args.job))
    except (JobFileError, CloudJobError, CloudSetupError) as exc:
        _say(f"error: {exc}")
        return EXIT_BAD_INPUT
    for warning in job.warnings:
        _say(f"warning: {warning}")
    for change in job.training_folder_changes:
        _say(f"training_folder rewritten: {change.describe()}: the output goes to the Modal volume "
             f"{run.volume_name!r} (mounted at {MOUNT}); copy it home with `{pull_command(run)}`")
    for folder in job.folders:
        _say(f"dataset {folder.local} -> volume {run.volume_name!r}: {folder.remote} ({', '.join(folder.used_at)})")
    _say(run.secret.describe() if run.secret else
         "HF_TOKEN: none found here (HF_TOKEN, a .env next to the job, `hf auth login`) and no --hf-secret: "
         "gated models will not download")
    _say(f"modal: app {run.app_name!r}, GPU {run.gpu}, timeout {run.timeout_s / 3600:g} h")
    if args.dry_run:
        print(job.yaml, end="")
        return EXIT_OK
    if not _modal_configured():
        _say("error: Modal is not set up on this machine: run `modal setup` once (or set MODAL_TOKEN_ID and "
             "MODAL_TOKEN_SECRET)")
        return EXIT_BAD_INPUT
    from aitk.cloud.upload_plan import sync_folders

    built = build_app(run)
    sync_folders(built.volume, [(f.local, f.remote) for f in job.folders], force=args.reupload, log=_say)
    code = launch(run, built, detach=args.detach, log=_say)
    if code == EXIT_OK:
        _say(f"done; copy the results home with `{pull_command(run)}`")
    return code


def cmd_modal_pull(args: argparse.Namespace) -> int:
    import modal

    from aitk.cloud.pull import NothingToPull, pull_run

    if not _modal_configured():
        _say("error: Modal is not set up on this machine: run `modal setup` once")
        return EXIT_BAD_INPUT
    volume = modal.Volume.from_name(args.volume)
    try:
        pull_run(volume, args.name, Path(args.to), log=_say)
    except NothingToPull as exc:
        _say(f"error: {exc}")
        return EXIT_FAILED
    return EXIT_OK


def add_cloud_commands(subparsers: Any) -> None:
    """Add `cloud modal` and `cloud modal-pull` to `subparsers` (what `add_subparsers()` returned)."""
    from aitk.cloud.modal_app import DEFAULT_GPU, DEFAULT_VOLUME, GPUS

    cloud = subparsers.add_parser("cloud", help="train on a rented GPU: Modal (docs/cloud.md)")
    sub = cloud.add_subparsers(dest="cloud_command", required=True)

    modal = sub.add_parser(
        "modal", help="run a job file on Modal: datasets uploaded to a Modal volume (changed files only), the "
        "output kept there, the log streamed here")
    modal.add_argument("job", help="job file (YAML, JSON or JSONC); its training_folder and dataset folders are "
                       "rewritten to the volume, and each change is printed")
    modal.add_argument("--gpu", default=DEFAULT_GPU, choices=GPUS, help=f"GPU type (default {DEFAULT_GPU})")
    modal.add_argument("--timeout", type=float, default=6.0, metavar="HOURS",
                       help="stop the run after this many hours (default 6, at most 24)")
    modal.add_argument("--detach", action="store_true",
                       help="keep running on Modal when this command is stopped (Ctrl+C)")
    modal.add_argument("--volume", default=DEFAULT_VOLUME, help=f"Modal volume name (default {DEFAULT_VOLUME})")
    modal.add_argument("--hf-secret", metavar="NAME", help="Modal secret holding HF_TOKEN (default: the token "
                       "found here, HF_TOKEN or a .env next to the job, sent for this run)")
    modal.add_argument("--reupload", action="store_true", help="upload the dataset folders again in full")
    modal.add_argument("--dry-run", action="store_true",
                       help="print the changes and the rewritten job; contact nothing")
    modal.set_defaults(func=cmd_modal)

    pull = sub.add_parser("modal-pull", help="copy a run's folder (LoRA files, checkpoints, samples, metrics) "
                          "home from the Modal volume; only new or changed files")
    pull.add_argument("name", help="the job's config.name")
    pull.add_argument("--volume", default=DEFAULT_VOLUME, help=f"Modal volume name (default {DEFAULT_VOLUME})")
    pull.add_argument("--to", default="output", help="local folder; the run lands in <to>/<name> (default output)")
    pull.set_defaults(func=cmd_modal_pull)
