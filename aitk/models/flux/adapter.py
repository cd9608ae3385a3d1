"""FLUX.1 (dev, schnell, Kontext): FluxTransformer2DModel + 16-channel VAE + CLIP-L (pooled) + T5.

Training is rectified flow (aitk.models.flow_matching): x = (1 - sigma) * x0 + sigma * noise,
target = noise - x0, the transformer gets timestep sigma (diffusers' Flux transformer multiplies
by 1000 itself; NoisyBatch.timesteps holds 1000 * sigma, the scheduler convention).
timestep_type "shift" (and ai-toolkit's "flux_shift" / "lumina2_shift", the same draw there) uses
FLUX's resolution-dependent time shift, mu = FluxPipeline's calculate_shift(image token count) with
the scheduler's base/max shift and sequence lengths; "weighted" draws uniform sigmas and weights
each sample's loss (aitk.models.flow_timestep_types).

Latents stay (B, 16, h, w) in NoisyBatch and in predictions, so loss masks apply as for other
models; `predict` packs them into 2x2-patch tokens with the ids FluxPipeline builds.

- dev (guidance-distilled, transformer.config.guidance_embeds): trained with guidance
  model.model_kwargs.guidance (default 1.0). schnell has no guidance embedding.
  train.bypass_guidance_embedding (Flex.1): training steps leave the guidance embedding out of the
  conditioning vector (timestep + pooled text only; its output is replaced by zeros while the
  transformer runs), so the guidance embedder is neither used nor trained; previews keep it.
- model.assistant_lora_path: a LoRA (any format FluxPipeline.lora_state_dict reads) loaded by
  diffusers as the peft adapter "assistant": active while training, switched off inside
  `preview_context()`, never part of the trained network or the saved file.
- Kontext (FluxKontextAdapter, aitk.models.flux.kontext): each sample's control image is
  VAE-encoded, packed and appended to the image tokens with ids whose first axis is 1; only the
  target tokens are predicted and compared.

LoRA files (save_format comfyui / kohya): `transformer.<module path>.lora_A.weight`,
`.lora_B.weight` and `.alpha`: diffusers' FluxPipeline.load_lora_weights reads the per-module
alpha only next to lora_A / lora_B (with lora_down / lora_up it drops it), and ComfyUI maps the
same names (docs/lora-formats.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models import common
from aitk.models.base import BatchContext, ModelAdapter, ModelLoadError, NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.flux.keys import flux_lora_candidates, is_flux_lora
from aitk.models.flux.latents import (
    FluxInputError,
    encode_flux_latents,
    image_ids,
    image_seq_shift,
    pack_latents,
    unpack_latents,
)

ASSISTANT_ADAPTER = "assistant"
SINGLE_FILE_SUFFIXES = {".safetensors", ".sft", ".ckpt"}
FOLDER_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


@contextmanager
def guidance_embedding_bypassed(transformer: torch.nn.Module) -> Iterator[None]:
    """While open, the guidance embedder's output is zeros: the conditioning vector is timestep +
    pooled text embedding only (train.bypass_guidance_embedding), and no gradient reaches it."""
    embedder = getattr(getattr(transformer, "time_text_embed", None), "guidance_embedder", None)
    if embedder is None:
        raise FluxInputError("train.bypass_guidance_embedding: this transformer has no guidance embedder")
    handle = embedder.register_forward_hook(lambda _module, _args, output: torch.zeros_like(output))
    try:
        yield
    finally:
        handle.remove()


class FluxAdapter(ModelAdapter):
    arch_names = ("flux",)
    text_encoder_names = ("text_encoder", "text_encoder_2")
    bucket_divisibility = 16  # 8x VAE downscale x 2x2 token patches
    lora_prefix = "transformer."  # dotted module paths: transformer.<path>
    #: lora_A / lora_B names next to `.alpha` (read by aitk.networks.export.save_lora)
    lora_weight_names = ("lora_A", "lora_B")
    diffusers_lora_prefix = "transformer"
    base_model_version = "flux1"
    modelspec_architecture = "flux-1-dev/lora"
    #: modelspec architecture when the loaded transformer has no guidance embedding
    schnell_architecture = "flux-1-schnell/lora"
    modelspec_implementation = "https://github.com/black-forest-labs/flux"
    model_label = "FLUX.1"
    pipeline_name = "FluxPipeline"
    denoiser_names = ("transformer",)
    card_tags = ("flux",)
    # the dev models' licence; schnell's is Apache 2.0 (card_license_fields)
    card_license = {
        "license": "other",
        "license_name": "flux-1-dev-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
    }

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    text_encoder_2: Any
    tokenizer_2: Any
    scheduler_config: Any

    @classmethod
    def card_license_fields(cls, base_model: str) -> dict[str, str]:
        if "schnell" in base_model.lower():
            return {"license": "apache-2.0"}
        return super().card_license_fields(base_model)

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return is_flux_lora(tensors)

    # --- loading -------------------------------------------------------------------------
    def load(self) -> None:
        source = self.model_cfg.name_or_path
        path = Path(source).expanduser()
        folder_hint = (
            "give a diffusers folder (model_index.json with "
            + ", ".join(f"{p}/" for p in FOLDER_PARTS)
            + ") or a hub id (owner/name)"
        )
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(
                f"model.name_or_path: {source!r} is a single file; {self.model_label} loads from a "
                f"diffusers folder or hub id only in this version; {folder_hint}"
            )
        if not common.could_be_hub_id(source) and not path.exists():
            raise ModelLoadError(
                f"model.name_or_path: {source!r} is neither an existing folder nor a hub id; {folder_hint}"
            )
        if path.exists() and not path.is_dir():
            raise ModelLoadError(f"model.name_or_path: {source!r} is a file, not a folder; {folder_hint}")
        location = str(path) if path.exists() else source
        try:
            scheduler_config = self._load_parts(location)
        except ModelLoadError:
            raise
        except Exception as exc:  # OSError for missing parts / hub look-ups, others for bad files
            where = folder_hint if path.exists() else (
                "no local folder of that name exists, so it was looked up as a hub id"
                f"{common.offline_note()}; {folder_hint}"
            )
            raise ModelLoadError(
                f"model.name_or_path: could not load a {self.model_label} model from {source!r}: {exc} ({where})"
            ) from exc
        common.freeze((self.transformer, self.vae, self.text_encoder, self.text_encoder_2))
        for module in (self.transformer, self.text_encoder, self.text_encoder_2):
            common.cast(module, self.dtype)
        common.cast(self.vae, torch.float32)  # encodes / decodes in fp32 whatever trains
        self.bind_loaded(scheduler_config)
        if self.model_cfg.assistant_lora_path:
            self._load_assistant(self.model_cfg.assistant_lora_path)

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        self.has_guidance = bool(self.transformer.config.guidance_embeds)
        self.modelspec_architecture = type(self).modelspec_architecture if self.has_guidance else self.schnell_architecture
        kwargs = self.model_cfg.model_kwargs
        self.train_guidance = float(kwargs.get("guidance", 1.0))
        # T5 tokens per prompt: FLUX dev uses 512, schnell 256; never more than the tokenizer allows
        wanted = int(kwargs.get("max_sequence_length", 512 if self.has_guidance else 256))
        self.max_sequence_length = min(wanted, int(configs.tokenizer_lengths.get("tokenizer_2", wanted)))
        # FlowMatchEuler's defaults (an empty config) are FLUX.1's shift settings
        self.scheduler_config = dict(configs.scheduler or {})
        self.vae_scale_factor = common.vae_scale_from_config(configs.part("vae"))
        self._preview_size: tuple[int, int] | None = None
        self._text_pipe: Any = None
        self.has_assistant = False

    def _load_parts(self, location: str) -> dict[str, Any]:
        """Load every part; returns the scheduler config."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        self.tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer")
        # torch_dtype at load: the host never holds a part in a wider dtype than it trains in
        self.text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", torch_dtype=self.dtype)
        self.tokenizer_2 = AutoTokenizer.from_pretrained(location, subfolder="tokenizer_2")
        self.text_encoder_2 = T5EncoderModel.from_pretrained(
            location, subfolder="text_encoder_2", torch_dtype=self.dtype
        )
        self.transformer = FluxTransformer2DModel.from_pretrained(
            location, subfolder="transformer", torch_dtype=self.dtype
        )
        self.vae = self._load_vae(location)
        return dict(FlowMatchEulerDiscreteScheduler.load_config(location, subfolder="scheduler"))

    def _load_vae(self, location: str) -> Any:
        """The model's vae/, or model.vae_path (a VAE folder, a pipeline folder with vae/, a hub id)."""
        from diffusers import AutoencoderKL

        vae_source = self.model_cfg.vae_path
        if not vae_source:
            return AutoencoderKL.from_pretrained(location, subfolder="vae")
        vae_path = Path(vae_source).expanduser()
        try:
            if vae_path.is_dir() and not (vae_path / "config.json").is_file():
                return AutoencoderKL.from_pretrained(str(vae_path), subfolder="vae")
            return AutoencoderKL.from_pretrained(str(vae_path) if vae_path.exists() else vae_source)
        except Exception as exc:
            raise ModelLoadError(
                f"model.vae_path: could not load a VAE from {vae_source!r}: {exc} (give a VAE folder with "
                f"config.json, a pipeline folder with vae/ or a hub id{common.offline_note()})"
            ) from exc

    def _load_assistant(self, source: str) -> None:
        """Load the assistant LoRA into the transformer as its own (frozen, active) peft adapter."""
        from diffusers import FluxPipeline

        from aitk.hub_files import HubFileError, resolve_lora_file

        key = "model.assistant_lora_path"
        try:  # a local file, owner/repo/file.safetensors, or a repo with one LoRA file (downloaded)
            path = resolve_lora_file(source, key=key)
        except HubFileError as exc:
            raise ModelLoadError(str(exc)) from exc
        try:
            state, alphas, metadata = FluxPipeline.lora_state_dict(
                str(path), return_alphas=True, return_lora_metadata=True
            )
        except Exception as exc:  # foreign key layouts make the converters raise anything
            raise ModelLoadError(f"{key}: {path} could not be read as a FLUX LoRA: {exc}") from exc
        state = {k: v for k, v in state.items() if k.startswith("transformer.")}
        modules = {k[len("transformer."):].split(".lora_")[0] for k in state if ".lora_" in k}
        known = {name for name, _ in self.transformer.named_modules()}
        unknown = sorted(modules - known)
        if not modules or unknown:
            detail = f"e.g. {unknown[:3]}" if unknown else "no transformer LoRA weights in it"
            raise ModelLoadError(
                f"{key}: {path} does not match this {self.model_label} transformer ({detail}); give a "
                "LoRA trained for this model"
            )
        alphas = {k: v for k, v in (alphas or {}).items() if k.startswith("transformer.")}
        try:
            FluxPipeline.load_lora_into_transformer(
                state, network_alphas=alphas or None, transformer=self.transformer,
                adapter_name=ASSISTANT_ADAPTER, metadata=metadata,
            )
        except Exception as exc:
            raise ModelLoadError(f"{key}: {path} could not be applied to the transformer: {exc}") from exc
        self.transformer.requires_grad_(False)
        self.has_assistant = True

    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def network_candidates(self, include_conv: bool) -> list[str]:
        return flux_lora_candidates(self.transformer)  # FLUX has no conv layers to add for LoCon

    # --- encoding ------------------------------------------------------------------------
    def _pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_name)

    def _pipeline(self, scheduler: Any | None = None) -> Any:
        import diffusers

        if scheduler is None:
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        return self._pipeline_class()(
            scheduler=scheduler,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            transformer=self.transformer,
        )

    def release_text_encoders(self) -> int:
        self._text_pipe = None  # it holds the encoders too
        return super().release_text_encoders()

    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        # FLUX previews run without classifier-free guidance (true_cfg_scale 1): no negative needed
        return {"prompt_embeds": positive.hidden_states, "pooled_prompt_embeds": positive.extra["pooled"]}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        # The pipeline's own encoder, so training sees exactly what previews and other tools see.
        if self._text_pipe is None:
            self._text_pipe = self._pipeline()
        hidden, pooled, _ = self._text_pipe.encode_prompt(
            prompt=list(prompts), device=self.device, max_sequence_length=self.max_sequence_length
        )
        return PromptEmbeds(hidden, {"pooled": pooled})

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_flux_latents(self.vae, pixels, self.device)

    def text_encoder_id(self) -> str:
        # the T5 length is part of the embedding's shape: a cache of another length must not be reused
        return f"{self.modelspec_architecture}|{self.model_cfg.name_or_path}|t5:{self.max_sequence_length}"

    def latent_space_id(self) -> str:
        cfg = self.vae.config
        return (
            f"flux-vae:{cfg.latent_channels}:{cfg.scaling_factor}:{cfg.shift_factor}:"
            f"{self.model_cfg.vae_path or self.model_cfg.name_or_path}"
        )

    # --- training objective --------------------------------------------------------------
    def check_train_settings(self, train_cfg: Any) -> None:
        from aitk.models.flow_matching import check_train_config

        check_train_config(train_cfg, self.model_label)
        if train_cfg.bypass_guidance_embedding and not self.has_guidance:
            raise FluxInputError(
                f"train.bypass_guidance_embedding: this {self.model_label} transformer has no guidance "
                "embedding (transformer config guidance_embeds is false, as in FLUX.1 schnell), so there is "
                "nothing to bypass; remove the key (it is for guidance-distilled models: FLUX.1 dev, Flex.1)"
            )

    def make_noisy_batch(
        self,
        latents: torch.Tensor,
        train_cfg: TrainConfig,
        generator: torch.Generator | None,
        context: BatchContext | None = None,
    ) -> NoisyBatch:
        from aitk.models.flow_matching import noisy_and_target, sample_sigmas
        from aitk.models.flow_timestep_types import weighted_loss
        from aitk.models.noise import apply_noise_offset

        self.check_train_settings(train_cfg)
        b, _, h, w = latents.shape
        if h % 2 or w % 2:
            raise FluxInputError(f"FLUX latents need an even height and width, got {h}x{w}")
        # noise levels first: the same seed then draws the same levels at every image size
        mu = image_seq_shift((h // 2) * (w // 2), self.scheduler_config)
        sigma = sample_sigmas(b, train_cfg, generator, mu=mu).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        noise = apply_noise_offset(noise, train_cfg.noise_offset, generator).to(latents.device)
        noisy, target = noisy_and_target(latents, noise, sigma)
        extra = self._batch_extra(latents, context)
        if train_cfg.bypass_guidance_embedding:
            extra["bypass_guidance"] = True
        weights = weighted_loss(sigma) if (train_cfg.timestep_type or "").lower() == "weighted" else None
        return NoisyBatch(noisy.to(self.dtype), sigma * 1000.0, target, weights, extra)

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        channels = config.in_channels // 4  # the transformer sees 2x2 patches of the latent channels
        h, w = size[1] // self.vae_scale_factor, size[0] // self.vae_scale_factor
        latents = torch.randn(batch, channels, h, w)
        extra: dict[str, Any] = {}
        if with_controls:
            extra["control_latents"] = torch.randn(batch, channels, h, w, dtype=self.dtype)
        noisy = NoisyBatch(latents.to(self.dtype), torch.rand(batch) * 1000.0, torch.randn(latents.shape), None, extra)
        cond = PromptEmbeds(
            torch.randn(batch, self.max_sequence_length, config.joint_attention_dim, dtype=self.dtype),
            {"pooled": torch.randn(batch, config.pooled_projection_dim, dtype=self.dtype)},
        )
        return noisy, cond

    def _batch_extra(self, latents: torch.Tensor, context: BatchContext | None) -> dict[str, Any]:
        """Model inputs beyond the noisy latents (Kontext: the control latents)."""
        return {}

    def _reference_tokens(self, batch: NoisyBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(tokens (B, M, 4C), ids (M, 3)) appended after the image tokens (Kontext), or None."""
        return None

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        x = batch.noisy_latents.to(self.dtype)
        b, c, h, w = x.shape
        tokens = pack_latents(x)
        ids = image_ids(h, w, x.device, self.dtype)
        reference = self._reference_tokens(batch)
        if reference is not None:
            tokens = torch.cat([tokens, reference[0].to(self.dtype)], dim=1)
            ids = torch.cat([ids, reference[1]], dim=0)
        hidden = cond.hidden_states.to(self.device, self.dtype)
        txt_ids = torch.zeros(hidden.shape[1], 3, device=x.device, dtype=self.dtype)
        guidance = None
        if self.has_guidance:
            guidance = torch.full((b,), self.train_guidance, device=x.device, dtype=torch.float32)
        bypass = batch.extra.get("bypass_guidance", False)
        with guidance_embedding_bypassed(self.transformer) if bypass else nullcontext():
            out = self.transformer(
                hidden_states=tokens,
                timestep=(batch.timesteps / 1000.0).to(x.device, self.dtype),
                guidance=guidance,
                pooled_projections=cond.extra["pooled"].to(self.device, self.dtype),
                encoder_hidden_states=hidden,
                txt_ids=txt_ids,
                img_ids=ids,
                return_dict=False,
            )[0]
        n = (h // 2) * (w // 2)  # the target's tokens come first; reference tokens are not predicted
        return unpack_latents(out[:, :n], h * self.vae_scale_factor, w * self.vae_scale_factor, self.vae_scale_factor)

    # --- previews ------------------------------------------------------------------------
    def sample_pipeline(self, sampler: str | None = None) -> Any:
        # FLUX previews with its own flow-match Euler scheduler whatever sample.sampler says
        # (preview_sampler_note says so at start).
        return self._pipeline()

    def preview_sampler_note(self, sampler: str) -> str | None:
        if sampler in ("flowmatch", "euler"):
            return None
        return f"flow-match Euler: {self.model_label} is a flow-matching model, {sampler} does not apply"

    def preview_context(self) -> AbstractContextManager[None]:
        return self._assistant_off() if self.has_assistant else nullcontext()

    @contextmanager
    def _assistant_off(self) -> Iterator[None]:
        """Previews show the trained LoRA on the plain base model: the assistant is switched off
        (peft's set_adapter also changes requires_grad, so that is restored afterwards)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [
            m for m in self.transformer.modules()
            if isinstance(m, BaseTunerLayer) and ASSISTANT_ADAPTER in getattr(m, "lora_A", {})
        ]
        active = {id(m): list(m.active_adapters) for m in layers}
        grads = [(p, p.requires_grad) for p in self.transformer.parameters()]
        try:
            for m in layers:
                m.set_adapter([a for a in active[id(m)] if a != ASSISTANT_ADAPTER])
            yield
        finally:
            for m in layers:
                m.set_adapter(active[id(m)])
            for p, flag in grads:
                p.requires_grad_(flag)

    def preview_kwargs(self, request: Any) -> dict[str, Any]:
        # The sampler snaps sizes to 8 px and the pipeline floors them to 16: remember the
        # result, because the packed latents it returns do not carry their image size.
        self._preview_size = (request.height // 16 * 16, request.width // 16 * 16)
        return {"max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        latents = latents.to(self.device, torch.float32)
        if latents.ndim == 3:  # packed tokens from the pipeline
            if self._preview_size is not None:
                height, width = self._preview_size
            else:  # no request seen: a square image
                side = int(round(latents.shape[1] ** 0.5)) * 2 * self.vae_scale_factor
                height = width = side
            latents = unpack_latents(latents, height, width, self.vae_scale_factor)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        pixels = self.vae.decode(latents).sample
        return common.pixels_to_pil(pixels, self.vae_scale_factor * 2)
