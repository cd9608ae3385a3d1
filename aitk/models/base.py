"""The model-adapter interface: everything the trainer needs to know about one architecture.

The trainer never names an architecture; it calls these methods. Flow-matching transformers
(FLUX, WAN) and multi-expert models (WAN 2.2) implement the same interface: `experts()` lists
the denoisers, `expert_for_timesteps()` says which one a timestep belongs to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aitk.config.schema import ModelConfig, TrainConfig


class ModelLoadError(RuntimeError):
    """A model (or a part named in model.*) that cannot be loaded; the message names the key and the fix."""


def release_modules(owner: Any, names: list[str]) -> int:
    """Set each attribute of `owner` named in `names` to None; returns the bytes of weights freed."""
    import gc

    freed = 0
    for name in names:
        module = getattr(owner, name, None)
        if module is None:
            continue
        freed += sum(p.numel() * p.element_size() for p in module.parameters())
        setattr(owner, name, None)
        del module
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return freed


@dataclass
class NoisyBatch:
    """What one training step feeds the denoiser and compares against."""

    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    # Per-sample loss weights from the model's objective (e.g. min-SNR); None = all ones.
    loss_weights: torch.Tensor | None = None
    # Model-specific inputs `predict` needs (SDXL time ids, FLUX image ids, control latents...).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchContext:
    """What the data knows about a batch beyond its latents, for the adapter's conditioning.

    Sizes are (height, width) in pixels: `original_sizes` is each image file's own size (before
    any resize, as SDXL's size conditioning expects), `crops_top_left` the (top, left) of the crop
    in the resized image, `target_sizes` the bucket.
    `controls`: paired control images (B, 3, H, W) in [-1, 1] (dataset control_path; edit models);
    `first_frames`: the first frame of each video (B, 3, H, W) in [-1, 1] (do_i2v);
    `expert`: the expert the trainer trains this step (multi-expert models), None = any.
    """

    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    crops_top_left: list[tuple[int, int]] = field(default_factory=list)
    target_sizes: list[tuple[int, int]] = field(default_factory=list)
    controls: torch.Tensor | None = None
    first_frames: torch.Tensor | None = None
    expert: str | None = None


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch; `extra` carries model-specific tensors (pooled, ids...)."""

    hidden_states: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PromptEmbeds":
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() and dtype else t.dtype)

        return PromptEmbeds(move(self.hidden_states), {k: move(v) for k, v in self.extra.items()})

    def select(self, index: torch.Tensor | list[int]) -> "PromptEmbeds":
        return PromptEmbeds(self.hidden_states[index], {k: v[index] for k, v in self.extra.items()})

    @staticmethod
    def cat(items: list["PromptEmbeds"]) -> "PromptEmbeds":
        """One batch of `items`. Embeddings of different token counts (Qwen-Image pads each prompt
        only to its own length) are right-padded with zeros to the longest, together with the
        extras that run along the tokens (dim 1 as long as the item's hidden states: a mask's
        zeros then mark the padding)."""
        keys = items[0].extra.keys()
        longest = max(i.hidden_states.shape[1] for i in items) if items[0].hidden_states.ndim > 1 else 0

        def padded(t: torch.Tensor, length: int) -> torch.Tensor:
            if t.ndim < 2 or t.shape[1] != length or length == longest:
                return t
            return torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, longest - length))

        return PromptEmbeds(
            torch.cat([padded(i.hidden_states, i.hidden_states.shape[1]) for i in items]),
            {k: torch.cat([padded(i.extra[k], i.hidden_states.shape[1]) for i in items]) for k in keys},
        )


