"""Registers `aitk convert`, `aitk merge` and `aitk lora info` on the `aitk` argument parser.

Nothing heavy is imported here: `aitk/cli.py` builds its parser for every command, so torch and
diffusers load only when one of these commands runs. Each command returns 0, or 1 after an
`error: ...` line on stderr (bad input never prints a traceback).
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["TOOL_COMMANDS", "add_tool_commands"]

#: top-level command names added here (aitk/cli.py's main() must not read them as job files)
TOOL_COMMANDS = ("convert", "merge", "lora")


def cmd_convert(args: argparse.Namespace) -> int:
    from aitk.tools.convert import convert_command

    return convert_command(args.input, args.to, args.arch, args.output, force=args.force)


def cmd_merge(args: argparse.Namespace) -> int:
    from aitk.tools.merge import merge_command

    return merge_command(args.model, args.lora, args.lora_2, args.strength, args.arch, args.output,
                         dtype=args.dtype, config=args.config, device=args.device, force=args.force)


def cmd_lora_info(args: argparse.Namespace) -> int:
    from aitk.tools.lora_info import info_command

    return info_command(args.file, as_json=args.json)


def add_tool_commands(subparsers: Any) -> None:
    """Add convert, merge and lora info to `subparsers` (what `add_subparsers()` returned)."""
    convert = subparsers.add_parser(
        "convert", help="rewrite a LoRA / LoKr / LoHa / DoRA file in another key layout (lossless; loads no model)",
        description="Rewrite a network file in the comfyui (= kohya) or diffusers (PEFT) key layout of "
        "the same architecture. Tensors are kept bit for bit; alphas move between .alpha keys and "
        "the diffusers config. LoKr / LoHa have no diffusers layout.",
    )
    convert.add_argument("input", help="the .safetensors file to convert")
    convert.add_argument("--to", required=True, help="target layout: comfyui, kohya (the same file) or diffusers")
    convert.add_argument("--arch", required=True, help="the model the file is for: sd1, sdxl, flux, wan21, ...")
    convert.add_argument("-o", "--output", help="output file (default: <input>_<layout>.safetensors)")
    convert.add_argument("--force", action="store_true", help="replace the output file if it exists")
    convert.set_defaults(func=cmd_convert)

    merge = subparsers.add_parser(
        "merge", help="bake a LoRA / LoKr / LoHa / DoRA file into a base model and save the model",
        description="Merge network files into a base model's denoiser (and, for SD / SDXL files with "
        "text-encoder LoRA, its text encoders) at a strength and save the result: a diffusers folder "
        "(the base's other parts copied unchanged), or for an SD / SDXL single-file checkpoint, a "
        "single .safetensors file.",
    )
    merge.add_argument("--model", required=True, help="base model: a diffusers folder, a hub id, or an SD / SDXL "
                       ".safetensors checkpoint")
    merge.add_argument("--lora", required=True, help="the network file (WAN 2.2: the high-noise expert's)")
    merge.add_argument("--lora-2", dest="lora_2", help="WAN 2.2 only: the low-noise expert's file")
    merge.add_argument("--strength", type=float, default=1.0, help="network strength (default 1.0)")
    merge.add_argument("--arch", required=True, help="the base model's architecture: sd1, sdxl, flux, wan22_14b, ...")
    merge.add_argument("-o", "--output", required=True, help="output folder (diffusers), or a .safetensors file "
                       "for a single-file SD / SDXL base")
    merge.add_argument("--dtype", default="auto", help="precision to load, merge into and save the merged parts: "
                       "auto (as the base stores it), float32, float16, bfloat16")
    merge.add_argument("--config", help="component configs for a single-file base (a diffusers folder or hub id; "
                       "needed offline)")
    merge.add_argument("--device", default="cpu", help="where to merge (cpu, cuda); default cpu")
    merge.add_argument("--force", action="store_true", help="replace the output if it exists")
    merge.set_defaults(func=cmd_merge)

    lora = subparsers.add_parser("lora", help="network file tools")
    lora_sub = lora.add_subparsers(dest="lora_command", required=True)
    info = lora_sub.add_parser(
        "info", help="architecture, layout, network type, ranks, alphas, module count, metadata and hash check "
        "of a LoRA / LoKr / LoHa / DoRA file; loads no model",
    )
    info.add_argument("file", help="the .safetensors file")
    info.add_argument("--json", action="store_true", help="print the report as JSON (metadata values in full)")
    info.set_defaults(func=cmd_lora_info)
