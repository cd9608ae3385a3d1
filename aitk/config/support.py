"""What the job file may say that this version does not do yet (table-driven).

Two tables:
- UNSUPPORTED: schema fields whose value asks for something not implemented yet (LoKr, FLUX,
  video datasets...). Each active row gives one warning naming the key, saying it is not supported
  yet and what happens (ignored, or the run fails at start).
- AI_TOOLKIT_KEYS: keys ostris/ai-toolkit knows that our schema does not model. They are not
  "unknown" (no did-you-mean, not errors under --strict); when set they warn like the rows above.

When a feature lands, delete its row. Nothing else needs to change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from aitk.config.prompts import AI_TOOLKIT_ONLY_FLAGS, preview_issues
from aitk.models.archs import (
    ASSISTANT_LORA_ARCHS,
    CONTROL_ARCHS,
    DDPM_NOISE_SCHEDULERS,
    DDPM_TIMESTEP_TYPES,
    EXTRAS_PATH_ARCHS,
    FLOW_NOISE_SCHEDULERS,
    MASKED_ATTENTION_ARCHS,
    NO_DIFFUSERS_CLASS_ARCHS,
    NOISE_SCHEDULERS,
    OPTIONAL_CONTROL_ARCHS,
    TIMESTEP_TYPES,
    supported_archs,
)

from aitk.config.schema import (
    DatasetConfig,
    JobFile,
    LoggingConfig,
    ModelConfig,
    ProcessConfig,
    SamplePrompt,
    Section,
    TrainConfig,
)

# Architectures this version trains (ModelConfig.resolved_arch values): those with an adapter.
SUPPORTED_ARCHS: frozenset[str] = frozenset(supported_archs())

# Optimizers whose update is elementwise torch code, so they run on FSDP's DTensor shards as they are.
FSDP_OPTIMIZERS = ("adamw", "adam", "sgd")

# train.train_text_encoder: the families and network types that train a text-encoder LoRA
# (aitk.networks.text_encoders says the same; a test keeps them in step)
TEXT_ENCODER_LORA_ARCHS: frozenset[str] = frozenset({"sd1", "sd15", "sd2", "sdxl"})
TEXT_ENCODER_NETWORK_TYPES: tuple[str, ...] = ("lora", "locon", "dora")

IGNORED = "it is ignored"
FAILS = "the run fails at start"
UNKNOWN_ARCH = f"{FAILS}; use one of {', '.join(sorted(SUPPORTED_ARCHS))}"
NO_DIFFUSERS_CLASS = (
    f"{FAILS} (not supported: no diffusers model class; upstream runs its own copy of the model's code, and "
    f"this version loads every model through diffusers, whose 0.42 release has none for it); use one of "
    f"{', '.join(sorted(SUPPORTED_ARCHS))}"
)


@dataclass(frozen=True)
class Unsupported:
    """One "known but not supported yet" rule.

    section: the schema class the key lives in; key: attribute path inside it (dotted for nested
    sections, e.g. "alpha_schedule.enabled"); active(value, section) -> whether to warn; what: the
    feature in words ({value} is replaced by the value); outcome: what happens.
    """

    section: type[Section]
    key: str
    active: Callable[[Any, Any], bool]
    what: str
    outcome: str = IGNORED

    @property
    def fails(self) -> bool:
        """The run refuses to start with this setting (rather than ignoring it)."""
        return FAILS in self.outcome


def _is_true(value: Any, _section: Any = None) -> bool:
    return value is True


def _is_set(value: Any, _section: Any = None) -> bool:
    return value is not None


def _truthy(value: Any, _section: Any = None) -> bool:
    return bool(value)


def _never(_value: Any, _section: Any = None) -> bool:
    return False


def _not_installed(module: str) -> bool:
    """Whether `module` cannot be imported here (looked up without importing it)."""
    import importlib.util

    return importlib.util.find_spec(module) is None


def _refused_for(table: dict[str, tuple[str, ...]], accepted: tuple[str, ...]) -> Callable[[Any, Any], bool]:
    """Active on a process whose arch accepts `accepted` (its row in `table`) and whose value is not
    among them; unset values and unknown archs never are."""

    def active(value: Any, process: Any) -> bool:
        arch_accepts = table.get(process.model.resolved_arch)
        return value is not None and arch_accepts == accepted and str(value).lower() not in accepted

    return active


def _flex2_option_problems(model: Any) -> list[str]:
    """What is wrong with a Flex.2 job's model_kwargs options (aitk.models.flex2.options)."""
    from aitk.models.flex2.options import option_problems

    return option_problems(model.model_kwargs)