@dataclass(frozen=True)
class PartConfigs:
    """The configs a model's adapter derives its facts from (`ModelAdapter.bind`).

    `parts`: part name ("unet", "transformer", "vae", "image_encoder"...) -> its config.json;
    `scheduler`: the scheduler's config (None = the family's default schedule);
    `boundary_ratio`: model_index.json's expert boundary (two-expert models; None = the default);
    `tokenizer_lengths`: tokenizer name -> model_max_length (absent = the family's default).
    `load()` gives the configs of what it loaded; `aitk plan` and the GPU benchmark give the
    configs of aitk.plan.sources.ModelSpec (no weights, no download).
    """

    parts: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    scheduler: Mapping[str, Any] | None = None
    boundary_ratio: float | None = None
    tokenizer_lengths: Mapping[str, int] = field(default_factory=dict)

    @staticmethod
    def of_loaded(
        parts: Mapping[str, torch.nn.Module],
        tokenizers: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None,
        boundary_ratio: float | None = None,
    ) -> "PartConfigs":
        """The configs of loaded modules and tokenizers (what `load()` binds with)."""
        return PartConfigs(
            {name: module_config(module) for name, module in parts.items() if isinstance(module, torch.nn.Module)},
            dict(scheduler) if scheduler is not None else None,
            boundary_ratio,
            {name: int(tokenizer.model_max_length) for name, tokenizer in tokenizers.items()},
        )

    def part(self, name: str) -> Mapping[str, Any]:
        """The config of part `name`; empty when not given (the family's defaults apply)."""
        return self.parts.get(name, {})


def module_config(module: Any) -> dict[str, Any]:
    """A loaded part's config as a dict (diffusers' FrozenDict or a transformers PretrainedConfig)."""
    config = module.config
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


