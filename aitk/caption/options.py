"""The options of one captioning run. `aitk caption`'s flags and the caption job's keys both become
a CaptionOptions (command.py); the run reads nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_BATCH_SIZE = 4
#: what a caption file is called: <stem>.<caption_ext> beside the image, as the datasets read it
DEFAULT_CAPTION_EXT = "txt"


@dataclass
class CaptionOptions:
    folder: Path
    model: str | None = None  # hub id or folder; None: the default of `detailed`
    detailed: bool = False  # the default model is Qwen2.5-VL (detailed) rather than Florence-2 (short)
    prompt: str | None = None  # None: the family's prompt (a video prompt for videos where it has one)
    overwrite: bool = False  # caption every file again; default: only those without a caption
    prefix: str = ""
    suffix: str = ""
    max_length: int | None = None  # new tokens per caption; None: the family's default
    batch_size: int = DEFAULT_BATCH_SIZE
    device: str | None = None  # None: cuda when there is a GPU, else cpu
    dtype: str | None = None  # None: bf16 on a GPU, fp32 on the CPU
    max_res: int | None = None  # images over max_res^2 pixels are scaled down; None: the family's default
    video_frames: int | None = None  # frames sampled per video; None: the family's default
    caption_ext: str = DEFAULT_CAPTION_EXT
    extensions: tuple[str, ...] | None = None  # file extensions to caption; None: every image and video kind
    progress_file: Path | None = None  # JSON with done / total, rewritten as the run goes (the web UI)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        if self.batch_size < 1:
            raise ValueError(f"batch size {self.batch_size} is not valid; use 1 or more")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max length {self.max_length} is not valid; use 1 or more tokens")
        if self.max_res is not None and self.max_res < 32:
            raise ValueError(f"max res {self.max_res} is not valid; use 32 pixels or more")
        if self.video_frames is not None and self.video_frames < 1:
            raise ValueError(f"video frames {self.video_frames} is not valid; use 1 or more")