def _unmasked_backend(train: Any) -> str | None:
    """The attention backend the job asks for when it takes no attention mask, else None."""
    from aitk.models.attention import MASKED_BACKENDS, requested

    asked = requested(train)
    return asked[0] if asked is not None and asked[0] not in MASKED_BACKENDS else None


UNSUPPORTED: list[Unsupported] = [
    # network
    # model
    Unsupported(ModelConfig, "arch", lambda v, s: v is not None and s.resolved_arch not in SUPPORTED_ARCHS
                and s.resolved_arch not in NO_DIFFUSERS_CLASS_ARCHS, "architecture {value}", UNKNOWN_ARCH),
    Unsupported(ModelConfig, "arch", lambda v, s: v is not None and s.resolved_arch in NO_DIFFUSERS_CLASS_ARCHS
                and s.resolved_arch not in SUPPORTED_ARCHS, "architecture {value}", NO_DIFFUSERS_CLASS),
    Unsupported(ModelConfig, "model_kwargs", lambda v, s: s.resolved_arch == "flex2" and bool(_flex2_option_problems(s)),
                "Flex.2 training options outside their range ({value}: each chance is a number from 0 to 1, "
                "do_random_inpainting / random_blur_mask / random_dialate_mask are true or false)", FAILS),
    Unsupported(ModelConfig, "qtype", lambda v, s: v is not None and "|" in v and not s.quantize,
                "an accuracy recovery adapter without model.quantize: true",
                "it is not loaded (set model.quantize: true to quantize and add it)"),
    Unsupported(ProcessConfig, "datasets",
                lambda v, s: any(d.control_path for d in v) and s.model.resolved_arch in SUPPORTED_ARCHS
                and s.model.resolved_arch not in CONTROL_ARCHS,
                "control images (datasets[].control_path) on a model that does not take them (edit models "
                "such as flux_kontext do)", "they are loaded but not used"),
    Unsupported(ModelConfig, "assistant_lora_path",
                lambda v, s: v is not None and s.resolved_arch not in ASSISTANT_LORA_ARCHS,
                f"an assistant LoRA on this model (only {', '.join(sorted(ASSISTANT_LORA_ARCHS))} load one)", IGNORED),
    Unsupported(ModelConfig, "extras_name_or_path",
                lambda v, s: v is not None and s.resolved_arch in SUPPORTED_ARCHS
                and s.resolved_arch not in EXTRAS_PATH_ARCHS,
                f"extras_name_or_path on this model (only {', '.join(sorted(EXTRAS_PATH_ARCHS))} read it; the "
                "other families load every part from name_or_path)", IGNORED),
    Unsupported(ProcessConfig, "train", lambda v, s: s.model.resolved_arch in MASKED_ATTENTION_ARCHS
                and _unmasked_backend(v) is not None,
                "an attention kernel without an attention mask on a model that masks its text's padding "
                "(train.attention_backend / xformers: use native, _native_efficient, _native_cudnn or xformers)",
                FAILS),
    Unsupported(ProcessConfig, "train.bypass_guidance_embedding",
                lambda v, s: v is True and s.model.resolved_arch not in ("flux", "flux_kontext", "flex2"),
                "bypass_guidance_embedding on a model without a guidance embedding (only FLUX.1 dev, Kontext, "
                "Flex.1 and Flex.2, model.arch flux / flux_kontext / flex2, have one: remove the key)", FAILS),
    Unsupported(ProcessConfig, "train.compile", lambda v, s: v is True and s.model.layer_offloading is True,
                "train.compile with model.layer_offloading (offloaded blocks' weights change device every step, "
                "so their compiled code would be rebuilt each time): use one or the other", FAILS),
    Unsupported(ProcessConfig, "model.layer_offloading", lambda v, s: v is True and s.network is None,
                "layer offloading in a full fine-tune (no network: section; offloading moves frozen weights "
                "only, and here every denoiser weight trains: use a LoRA, or FSDP across GPUs)", FAILS),
    # datasets
    # sample: previews asking for what the model's previews cannot take (aitk.config.prompts)
    Unsupported(ProcessConfig, "sample", lambda v, s: "ctrl_img" in preview_issues(s),
                "a preview control image (ctrl_img, --ctrl_img) on a model that takes none (flux_kontext edits it, "
                "wan21_i2v / wan22_14b_i2v start from it)"),
    Unsupported(ProcessConfig, "sample", lambda v, s: "ctrl_img_n" in preview_issues(s),
                "numbered preview control images (a samples entry's ctrl_img_1 .. ctrl_img_3) on a model that reads "
                "one (qwen_image_edit_plus reads up to three; give the one image as ctrl_img)"),
    Unsupported(ProcessConfig, "sample", lambda v, s: "num_frames" in preview_issues(s),
                "video previews (num_frames above 1, --frames, --fps) on an image model",
                "it is ignored; previews are images"),
    Unsupported(ProcessConfig, "sample", lambda v, s: "negative" in preview_issues(s),
                "a negative preview prompt (neg, --n) on FLUX, whose previews run without classifier-free guidance"),
    Unsupported(ProcessConfig, "sample", lambda v, s: "prompt_2" in preview_issues(s),
                "--p2 / --n2 (prompts of SDXL's second text encoder) other than on SDXL without cache_text_embeddings"),
    Unsupported(ProcessConfig, "sample", lambda v, s: "guidance_rescale" in preview_issues(s),
                "guidance rescale (guidance_rescale, --gr) on a model whose pipeline has none (SD, SDXL and LTX-2 have it)"),
    Unsupported(ProcessConfig, "sample", lambda v, s: "ai_toolkit_only" in preview_issues(s),
                f"the preview flags {', '.join('--' + f for f in AI_TOOLKIT_ONLY_FLAGS)} (adapter scale, SDXL "
                "refiner, custom-adapter values, Flex.2 control index)"),
    Unsupported(ProcessConfig, "sample", lambda v, s: "no_first_frame" in preview_issues(s),
                "a preview without a first frame on an image-to-video model (set sample.ctrl_img, the entry's "
                "ctrl_img or --ctrl_img <image> in each prompt)", "those previews are skipped"),
    Unsupported(ProcessConfig, "sample", lambda v, s: "no_control_image" in preview_issues(s)
                and s.model.resolved_arch not in OPTIONAL_CONTROL_ARCHS,
                "a flux_kontext preview without a control image to edit (or a qwen_image_edit(_plus) one; set "
                "sample.ctrl_img, the entry's ctrl_img or --ctrl_img <image> in each prompt)",
                "those previews render from the prompt alone (Qwen-Image-Edit: edit a grey image)"),
    # train
    # train_text_encoder (aitk/networks/text_encoders.py): a LoRA on SD / SDXL's CLIP encoders
    Unsupported(ProcessConfig, "train.train_text_encoder",
                lambda v, s: v is True and s.model.resolved_arch in SUPPORTED_ARCHS
                and s.model.resolved_arch not in TEXT_ENCODER_LORA_ARCHS,
                "training the text encoder of this model family (a text-encoder LoRA trains on "
                f"{' / '.join(sorted(TEXT_ENCODER_LORA_ARCHS))})",
                f"{FAILS}; set train_text_encoder: false"),
    Unsupported(ProcessConfig, "train.train_text_encoder",
                lambda v, s: v is True and (s.network is None or s.network.type not in TEXT_ENCODER_NETWORK_TYPES),
                "training the text encoder with a network that is no LoRA (LoKr, LoHa, or a full fine-tune "
                "without network:)",
                f"{FAILS}; the text encoder trains as a LoRA: set network.type to "
                f"{', '.join(TEXT_ENCODER_NETWORK_TYPES)}, or train_text_encoder: false"),
    Unsupported(ProcessConfig, "train.train_text_encoder",
                lambda v, s: v is True and (s.train.cache_text_embeddings or any(d.cache_text_embeddings for d in s.datasets)),
                "training the text encoder with cache_text_embeddings (train: or a dataset's; cached embeddings "
                "cannot follow a text encoder that trains, and caching releases it)",
                f"{FAILS}; set cache_text_embeddings: false, or train_text_encoder: false"),
    Unsupported(ProcessConfig, "train.train_text_encoder",
                lambda v, s: v is True and s.train.unload_text_encoder,
                "training the text encoder with train.unload_text_encoder (a text encoder that trains must stay "
                "loaded)", f"{FAILS}; remove unload_text_encoder, or set train_text_encoder: false"),
    Unsupported(ProcessConfig, "train.noise_scheduler", _refused_for(NOISE_SCHEDULERS, DDPM_NOISE_SCHEDULERS),
                "noise_scheduler {value} on a Stable Diffusion model (SD 1.x / 2.x and SDXL train DDPM's "
                "forward process; ai-toolkit's flowmatch would retrain the model as a flow-matching one)",
                f"{FAILS}; use one of {', '.join(DDPM_NOISE_SCHEDULERS)} (all train the same way), "
                "or leave it unset"),
    Unsupported(ProcessConfig, "train.noise_scheduler", _refused_for(NOISE_SCHEDULERS, FLOW_NOISE_SCHEDULERS),
                "noise_scheduler {value} on a flow-matching model (FLUX and WAN train with flow matching only)",
                f"{FAILS}; use {' / '.join(FLOW_NOISE_SCHEDULERS)}, or leave it unset"),
    Unsupported(ProcessConfig, "train.timestep_type", _refused_for(TIMESTEP_TYPES, DDPM_TIMESTEP_TYPES),
                "timestep_type {value} on a Stable Diffusion model (DDPM timesteps; ai-toolkit's weighted is a "
                "loss weighting made for flow-matching models)",
                f"{FAILS}; use one of {', '.join(DDPM_TIMESTEP_TYPES)}, or leave it unset (uniform)"),
    Unsupported(TrainConfig, "train_unet", lambda v, s: v is False,
                "train_unet: false (text-encoder-only training)", FAILS),
    Unsupported(DatasetConfig, "bucket_tolerance", lambda v, s: v != 64, "bucket_tolerance",
                "it is ignored; buckets are the closest aspect ratio that fits inside each image"),
    Unsupported(ProcessConfig, "log_dir", _is_set, "log_dir (TensorBoard logs)",
                "it is ignored; metrics go to metrics_<name>.jsonl in the output folder"),
    Unsupported(LoggingConfig, "use_wandb", lambda v, s: v is True and _not_installed("wandb"),
                "logging to Weights & Biases without the wandb library (not installed here)",
                f"{FAILS}; fix: pip install wandb"),
    Unsupported(ModelConfig, "dtype", _is_set, "model.dtype",
                "it is ignored; the frozen model runs in train.dtype"),
    # FSDP (aitk/trainer/fsdp.py checks the same at start, also when the launcher asks for FSDP)
    Unsupported(ProcessConfig, "train.fsdp", lambda v, s: v is True and s.network is not None,
                "FSDP with a network: section (FSDP shards full fine-tunes: remove network: to fine-tune "
                "the whole model, or remove train.fsdp to train the network data-parallel)", FAILS),
    Unsupported(ProcessConfig, "train.fsdp", lambda v, s: v is True and s.train.optimizer not in FSDP_OPTIMIZERS,
                f"FSDP with an optimizer other than {', '.join(FSDP_OPTIMIZERS)}", FAILS),
]