class ModelAdapter(ABC):
    """One architecture family. Instances are created by `aitk.models.registry.load_adapter`."""

    #: architecture keys (model.arch) this adapter serves
    arch_names: tuple[str, ...] = ()
    #: pixel sizes of buckets must be multiples of this
    bucket_divisibility: int = 64
    #: prefix of the denoiser's LoRA keys in kohya/ComfyUI files (e.g. "lora_unet")
    lora_prefix: str = "lora_unet"
    #: (down, up) tensor names in comfyui / kohya files; FLUX needs lora_A / lora_B next to .alpha
    lora_weight_names: tuple[str, str] = ("lora_down", "lora_up")
    #: prefix of the denoiser's keys in diffusers (PEFT) LoRA files ("unet" / "transformer")
    diffusers_lora_prefix: str = "unet"
    #: layers diffusers splits that the original checkpoint, and ComfyUI, hold as one weight (q / k /
    #: v of a fused qkv): comfyui-layout files write each group as one LoRA on it. An
    #: aitk.networks.fused_files.FusedWeights from the family's keys module; None: no fused weights
    lora_fused_weights: Any = None
    #: comfyui / kohya files fold alpha / rank into the LoRA up weights and write no `.alpha` (the
    #: family's diffusers loader refuses `.alpha`); the header records the trained alphas
    #: (aitk.networks.folded_alpha)
    lora_alpha_in_weights: bool = False
    #: trained with DDPM's forward process (its noise schedulers and timestep types, archs.py's
    #: DDPM tables); flow matching otherwise
    trains_ddpm: bool = False
    #: video models: the frame counts the model accepts ("4k+1"); None = an image model
    frame_rule: str | None = None
    #: text-and-image-to-video models: a preview's ctrl_img, when given, is its first frame
    #: (archs.OPTIONAL_FIRST_FRAME_ARCHS)
    optional_first_frame: bool = False
    #: the dataset's control images are inputs of the model (edit models such as FLUX Kontext)
    uses_controls: bool = False
    #: the text encoder reads the prompt with the sample's control images (Qwen-Image-Edit): the
    #: trainer passes their files to `encode_prompts_with_controls` and keys cached embeddings on them
    prompt_reads_controls: bool = False
    #: the arch whose LoRA key names this family's files share (only their header tells them apart):
    #: `aitk lora info` names it on a guess from the keys
    lora_keys_shared_with: str | None = None
    #: attributes holding the denoisers (the parts `bind` accepts besides encoders and auxiliaries)
    denoiser_names: tuple[str, ...] = ("unet",)
    #: loaded with torch_dtype: diffusers keeps the modules a class names in
    #: `_keep_in_fp32_modules` in float32 (the plan and the benchmark build parts the same way)
    keeps_fp32_modules: bool = False
    #: attributes holding input processors `make_noisy_batch` runs (not modules; e.g. WAN 2.1
    #: I2V's CLIP image processor)
    processor_names: tuple[str, ...] = ()
    #: attributes holding the text encoders (released after caching, quantized by quantize_te)
    text_encoder_names: tuple[str, ...] = ()
    #: text encoder attribute -> kohya key prefix of its LoRA ("lora_te", "lora_te1"...): the
    #: encoders train.train_text_encoder trains (aitk.networks.text_encoders); empty: none can
    text_encoder_lora_prefixes: Mapping[str, str] = {}
    #: attributes holding the other frozen parts (VAE, image encoder): placed by aitk.models.placement
    auxiliary_names: tuple[str, ...] = ("vae",)
    #: of those, the parts a training step runs even when latents are cached (e.g. the VAE that
    #: encodes Kontext's control images or WAN I2V's first frames)
    step_auxiliary_names: tuple[str, ...] = ()
    #: of those, the parts `encode_images` runs (a step runs them when latents are not cached)
    latent_encoder_names: tuple[str, ...] = ("vae",)
    #: ss_base_model_version / modelspec.architecture metadata values
    base_model_version: str = ""
    modelspec_architecture: str = ""
    #: modelspec.implementation: where the model's reference code lives
    modelspec_implementation: str = "diffusers"
    #: component configs of a single-file checkpoint when model.model_kwargs.config is unset (the
    #: adapter and `aitk plan` read them); None: this family loads folders and hub ids only
    default_config_repo: str | None = None
    #: the Hub model card (aitk.hub): its pipeline_tag, the family's tags, and the base model's
    #: licence as front-matter fields (license, license_name, license_link); empty: none written
    card_pipeline_tag: str = "text-to-image"
    card_tags: tuple[str, ...] = ()
    card_license: Mapping[str, str] = {}

    @classmethod
    def card_license_fields(cls, base_model: str) -> dict[str, str]:
        """The model card's licence fields for a LoRA of `base_model` (a hub id or path): the
        family's `card_license` unless a family's models differ (FLUX.1 schnell from dev)."""
        return dict(cls.card_license)

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Whether a network file whose header names no architecture was trained on this model,
        judged by its key names and shapes (`aitk lora info`'s guess). Default: never."""
        return False

    def __init__(self, model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.model_cfg = model_cfg
        self.device = device
        self.dtype = dtype

    # --- loading -------------------------------------------------------------------------
    @abstractmethod
    def load(self) -> None:
        """Load every part (from a diffusers folder, hub id or single file) into host memory in
        its training dtype (the VAE in fp32), frozen. Nothing goes to self.device here: the
        trainer places the parts (aitk.trainer.placing), quantizing and offloading on the way."""

    def bind(self, parts: Mapping[str, Any], configs: PartConfigs) -> None:
        """Take `parts` (attribute name -> module: at least the denoisers; encoders, VAE and the
        input processors a step runs (`processor_names`) when given) as they are, and set every
        fact `make_noisy_batch`, `predict` and `example_batch` read from `configs`. `load()`
        ends here with what it loaded, so a model bound to modules built elsewhere (the plan's
        fake ones, the benchmark's random ones) behaves as loaded. It never casts, freezes or
        moves the modules. Families extend this (super().bind first)."""
        allowed = (*self.denoiser_names, *self.text_encoder_names, *self.auxiliary_names, *self.processor_names)
        unknown = sorted(set(parts) - set(allowed))
        if unknown:
            raise ValueError(f"{type(self).__name__}.bind: unknown parts {unknown}; it takes {list(allowed)}")
        for name, module in parts.items():
            setattr(self, name, module)
        self.part_configs = configs

    def loaded_parts(self) -> dict[str, Any]:
        """The parts this adapter holds (denoisers, text encoders, auxiliaries, processors), by
        attribute name: what `bind` takes."""
        names = (*self.denoiser_names, *self.text_encoder_names, *self.auxiliary_names, *self.processor_names)
        found = {name: getattr(self, name, None) for name in names}
        return {name: module for name, module in found.items() if module is not None}

    def bind_loaded(self, scheduler: Mapping[str, Any] | None, boundary_ratio: float | None = None) -> None:
        """`load()`'s last step: bind the parts it loaded with their own configs, so a loaded and
        a bound adapter derive their facts in one place. Tokenizers pair with text encoders by
        name (text_encoder_2 -> tokenizer_2)."""
        tokenizer_names = [name.replace("text_encoder", "tokenizer") for name in self.text_encoder_names]
        tokenizers = {name: getattr(self, name) for name in tokenizer_names if getattr(self, name, None) is not None}
        parts = self.loaded_parts()
        self.bind(parts, PartConfigs.of_loaded(parts, tokenizers, scheduler, boundary_ratio))

    def keep_of_text_encoder(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        """What the adapter keeps of its loaded text encoder `name` (e.g. without the vision tower a
        text-only prompt never runs); `aitk plan` applies it to the weights-free copy too, so the plan
        counts what training holds. Default: all of it."""
        return module

    def fixed_shape_step(self) -> AbstractContextManager[None]:
        """While `aitk plan` traces a step on fake tensors (no values): patches that give the step
        shapes known without data, for families whose shapes follow it (expert routing, prompt
        lengths read from a mask); each says how it bounds them. Default: none needed."""
        return nullcontext()

    @abstractmethod
    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        """Random inputs of `predict` with the shapes the trainer feeds it for one batch of
        `batch` samples of the bucket `size` (width, height in pixels) and `frames` frames (1 for
        images), for `expert`, with the control inputs when `with_controls` (edit models): what
        `make_noisy_batch` would return and `encode_prompts` would give, without running the
        VAE, text encoders or noise draws. Needs `bind` (or `load`) first; tensors are made on
        the current default device (the plan makes them inside a fake-tensor mode)."""

    @abstractmethod
    def denoiser(self) -> torch.nn.Module:
        """The module a network wraps and the trainer trains (UNet or transformer)."""

    def experts(self) -> dict[str, torch.nn.Module]:
        """Named denoisers; single-model architectures have one, named "main"."""
        return {"main": self.denoiser()}

    def offload_blocks(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        """The repeated blocks of a denoiser or text encoder, in the order they run: what layer
        offloading and block-wise quantization move one at a time. Default: the blocks diffusers /
        transformers name on the model class (aitk.models.offload.repeated_blocks)."""
        from aitk.models.offload import repeated_blocks

        return repeated_blocks(module)

    def auxiliary_modules(self) -> dict[str, torch.nn.Module]:
        """The loaded frozen parts besides denoisers and text encoders, by attribute name."""
        found = {name: getattr(self, name, None) for name in self.auxiliary_names}
        return {name: module for name, module in found.items() if module is not None}

    def expert_for_timesteps(self, timesteps: torch.Tensor) -> str:
        return "main"

    def trained_experts(self) -> list[str]:
        """The experts this job trains, in alternation order (WAN 2.2: model_kwargs.train_high_noise /
        train_low_noise choose). Each gets its own network and LoRA file."""
        return list(self.experts())

    def lora_key_stem(self, module_name: str) -> str:
        """Key stem of one wrapped denoiser module in comfyui / kohya files (ComfyUI's naming).

        Default: kohya style, `lora_prefix` + module path with "." -> "_". Models whose ComfyUI
        names differ from diffusers' module paths (WAN) override this.
        """
        from aitk.networks.export import kohya_module_key

        return kohya_module_key(self.lora_prefix, module_name)

    def network_candidates(self, include_conv: bool) -> list[str] | None:
        """Module names of the denoiser a network may wrap by default (None = every Linear/Conv).

        `include_conv` is true for LoCon (a conv rank is set): the kxk convs join the candidates.
        """
        return None

    # --- encoding ------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Text conditioning for `prompts` (on self.device). Families whose text encoders can
        train (`text_encoder_lora_prefixes`) leave gradients to the caller, which encodes under
        torch.no_grad() unless a text-encoder network trains (aitk.trainer.conditioning)."""

    def encode_prompts_with_controls(self, prompts: list[str], controls: list[tuple[Path, ...]]) -> PromptEmbeds:
        """`encode_prompts`, each prompt read with its sample's control image files (`controls[i]`,
        in control_path order) where `prompt_reads_controls`; other models ignore the files."""
        return self.encode_prompts(prompts)

    def preview_control_files(self, request: Any) -> tuple[Path, ...]:
        """The control image files a preview's prompt is read with (`prompt_reads_controls`
        models; request: aitk.config.prompts.PreviewRequest). Default: none."""
        return ()

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents for pixel batches in [-1, 1], shape (B, 3, H, W); scaled for the denoiser."""

    def text_encoder_id(self) -> str:
        """Identifies the text conditioning, so cached text embeddings of another model are never reused."""
        return f"{self.modelspec_architecture}|{self.model_cfg.name_or_path}"

    def latent_space_id(self) -> str:
        """Identifies the latent space, so latent caches from another VAE are never reused."""
        return self.modelspec_architecture

    # --- training objective --------------------------------------------------------------
    @abstractmethod
    def make_noisy_batch(
        self,
        latents: torch.Tensor,
        train_cfg: TrainConfig,
        generator: torch.Generator | None,
        context: BatchContext | None = None,
    ) -> NoisyBatch:
        """Draw noise and timesteps, return noisy inputs, timesteps and the training target.

        `context` carries sizes, control images, first frames and the active expert; whatever
        `predict` needs from it goes into NoisyBatch.extra.
        """

    @abstractmethod
    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        """The denoiser's prediction for `batch` under conditioning `cond`."""

    # --- previews ------------------------------------------------------------------------
    @abstractmethod
    def sample_pipeline(self, sampler: str | None = None) -> Any:
        """A diffusers pipeline over the live (possibly network-wrapped) modules; `sampler` is
        sample.sampler (None = the model's default)."""

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The loaded text encoders by attribute name (`text_encoder_names`)."""
        found = {name: getattr(self, name, None) for name in self.text_encoder_names}
        return {name: module for name, module in found.items() if module is not None}

    def release_text_encoders(self) -> int:
        """Free the text encoders once every prompt is cached (cache_text_embeddings); returns the
        bytes of weights released, 0 when this model keeps them."""
        return release_modules(self, list(self.text_encoder_names))

    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        """Pipeline arguments giving a preview's prompt and negative prompt as embeddings (used
        once the text encoders are released)."""
        return {"prompt_embeds": positive.hidden_states, "negative_prompt_embeds": negative.hidden_states}

    def check_train_settings(self, train_cfg: Any) -> None:
        """Raise ValueError naming the train.* key when this loaded model cannot train with it
        (what the job file alone cannot tell, e.g. a guidance setting on a model without guidance).
        Called once after loading, before previews and the first step."""

    def preview_sampler_note(self, sampler: str) -> str | None:
        """When previews cannot use `sample.sampler`, what they use instead and why (None: the
        sampler asked for is the one used)."""
        return None

    def preview_context(self) -> AbstractContextManager[None]:
        """Entered around previews: e.g. FLUX schnell takes its assistant LoRA out for them."""
        return nullcontext()

    def preview_kwargs(self, request: Any) -> dict[str, Any]:
        """Extra keyword arguments of this model's pipeline call for one preview request
        (aitk.config.prompts.PreviewRequest): e.g. num_frames for video, the control image."""
        return {}

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        """From the pipeline's output latents (output_type="latent"): per sample, a PIL image,
        or for video models a list of PIL frames."""
