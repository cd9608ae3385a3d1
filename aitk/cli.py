"""`aitk` command line: run, validate, plan, dataset inspect, schedule replay, demo, ui, worker,
convert, merge, lora info, caption, cloud."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def cmd_run(args: argparse.Namespace) -> int:
    from aitk import startup_gc

    try:
        return _run_jobs(args)
    finally:
        startup_gc.restore()
        _close_process_group()


def _close_process_group() -> None:
    """Leave the process group cleanly when launched with torchrun / accelerate (else PyTorch
    warns, and a process exiting early can abort the others)."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run_jobs(args: argparse.Namespace) -> int:
    from aitk import startup_gc
    from aitk.config.caption import CaptionJobFile
    from aitk.config.loader import JobFileError, load_job_file
    from aitk.trainer.stop import StopController

    stop = StopController()
    for job_path in args.jobs:
        try:
            loaded = load_job_file(job_path, strict=args.strict, caption_ok=True)
        except JobFileError as exc:
            print(str(exc), file=sys.stderr)
            return EXIT_BAD_INPUT  # = the exit code of reason config (aitk.trainer.failure)
        if isinstance(loaded.job, CaptionJobFile):  # a caption job (aitk/config/caption.py)
            for warning in loaded.warnings:
                print(f"warning: {warning}", file=sys.stderr)
            from aitk.caption.command import run_caption_job

            code = run_caption_job(loaded)
            if code != EXIT_OK:
                return code
            continue
        from aitk.config.start_warnings import run_start_warnings

        logged_by_run = set(run_start_warnings(loaded.job))  # each run's log says these itself
        for warning in loaded.warnings:
            if warning not in logged_by_run:
                print(f"warning: {warning}", file=sys.stderr)
        for index, process in enumerate(loaded.job.config.process):
            startup_gc.pause()  # until the training loop starts (aitk/startup_gc.py)
            from aitk.trainer.loop import Trainer  # torch and the model libraries: after the job file is known good

            trainer = Trainer(loaded.job, process, stop=stop, job_path=Path(job_path))
            stop.install(announce=lambda message: print(message, file=sys.stderr))
            try:
                result = trainer.run()
            except BaseException as exc:  # noqa: BLE001 - the run wrote its reason; here: message and exit code
                from aitk.trainer.failure import classify

                failure = trainer.failure or classify(exc)
                if failure.reason == "killed":
                    raise
                log = Path(process.training_folder) / loaded.job.config.name / "log.txt"
                if args.debug and failure.reason == "internal":
                    print(traceback.format_exc(), file=sys.stderr)
                print(f"error in {job_path} (process {index}), reason {failure.reason}: {failure.message}\n"
                      f"fix: {failure.fix}", file=sys.stderr)
                if failure.reason == "internal":
                    print(f"(the full traceback is in {log}; run with --debug to print it)", file=sys.stderr)
                return failure.exit_code
            finally:
                stop.uninstall()
                startup_gc.restore()
            if result.state == "stopped":
                return stop.exit_code or EXIT_OK
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from aitk.config.validate import validate_command

    return validate_command(list(args.jobs), strict=args.strict)


def cmd_plan(args: argparse.Namespace) -> int:
    from aitk.plan.command import plan_command

    return plan_command(list(args.jobs), args.gpu_memory, args.json, args.process)


def cmd_dataset_inspect(args: argparse.Namespace) -> int:
    from aitk.data.inspect import inspect_command

    return inspect_command(list(args.jobs))


def cmd_schedule_replay(args: argparse.Namespace) -> int:
    from aitk.schedule.replay import replay_command

    return replay_command(args.metrics, args.config, args.process)


def cmd_demo(args: argparse.Namespace) -> int:
    from aitk.demo import run_demo

    return run_demo(Path(args.output), lambda job_file: main(["run", str(job_file)]), steps=args.steps)


def cmd_push(args: argparse.Namespace) -> int:
    from aitk.trainer.publish import publish_output_dir

    result = publish_output_dir(
        Path(args.output_dir), job_path=args.job, repo_id=args.repo_id, private=False if args.public else None,
        log=lambda message: print(message, file=sys.stderr),
    )
    return EXIT_OK if result.state == "uploaded" else EXIT_FAILED


def cmd_fetch_model(args: argparse.Namespace) -> int:
    from aitk.model_cache import run_fetch_command

    return run_fetch_command(args.target, revision=args.revision, token_from_job=args.token_from_job)


def _ui_settings(args: argparse.Namespace):
    from aitk.ui.settings import UISettings

    return UISettings.from_env(
        home=Path(args.home) if args.home else None,
        training_folder=Path(args.training_folder) if args.training_folder else None,
        datasets_folder=Path(args.datasets_folder) if args.datasets_folder else None,
    )


