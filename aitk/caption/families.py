"""The model families that caption, their defaults, and which family a model id or folder is.

A family is known by the `model_type` of the model's config.json (as transformers knows it), so
any hub id or local folder of Florence-2 or Qwen2.5-VL works; nothing here imports transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

#: the default models: short captions, and detailed ones (`--detailed`)
SHORT_MODEL = "florence-community/Florence-2-large"
DETAILED_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
#: Microsoft's own Florence-2 repos need trust_remote_code (their code, their weight names);
#: florence-community holds the same weights converted for transformers' Florence2 classes
REMOTE_CODE_FLORENCE = "microsoft/Florence-2-"
NATIVE_FLORENCE = "florence-community/Florence-2-"

QWEN_IMAGE_PROMPT = (
    "Write a caption for this image for training an image generation model. Describe the main subject and what "
    "it looks like, what it is doing, the setting, the lighting, the colours, the style (photo, painting, render, "
    "drawing) and the composition. Use plain sentences, say what is there without hedging, and start with the "
    "caption itself, no introduction."
)
QWEN_VIDEO_PROMPT = (
    "These images are frames of one video, in order. Write a caption for the video for training a video "
    "generation model. Describe the main subject and what it looks like, the action and how things move, the "
    "camera movement, the setting, the lighting and the style. Use plain sentences, say what is there without "
    "hedging, and start with the caption itself, no introduction."
)


class CaptionModelError(ValueError):
    """A model that cannot caption (unknown family, no config); str() is one line with the fix."""


@dataclass(frozen=True)
class Family:
    """What differs between the families: names, prompts and how much each item costs."""

    model_type: str  # config.json's model_type
    label: str
    default_model: str
    image_prompt: str
    video_prompt: str | None  # None: a video is captioned as its one sampled frame, with image_prompt
    max_new_tokens: int  # the default --max-length
    video_frames: int  # frames sampled from each video
    max_res: int | None  # default --max-res (images above max_res^2 pixels are scaled down); None: as is
    num_beams: int  # greedy (1) or beam search, as the model card shows it


FLORENCE2 = Family(
    model_type="florence2", label="Florence-2", default_model=SHORT_MODEL,
    # Florence-2 takes a task token as its prompt; <CAPTION> is shorter, <MORE_DETAILED_CAPTION> longer
    image_prompt="<DETAILED_CAPTION>", video_prompt=None,
    max_new_tokens=128, video_frames=1, max_res=None, num_beams=3,
)
QWEN25_VL = Family(
    model_type="qwen2_5_vl", label="Qwen2.5-VL", default_model=DETAILED_MODEL,
    image_prompt=QWEN_IMAGE_PROMPT, video_prompt=QWEN_VIDEO_PROMPT,
    max_new_tokens=300, video_frames=4, max_res=512, num_beams=1,
)
FAMILIES: dict[str, Family] = {f.model_type: f for f in (FLORENCE2, QWEN25_VL)}


def choose_model(model: str | None, detailed: bool = False) -> tuple[str, str | None]:
    """(the model id or folder to load, a note for the user or None): the default of the kind of
    caption asked for, or `model`; Microsoft's remote-code Florence-2 ids become florence-community's."""
    if not model or not model.strip():
        return (DETAILED_MODEL if detailed else SHORT_MODEL), None
    model = model.strip()
    if model.startswith(REMOTE_CODE_FLORENCE) and not Path(model).expanduser().exists():
        native = NATIVE_FLORENCE + model[len(REMOTE_CODE_FLORENCE):]
        return native, (f"{model} needs trust_remote_code; loading {native}, the same weights for transformers' "
                        "own Florence-2 classes")
    return model, None


def is_local(model: str) -> bool:
    """Whether `model` names a folder here rather than a hub id."""
    from aitk.hub_files import HubRepo, parse_file_reference

    return not isinstance(parse_file_reference(model), HubRepo)


def config_path(model: str) -> Path:
    """The model's config.json: in its folder, or downloaded from the Hub (or found in the cache).
    Raises CaptionModelError with one line (missing folder, gated repo, offline and not cached)."""
    if is_local(model):
        folder = Path(model).expanduser()
        if not (folder / "config.json").is_file():
            what = "has no config.json" if folder.is_dir() else "does not exist"
            raise CaptionModelError(f"model {model!r}: the folder {what}; give a model folder (saved with "
                                    "save_pretrained) or a hub id such as " + SHORT_MODEL)
        return folder / "config.json"
    from huggingface_hub import hf_hub_download

    from aitk.hub_files import access_message

    try:
        return Path(hf_hub_download(model, "config.json"))
    except Exception as exc:  # noqa: BLE001 - every failure is one line a user can act on
        raise CaptionModelError(access_message(exc, key="model", reference=model, repo_id=model)) from exc


def family_of(model: str) -> Family:
    """The family of a model id or folder, from its config.json's model_type."""
    path = config_path(model)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        model_type = config.get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise CaptionModelError(f"model {model!r}: its config.json cannot be read ({exc})") from None
    family = FAMILIES.get(str(model_type))
    text_type = (config.get("text_config") or {}).get("model_type") if isinstance(config.get("text_config"), dict) else None
    if family is FLORENCE2 and (config.get("auto_map") or text_type == "florence2_language"):
        raise CaptionModelError(
            f"model {model!r} is Florence-2 in its original remote-code form (trust_remote_code), which "
            f"transformers' own Florence-2 classes do not load; use a converted one such as {SHORT_MODEL} "
            "(florence-community/Florence-2-base, -large-ft, ...)"
        )
    if family is None:
        known = ", ".join(f"{f.label} ({f.model_type})" for f in FAMILIES.values())
        raise CaptionModelError(
            f"model {model!r} is a {model_type!r} model; captions come from {known} models, e.g. "
            f"{SHORT_MODEL} (short captions) or {DETAILED_MODEL} (detailed)"
        )
    return family
