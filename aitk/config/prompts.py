"""What a `sample:` prompt may say: ai-toolkit's inline flags, the preview requests they make, which
settings each model family's previews can use, and the preview sampler names.

Parsing lives in the config layer so `aitk validate` catches a bad flag before any training.
ai-toolkit reads `--flag value` pairs after the prompt text (each value runs to the next flag), and
the flags win over the sample's and the sample entry's settings; so do they here.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# ai-toolkit / kohya sampler spellings accepted in sample.sampler ("ddpm" previews with DDIM).
PREVIEW_SAMPLERS: tuple[str, ...] = (
    "ddim", "ddpm", "dpm", "dpm++", "dpm++_2m", "dpm++_2m_karras", "dpmsolver",
    "euler", "euler_a", "lms", "pndm", "unipc", "flowmatch",
)


@dataclass(frozen=True)
class InlineFlag:
    """One inline flag: its spellings (the first is the one messages use), the PreviewRequest field
    it sets (None: an ai-toolkit flag no model here has a use for), and its value kind."""

    names: tuple[str, ...]
    field: str | None
    kind: str  # "int", "float", "floats" (comma-separated) or "text"
    meaning: str


INLINE_FLAGS: tuple[InlineFlag, ...] = (
    InlineFlag(("n", "neg"), "negative", "text", "negative prompt"),
    InlineFlag(("w", "width"), "width", "int", "width in pixels"),
    InlineFlag(("h", "height"), "height", "int", "height in pixels"),
    InlineFlag(("seed", "d"), "seed", "int", "seed; -1 draws a new one for every preview"),
    InlineFlag(("cfg", "l"), "guidance_scale", "float", "guidance scale"),
    InlineFlag(("steps", "s"), "steps", "int", "denoising steps"),
    InlineFlag(("m", "network_multiplier"), "multiplier", "float", "LoRA strength"),
    InlineFlag(("p2",), "prompt_2", "text", "prompt of SDXL's second text encoder"),
    InlineFlag(("n2",), "negative_2", "text", "negative prompt of SDXL's second text encoder"),
    InlineFlag(("gr",), "guidance_rescale", "float", "guidance rescale (SD / SDXL)"),
    InlineFlag(("frames", "num_frames"), "num_frames", "int", "frames of a video preview"),
    InlineFlag(("fps",), "fps", "int", "frame rate of a video preview"),
    InlineFlag(("ctrl_img",), "ctrl_img", "text", "control image: what Kontext edits, the first frame of I2V"),
    InlineFlag(("a",), None, "float", "adapter conditioning scale (T2I / IP adapters)"),
    InlineFlag(("ref",), None, "float", "where the SDXL refiner takes over"),
    InlineFlag(("ev", "extra_values"), None, "floats", "extra values of a custom adapter"),
    InlineFlag(("ctrl_idx",), None, "int", "control image index (Flex.2)"),
)
_BY_NAME: dict[str, InlineFlag] = {name: flag for flag in INLINE_FLAGS for name in flag.names}
# a flag starts a word: "--" then a letter; "well--lit" or a lone "--" stay prompt text
_FLAG = re.compile(r"(?<!\S)--([A-Za-z][A-Za-z0-9_]*)(?=\s|$)")
_AT_LEAST_ONE = {"steps", "num_frames", "fps"}
#: ai-toolkit flags parsed (and checked) but used by no model here
AI_TOOLKIT_ONLY_FLAGS: tuple[str, ...] = tuple(f.names[0] for f in INLINE_FLAGS if f.field is None)

# Families by what their diffusers preview pipeline takes (a test checks the pipelines' signatures).
SD_ARCHS: frozenset[str] = frozenset({"sd1", "sd15", "sd2", "sdxl"})
#: pipelines that take guidance_rescale
GUIDANCE_RESCALE_ARCHS: frozenset[str] = SD_ARCHS | {"ltx2"}
SECOND_ENCODER_ARCHS: frozenset[str] = frozenset({"sdxl"})  # prompt_2, negative_prompt_2
FLUX_ARCHS: frozenset[str] = frozenset({"flux", "flux_kontext"})  # no classifier-free guidance


class SamplePromptError(ValueError):
    def __init__(self, prompt: str, problem: str) -> None:
        super().__init__(f"sample prompt {prompt!r}: {problem}")
        self.problem = problem


@dataclass(frozen=True)
class PreviewRequest:
    prompt: str
    width: int
    height: int
    seed: int  # -1: a new random seed for every preview
    guidance_scale: float
    steps: int
    negative: str
    multiplier: float
    num_frames: int = 1  # video models: frames of the preview
    fps: int = 16  # video models: frame rate of the written file
    ctrl_img: str | None = None  # I2V / Kontext: path of the conditioning image
    prompt_2: str | None = None  # SDXL: the second text encoder's prompt (default: prompt)
    negative_2: str | None = None  # SDXL: the second text encoder's negative prompt
    guidance_rescale: float = 0.0  # SD / SDXL: rescale of the guided prediction (0: off)
    # multi-image edit models (Qwen-Image-Edit-2509): a samples entry's numbered control images (no
    # inline flags, as in ai-toolkit); ctrl_img, when given, is the first (ctrl_img_1 only without it)
    ctrl_img_1: str | None = None
    ctrl_img_2: str | None = None
    ctrl_img_3: str | None = None
    #: the inline flags the prompt text gave (first spellings), e.g. ("w", "ctrl_img")
    flags: tuple[str, ...] = field(default=(), compare=False)


def _value(flag: InlineFlag, written: str, raw: str, text: str) -> Any:
    if flag.kind == "text":
        if flag.field == "ctrl_img" and not raw:
            raise SamplePromptError(text, f"--{written} needs an image file path, e.g. --{written} /data/first.jpg")
        return raw
    try:
        if flag.kind == "int":
            return int(raw)
        if flag.kind == "float":
            return float(raw)
        return [float(part) for part in raw.split(",")]
    except ValueError:
        whole = " (a whole number)" if flag.kind == "int" else ""
        lists = " (numbers separated by commas)" if flag.kind == "floats" else ""
        raise SamplePromptError(text, f"--{written} needs a number, got {raw!r}{whole}{lists}") from None


def parse_prompt(text: str, defaults: PreviewRequest) -> PreviewRequest:
    """Split `text` into the prompt and its inline flags; flags override `defaults`.

    Raises SamplePromptError for an unknown flag or a value of the wrong kind."""
    matches = list(_FLAG.finditer(text))
    values: dict[str, Any] = {"prompt": text[: matches[0].start() if matches else len(text)].strip()}
    given: list[str] = []
    for match, following in zip(matches, matches[1:] + [None]):
        written = match.group(1)
        flag = _BY_NAME.get(written)
        if flag is None:
            close = difflib.get_close_matches(written, list(_BY_NAME), n=1)
            hint = f"did you mean --{close[0]}? " if close else ""
            raise SamplePromptError(
                text, f"unknown flag --{written}; {hint}the flags are "
                + ", ".join("/".join(f"--{n}" for n in f.names) for f in INLINE_FLAGS)
            )
        raw = text[match.end(): following.start() if following else len(text)].strip()
        value = _value(flag, written, raw, text)
        if flag.field in _AT_LEAST_ONE and value < 1:
            raise SamplePromptError(text, f"--{written} must be at least 1, got {raw}")
        given.append(flag.names[0])
        if flag.field is not None:
            values[flag.field] = value
    return replace(defaults, **values, flags=tuple(dict.fromkeys(given)))


def _entry_overrides(item: Any) -> dict[str, Any]:
    """The settings a `samples:` entry gives (None: the sample section's)."""
    overrides = {
        "width": item.width, "height": item.height, "seed": item.seed, "guidance_scale": item.guidance_scale,
        "steps": item.sample_steps, "negative": item.neg, "multiplier": item.network_multiplier,
        "ctrl_img": item.ctrl_img, "num_frames": item.num_frames, "fps": item.fps,
        "ctrl_img_1": item.ctrl_img_1, "ctrl_img_2": item.ctrl_img_2, "ctrl_img_3": item.ctrl_img_3,
    }
    return {k: v for k, v in overrides.items() if v is not None}


def build_preview_requests(sample: Any, trigger_word: str | None) -> list[PreviewRequest]:
    """One request per `sample.prompts` entry, then per `sample.samples` entry (schema.SampleConfig).

    As in ai-toolkit: [trigger] becomes the trigger word everywhere in the text (negative too);
    walk_seed gives the i-th preview seed + i unless the entry or an inline flag sets its seed;
    a samples entry's settings override the section's, and inline flags override both."""
    defaults = PreviewRequest(
        prompt="", width=sample.width, height=sample.height, seed=sample.seed,
        guidance_scale=sample.guidance_scale, steps=sample.sample_steps, negative=sample.neg or "",
        multiplier=sample.network_multiplier, num_frames=sample.num_frames, fps=sample.fps,
        ctrl_img=sample.ctrl_img, guidance_rescale=sample.guidance_rescale,
    )
    entries = [(text, {}) for text in sample.prompts] + [(s.prompt, _entry_overrides(s)) for s in sample.samples]
    requests = []
    for index, (text, overrides) in enumerate(entries):
        base = defaults
        if sample.walk_seed and defaults.seed >= 0:
            base = replace(base, seed=defaults.seed + index)
        if trigger_word:
            text = text.replace("[trigger]", trigger_word)
        request = parse_prompt(text, replace(base, **overrides))
        if trigger_word:  # a negative from the sample section or entry
            request = replace(request, negative=request.negative.replace("[trigger]", trigger_word))
        requests.append(request)
    return requests


def request_key(sample: Any, index: int) -> tuple[str, int]:
    """Where the index-th preview request comes from: ("prompts", i) or ("samples", j)."""
    count = len(sample.prompts)
    return ("prompts", index) if index < count else ("samples", index - count)


# --- what each family's previews can use -------------------------------------------------------


def preview_fields(arch: str) -> frozenset[str]:
    """The PreviewRequest settings `arch`'s previews use beyond prompt, size, seed, guidance scale,
    steps and LoRA strength (which all use)."""
    from aitk.models.archs import FIRST_FRAME_ARCHS
    from aitk.models.archs import CONTROL_ARCHS, MULTI_CONTROL_PREVIEW_ARCHS, OPTIONAL_FIRST_FRAME_ARCHS, data_facts

    fields = set()
    if arch not in FLUX_ARCHS:
        fields.add("negative")
    if arch in GUIDANCE_RESCALE_ARCHS:
        fields.add("guidance_rescale")
    if arch in SECOND_ENCODER_ARCHS:
        fields |= {"prompt_2", "negative_2"}
    if data_facts(arch)[1] is not None:
        fields |= {"num_frames", "fps"}
    if arch in CONTROL_ARCHS | FIRST_FRAME_ARCHS | OPTIONAL_FIRST_FRAME_ARCHS:
        fields.add("ctrl_img")
    if arch in MULTI_CONTROL_PREVIEW_ARCHS:
        fields.add("ctrl_img_n")  # ctrl_img_1 .. ctrl_img_3
    return frozenset(fields)


def preview_control_images(request: PreviewRequest, arch: str) -> list[str]:
    """The control image paths `arch`'s preview of `request` reads, in order: ctrl_img (else
    ctrl_img_1), then ctrl_img_2 and ctrl_img_3 on multi-image edit models."""
    used = preview_fields(arch)
    if "ctrl_img" not in used:
        return []
    first = request.ctrl_img or (request.ctrl_img_1 if "ctrl_img_n" in used else None)
    more = [request.ctrl_img_2, request.ctrl_img_3] if "ctrl_img_n" in used else []
    return [path for path in (first, *more) if path]


def needs_first_frame(arch: str) -> bool:
    """Image-to-video models cannot preview without a first frame (ctrl_img)."""
    from aitk.models.archs import FIRST_FRAME_ARCHS

    return arch in FIRST_FRAME_ARCHS


def _issues(requests: list[PreviewRequest], arch: str, text_cached: bool) -> set[str]:
    from aitk.models.archs import OPTIONAL_FIRST_FRAME_ARCHS

    used = preview_fields(arch)
    issues: set[str] = set()
    for request in requests:
        if request.ctrl_img and "ctrl_img" not in used:
            issues.add("ctrl_img")
        if (request.ctrl_img_1 or request.ctrl_img_2 or request.ctrl_img_3) and "ctrl_img_n" not in used:
            issues.add("ctrl_img_n")
        if (request.num_frames > 1 or {"frames", "fps"} & set(request.flags)) and "num_frames" not in used:
            issues.add("num_frames")
        if (request.negative or request.negative_2) and "negative" not in used:
            issues.add("negative")
        if (request.prompt_2 or request.negative_2) and ("prompt_2" not in used or text_cached):
            issues.add("prompt_2")
        if request.guidance_rescale and "guidance_rescale" not in used:
            issues.add("guidance_rescale")
        if set(AI_TOOLKIT_ONLY_FLAGS) & set(request.flags):
            issues.add("ai_toolkit_only")
        if not preview_control_images(request, arch) and "ctrl_img" in used and arch not in OPTIONAL_FIRST_FRAME_ARCHS:
            issues.add("no_first_frame" if needs_first_frame(arch) else "no_control_image")
    return issues


def preview_issues(process: Any) -> frozenset[str]:
    """What the process's previews ask for that its model cannot do (schema.ProcessConfig; names
    used by aitk.config.support's rows): a PreviewRequest field the model does not use
    ("ctrl_img_n": ctrl_img_1..3), the "ai_toolkit_only" flags, "no_first_frame" (I2V) or
    "no_control_image" (Kontext, the edit models)."""
    from aitk.models.archs import ADAPTERS

    sample, arch = process.sample, process.model.resolved_arch
    if sample is None or process.train.disable_sampling or arch not in ADAPTERS:
        return frozenset()
    text_cached = process.train.cache_text_embeddings or any(d.cache_text_embeddings for d in process.datasets)
    return frozenset(_issues(build_preview_requests(sample, process.trigger_word), arch, text_cached))


def _is_file(path: str) -> bool:
    try:
        return Path(path).expanduser().is_file()
    except RuntimeError:  # ~user that does not exist here
        return False


def missing_ctrl_images(requests: list[PreviewRequest], arch: str) -> dict[int, str]:
    """index -> the first control image path of each request whose file does not exist here, on
    a model whose previews use it."""
    missing = {}
    for i, request in enumerate(requests):
        absent = [p for p in preview_control_images(request, arch) if not _is_file(p)]
        if absent:
            missing[i] = absent[0]
    return missing


def unrenderable_previews(requests: list[PreviewRequest], arch: str) -> dict[int, str]:
    """index -> why that preview cannot render on `arch` (the run says so once and skips it)."""
    why = {
        i: f"its control image {path!r} does not exist"
        for i, path in missing_ctrl_images(requests, arch).items()
    }
    if needs_first_frame(arch):
        for i, request in enumerate(requests):
            if not request.ctrl_img:
                why[i] = ("an image-to-video model needs a first frame: set sample.ctrl_img, the entry's "
                          "ctrl_img or --ctrl_img <image> in the prompt")
    return dict(sorted(why.items()))
