"""The caption job: ostris/ai-toolkit's captioner processes, read by `aitk run` and `aitk validate`.

ai-toolkit writes a caption job as `job: extension` whose process entries have a captioner
`type` (Qwen3VLCaptioner, ...) and a `caption:` section (path_to_caption, model_name_or_path,
caption_prompt, recaption, max_new_tokens, max_res, batch_size, caption_extension, extensions,
dtype, device, ...). The same file runs here with `type: captioner`, or with upstream's
Qwen3VLCaptioner type, on the models aitk captions with (docs/captions.md). `job: caption` is
accepted as well. Keys upstream has that do nothing here (quantize, compile, ...) warn.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from aitk.config.errors import JobFileError, validation_problems
from aitk.config.section import Section, user_error
from aitk.config.support import render_path

#: process types that caption: ours, and ai-toolkit's captioners
CAPTION_TYPES = ("captioner", "Qwen3VLCaptioner", "Qwen3OmniCaptioner", "AceStepCaptioner", "Ideogram4Captioner")
#: ai-toolkit's captioners whose models caption what aitk does not (sound, its own output format)
REFUSED_TYPES = {
    "Qwen3OmniCaptioner": "Qwen3-Omni (video with its sound)",
    "AceStepCaptioner": "ACE-Step (music)",
    "Ideogram4Captioner": "Ideogram 4's caption format",
}
#: ai-toolkit's caption keys that change nothing here (its memory and speed switches)
NO_EFFECT_KEYS = ("quantize", "qtype", "low_vram", "compile", "thinking", "num_workers", "layer_offloading",
                  "layer_offloading_percent", "model_name_or_path2", "fixed_caption")


class CaptionSection(Section):
    path_to_caption: str = Field(min_length=1, description="The folder whose images and videos get captions.")
    model_name_or_path: str | None = Field(
        None, description="Hub id or folder of a Florence-2 or Qwen2.5-VL model (default: Florence-2 large, or "
        "Qwen2.5-VL 7B Instruct with detailed).")
    caption_prompt: str | None = Field(None, description="The prompt (Florence-2: a task token such as <CAPTION>).")
    recaption: bool = Field(False, description="Caption files that already have a caption again (overwrite).")
    max_new_tokens: int | None = Field(None, ge=1, description="Longest caption in tokens.")
    max_res: int | None = Field(None, ge=32, description="Images over max_res^2 pixels are scaled down first.")
    batch_size: int = Field(4, ge=1, description="Files per model call.")
    caption_extension: str = Field("txt", min_length=1, description="Caption files are <stem>.<caption_extension>.")
    extensions: list[str] | None = Field(None, description="File extensions to caption (default: images and videos).")
    dtype: str | None = Field(None, description="bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on the CPU).")
    device: str | None = Field(None, description="cuda, cuda:N or cpu (default: cuda when there is a GPU).")
    detailed: bool = Field(False, description="aitk: the default model is Qwen2.5-VL (detailed captions).")
    prefix: str = Field("", description="aitk: put in front of every caption.")
    suffix: str = Field("", description="aitk: put after every caption.")
    video_frames: int | None = Field(None, ge=1, description="aitk: frames sampled from each video.")
    quantize: Any = Field(None, description="ai-toolkit's; no effect here.")
    qtype: Any = Field(None, description="ai-toolkit's; no effect here.")
    low_vram: Any = Field(None, description="ai-toolkit's; no effect here.")
    compile: Any = Field(None, description="ai-toolkit's; no effect here.")
    thinking: Any = Field(None, description="ai-toolkit's; no effect here.")
    num_workers: Any = Field(None, description="ai-toolkit's; no effect here.")
    layer_offloading: Any = Field(None, description="ai-toolkit's; no effect here.")
    layer_offloading_percent: Any = Field(None, description="ai-toolkit's; no effect here.")
    model_name_or_path2: Any = Field(None, description="ai-toolkit's; no effect here.")
    fixed_caption: Any = Field(None, description="ai-toolkit's; no effect here.")

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value.strip().lower() not in ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32"):
            raise user_error(f"{value!r} is not valid; use bf16, fp16 or fp32")
        return value


class CaptionProcess(Section):
    type: Literal[CAPTION_TYPES] = Field("captioner", description="captioner (or ai-toolkit's Qwen3VLCaptioner).")
    caption: CaptionSection
    device: str | None = Field(None, description="Used when caption.device is not set.")
    sqlite_db_path: str | None = Field(None, description="ai-toolkit's web UI database; not used here.")

    @model_validator(mode="after")
    def _captions_images(self) -> "CaptionProcess":
        what = REFUSED_TYPES.get(self.type)
        if what is not None:
            raise user_error(f"{self.type!r} captions with {what}, which is not supported; use type: captioner "
                             "(images and videos with Florence-2 or Qwen2.5-VL, docs/captions.md)", key="type")
        return self


class CaptionJobConfig(Section):
    name: str = Field("caption", min_length=1, description="The job's name (nothing is written under it).")
    process: list[CaptionProcess] = Field(min_length=1, description="One entry per folder to caption.")


class CaptionJobFile(Section):
    job: Literal["extension", "caption"] = Field("caption", description="extension (ai-toolkit) or caption.")
    config: CaptionJobConfig
    meta: dict[str, Any] = Field(default_factory=dict, description="Not used by caption jobs.")


def _process_types(data: dict[str, Any]) -> list[str]:
    config = data.get("config")
    processes = config.get("process") if isinstance(config, dict) else None
    if not isinstance(processes, list):
        return []
    return [str(p.get("type")) for p in processes if isinstance(p, dict) and p.get("type") is not None]


def is_caption_job(data: Any) -> bool:
    """Whether parsed job data is a caption job: `job: caption`, or a captioner process type."""
    if not isinstance(data, dict):
        return False
    return data.get("job") == "caption" or any(t in CAPTION_TYPES for t in _process_types(data))


def caption_job_problem(source: str) -> str:
    return ("this is a caption job (job: caption, or a captioner process type): `aitk run` runs it and "
            "`aitk validate` checks it, but this takes training jobs only (the web UI captions a dataset with "
            "the Caption action of its page)")


def parse_caption_job(data: dict[str, Any], source: str) -> tuple[CaptionJobFile, list[str]]:
    """The validated caption job and its warnings (keys that do nothing here). Raises JobFileError."""
    types = _process_types(data)
    others = [t for t in types if t not in CAPTION_TYPES]
    if others and len(others) < len(types):
        raise JobFileError(source, [f"config.process: captioner and training processes ({', '.join(others)}) are in "
                                    "one file; put the training in a job file of its own"])
    try:
        job = CaptionJobFile.model_validate(data)
    except ValidationError as exc:
        raise JobFileError(source, validation_problems(exc, data, CaptionJobFile)) from None
    return job, caption_warnings(job)


def caption_warnings(job: CaptionJobFile) -> list[str]:
    out = []
    for i, process in enumerate(job.config.process):
        for key in NO_EFFECT_KEYS:
            value = getattr(process.caption, key)
            if value not in (None, False):
                out.append(f"{render_path(('config', 'process', i, 'caption', key))}: ai-toolkit's {key} does "
                           "nothing in aitk caption; it is ignored")
        if process.sqlite_db_path:
            out.append(f"{render_path(('config', 'process', i, 'sqlite_db_path'))}: ai-toolkit's web UI database; "
                       "it is ignored")
    return out
