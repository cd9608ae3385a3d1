"""`aitk caption FOLDER` and the caption job of `aitk run` (aitk/config/caption.py).

Exit codes: 0 when the run went through (files that could not be read are skipped, named and
counted, not failures of the run), 1 when it could not caption (the model would not load), 2 for
bad input (no such folder, an option out of range). No traceback for any of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from aitk.caption.options import DEFAULT_BATCH_SIZE, DEFAULT_CAPTION_EXT, CaptionOptions

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def add_caption_command(subparsers: Any) -> None:
    """Add `aitk caption` to `subparsers` (what `add_subparsers()` returned)."""
    from aitk.caption.families import DETAILED_MODEL, SHORT_MODEL

    parser = subparsers.add_parser(
        "caption", help="write a .txt caption beside each image and video of a folder with a vision-language model "
        "(docs/captions.md)",
        description=f"Caption the images and videos of FOLDER with {SHORT_MODEL} (short captions) or "
        f"{DETAILED_MODEL} (--detailed), or any Florence-2 / Qwen2.5-VL model (--model). Each caption is "
        "written to <name>.txt beside its file as soon as its batch is done; files that already have a "
        "caption are kept, so a stopped run goes on where it was when started again.",
    )
    parser.add_argument("folder", help="folder of images and videos (not recursive)")
    parser.add_argument("--model", help=f"hub id or local folder (default {SHORT_MODEL}, or {DETAILED_MODEL} with "
                        "--detailed)")
    parser.add_argument("--detailed", action="store_true", help=f"detailed captions: the default model is "
                        f"{DETAILED_MODEL}")
    parser.add_argument("--prompt", help="the prompt (Florence-2: a task token, default <DETAILED_CAPTION>; "
                        "<CAPTION> is shorter, <MORE_DETAILED_CAPTION> longer)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--missing-only", action="store_true", help="caption only files without a caption "
                       "(the default)")
    which.add_argument("--overwrite", action="store_true", help="caption every file, replacing existing captions")
    parser.add_argument("--prefix", default="", help="text put in front of every caption, e.g. a trigger word")
    parser.add_argument("--suffix", default="", help="text put after every caption")
    parser.add_argument("--max-length", type=int, help="longest caption in tokens (default: Florence-2 128, "
                        "Qwen2.5-VL 300)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"files per model call "
                        f"(default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when there is a GPU)")
    parser.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--max-res", type=int, help="scale images over MAX_RES^2 pixels down first (default: "
                        "Qwen2.5-VL 512; Florence-2 resizes to 768x768 itself)")
    parser.add_argument("--video-frames", type=int, help="frames sampled from each video (default: Qwen2.5-VL 4, "
                        "Florence-2 1, the middle one)")
    parser.add_argument("--caption-ext", default=DEFAULT_CAPTION_EXT, help="caption file extension (default txt)")
    parser.add_argument("--progress-file", help="JSON file rewritten after each batch with done / total "
                        "(the web UI reads it)")
    parser.set_defaults(func=cmd_caption)


def cmd_caption(args: argparse.Namespace) -> int:
    try:
        options = CaptionOptions(
            folder=Path(args.folder), model=args.model, detailed=args.detailed, prompt=args.prompt,
            overwrite=args.overwrite, prefix=args.prefix, suffix=args.suffix, max_length=args.max_length,
            batch_size=args.batch_size, device=args.device, dtype=args.dtype, max_res=args.max_res,
            video_frames=args.video_frames, caption_ext=args.caption_ext,
            progress_file=Path(args.progress_file) if args.progress_file else None,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from aitk.hub_files import use_job_token

    use_job_token(None)  # HF_TOKEN, or a .env in the working directory (docs/hub.md)
    return run_options(options)


def run_options(options: CaptionOptions) -> int:
    """Run one captioning; print the summary (stdout) or the reason it could not run (stderr)."""
    from aitk.caption.run import CaptionRunError, caption_folder

    try:
        summary = caption_folder(options)
    except CaptionRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT if not options.folder.expanduser().is_dir() else EXIT_FAILED
    except KeyboardInterrupt:
        print("stopped; the captions written so far are kept (run again to go on)", file=sys.stderr)
        return 130
    print(summary.line())
    for name, reason in summary.failed:
        print(f"  skipped {name}: {reason}")
    return EXIT_OK


def options_of_process(process: Any) -> CaptionOptions:
    """The CaptionOptions of a caption job's process entry (aitk.config.caption.CaptionProcess)."""
    section = process.caption
    return CaptionOptions(
        folder=Path(section.path_to_caption), model=section.model_name_or_path, detailed=section.detailed,
        prompt=section.caption_prompt, overwrite=section.recaption, prefix=section.prefix, suffix=section.suffix,
        max_length=section.max_new_tokens, batch_size=section.batch_size, device=section.device or process.device,
        dtype=section.dtype, max_res=section.max_res, video_frames=section.video_frames,
        caption_ext=section.caption_extension, extensions=tuple(section.extensions) if section.extensions else None,
    )


def run_caption_job(loaded: Any) -> int:
    """`aitk run` of a caption job: each process entry in turn; stops at the first that cannot run."""
    from aitk.hub_files import use_job_token

    use_job_token(loaded.path)  # a .env next to the job file may hold HF_TOKEN, as for training jobs
    for index, process in enumerate(loaded.job.config.process):
        print(f"{loaded.path}: process {index}: captioning {process.caption.path_to_caption}", file=sys.stderr)
        code = run_options(options_of_process(process))
        if code != EXIT_OK:
            return code
    return EXIT_OK