def cmd_ui(args: argparse.Namespace) -> int:
    from aitk.ui.server import serve

    return serve(_ui_settings(args), host=args.host, port=args.port, worker=not args.no_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from aitk.ui.worker import run_standalone

    return run_standalone(_ui_settings(args))


def _ui_folder_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", help="UI data folder: database, job files, thumbnails (default ./.aitk-ui, "
                        "or AITK_UI_HOME)")
    parser.add_argument("--training-folder", help="default folder for training output (default ./output)")
    parser.add_argument("--datasets-folder", help="default folder for datasets (default ./datasets)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aitk", description="AI Toolkit: train diffusion-model LoRAs.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train from one or more job files (resumes when output exists)")
    run.add_argument("jobs", nargs="+", help="job files (YAML, JSON or JSONC)")
    run.add_argument("--strict", action="store_true", help="unknown keys are errors, not warnings")
    run.add_argument("--debug", action="store_true", help="print full tracebacks")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check job files without loading any model")
    validate.add_argument("jobs", nargs="+")
    validate.add_argument("--strict", action="store_true")
    validate.set_defaults(func=cmd_validate)

    plan = sub.add_parser(
        "plan", help="memory plan of a job without weights or a GPU: device peak by what holds it, host "
        "peak, FLOPs; with --gpu-memory, whether it fits and the cheapest settings that do (docs/memory.md)"
    )
    plan.add_argument("jobs", nargs="+", help="job files (YAML, JSON or JSONC)")
    plan.add_argument("--gpu-memory", help="device memory to fit in, e.g. 24GB (GB = GiB, as cards are sold)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--process", type=int, default=0, help="process entry of the job file (default 0)")
    plan.set_defaults(func=cmd_plan)

    dataset = sub.add_parser("dataset", help="dataset tools")
    dataset_sub = dataset.add_subparsers(dest="dataset_command", required=True)
    inspect = dataset_sub.add_parser(
        "inspect", help="show what training would see (items, skipped files, buckets, captions); loads no model"
    )
    inspect.add_argument("jobs", nargs="+")
    inspect.set_defaults(func=cmd_dataset_inspect)

    schedule = sub.add_parser("schedule", help="alpha-schedule tools")
    schedule_sub = schedule.add_subparsers(dest="schedule_command", required=True)
    replay = schedule_sub.add_parser(
        "replay", help="replay a run's metrics through a job's alpha_schedule: when would each phase change, "
        "and what held it back; loads no model"
    )
    replay.add_argument("metrics", help="the run's metrics_<name>.jsonl")
    replay.add_argument("--config", required=True, help="job file whose network.alpha_schedule to replay")
    replay.add_argument("--process", type=int, default=0, help="process entry of the job file (default 0)")
    replay.set_defaults(func=cmd_schedule_replay)

    demo = sub.add_parser("demo", help="train a tiny SD 1.5 LoRA on a synthetic dataset (CPU, minutes)")
    demo.add_argument("--output", default="output", help="folder for the demo's data and run")
    demo.add_argument("--steps", type=int, default=300)
    demo.set_defaults(func=cmd_demo)

    push = sub.add_parser("push", help="upload a finished run to the Hugging Face Hub again (the retry "
                          "command a failed push_to_hub prints; docs/outputs.md)")
    push.add_argument("output_dir", help="the run's folder (<training_folder>/<name>)")
    push.add_argument("--job", help="the job file: a .env next to it may hold HF_TOKEN (the job itself is "
                      "read from <output_dir>/config.yaml, the job as run)")
    push.add_argument("--repo-id", help="override save.hf_repo_id")
    push.add_argument("--public", action="store_true", help="create the repo public (default: save.hf_private)")
    push.set_defaults(func=cmd_push)

    fetch = sub.add_parser("fetch-model", help="download a hub model (or every hub model a job file names) into "
                           "the Hugging Face cache ahead of a run (docs/hub.md)")
    fetch.add_argument("target", help="owner/name (a model repo), owner/name/file (one file) or a job file")
    fetch.add_argument("--revision", help="branch, tag or commit of the model repo (default main)")
    fetch.add_argument("--token-from-job", metavar="JOB.yaml", help="use the token of this job (HF_TOKEN in a .env "
                       "next to it); a job file given as target uses its own")
    fetch.set_defaults(func=cmd_fetch_model)

    ui = sub.add_parser("ui", help="web UI: queue, run, watch and stop jobs from a browser (docs/ui.md)")
    ui.add_argument("--host", default=None, help="address to listen on (default: 127.0.0.1 without "
                    "AI_TOOLKIT_AUTH, all interfaces with it)")
    ui.add_argument("--port", type=int, default=8675)
    ui.add_argument("--no-worker", action="store_true", help="do not run jobs from this process "
                    "(use a separate `aitk worker`)")
    _ui_folder_args(ui)
    ui.set_defaults(func=cmd_ui)

    worker = sub.add_parser("worker", help="run the UI's queued jobs without the web server")
    _ui_folder_args(worker)
    worker.set_defaults(func=cmd_worker)

    from aitk.tools.commands import add_tool_commands

    add_tool_commands(sub)  # convert, merge, lora info
    from aitk.caption.command import add_caption_command

    add_caption_command(sub)
    from aitk.cloud.commands import add_cloud_commands

    add_cloud_commands(sub)  # cloud modal, cloud modal-pull
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `aitk job.yaml` and `python run.py job.yaml` (ai-toolkit's spelling) mean `aitk run job.yaml`.
    known = {"run", "validate", "plan", "dataset", "schedule", "demo", "push", "ui", "worker", "convert", "merge",
             "lora", "caption", "cloud", "fetch-model", "-h", "--help"}
    if argv and argv[0] not in known:
        argv = ["run", *argv]
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