# Keys ostris/ai-toolkit accepts that the schema does not model: (section, key) -> rule.
# `active` gets the raw value; rows with _never are recognised and harmless (their parent
# option already warns, or the value changes nothing here).
AI_TOOLKIT_KEYS: dict[tuple[type[Section], str], Unsupported] = {
    (row.section, row.key): row
    for row in [
        Unsupported(ProcessConfig, "sqlite_db_path", _never, "the ai-toolkit UI database"),
        Unsupported(TrainConfig, "diff_output_preservation", _truthy,
                    "differential output preservation"),
        Unsupported(TrainConfig, "diff_output_preservation_multiplier", _never, ""),
        Unsupported(TrainConfig, "diff_output_preservation_class", _never, ""),
        Unsupported(ModelConfig, "qtype_te", _never, ""),  # used by quantize_te
        Unsupported(ModelConfig, "inference_lora_path", _truthy, "an inference LoRA"),
        Unsupported(DatasetConfig, "mask_min_value", _never, ""),
        Unsupported(DatasetConfig, "network_weight", lambda v, s: v not in (None, 1, 1.0),
                    "per-dataset network weights"),
        Unsupported(DatasetConfig, "controls", _truthy,
                    "control images generated while training (depth / line / pose / inpaint; give your own with "
                    "control_path)"),
        Unsupported(SamplePrompt, "ctrl_idx", _is_set, "ctrl_idx (Flex.2's control index)"),
    ]
}


def is_known_extra(section: type[BaseModel], key: str) -> bool:
    """Whether an extra (non-schema) key is a recognised ai-toolkit option, not a typo."""
    return any((cls, key) in AI_TOOLKIT_KEYS for cls in section.__mro__)


def render_path(parts: list[str | int] | tuple[str | int, ...]) -> str:
    """('config', 'process', 0, 'train', 'lr') -> 'config.process[0].train.lr'."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part and all(c.isalnum() or c in "_-" for c in part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out or "(top level)"


def walk_sections(model: BaseModel, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], BaseModel]]:
    """Every section of a validated job (itself first) with its key path, in file order."""
    yield path, model
    for name in type(model).model_fields:
        value = getattr(model, name, None)
        if isinstance(value, BaseModel):
            yield from walk_sections(value, path + (name,))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from walk_sections(item, path + (name, i))
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, BaseModel):
                    yield from walk_sections(item, path + (name, str(key)))


def _lookup(section: Any, dotted: str) -> tuple[bool, Any]:
    value = section
    for attr in dotted.split("."):
        if value is None:
            return False, None
        value = getattr(value, attr, None)
    return True, value


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _message(path: tuple[str | int, ...], row: Unsupported, value: Any) -> str:
    what = row.what.replace("{value}", _fmt(value))
    return f"{render_path(path + tuple(row.key.split('.')))}: {what} is not supported yet; {row.outcome}"


def unsupported_failures(job: JobFile) -> list[str]:
    """The unsupported settings that stop a run at start (a subset of unsupported_warnings)."""
    return [_message(path, row, value) for path, row, value in _active_rows(job) if row.fails]


def _active_rows(job: JobFile) -> Iterator[tuple[tuple[str | int, ...], Unsupported, Any]]:
    for path, section in walk_sections(job):
        for row in UNSUPPORTED:
            if isinstance(section, row.section):
                found, value = _lookup(section, row.key)
                if found and row.active(value, section):
                    yield path, row, value


def unsupported_warnings(job: JobFile) -> list[str]:
    """One warning per known-but-unsupported setting in the job, in file order."""
    warnings = [_message(path, row, value) for path, row, value in _active_rows(job)]
    for path, section in walk_sections(job):
        for key, value in (section.model_extra or {}).items():
            row = next(
                (AI_TOOLKIT_KEYS[(cls, key)] for cls in type(section).__mro__ if (cls, key) in AI_TOOLKIT_KEYS),
                None,
            )
            if row is not None and row.active(value, section):
                warnings.append(
                    f"{render_path(path + (key,))}: {row.what.replace('{value}', _fmt(value))} "
                    f"(an ai-toolkit option) is not supported yet; {row.outcome}"
                )
    return warnings
