"""Chroma (lodestones' Chroma1-HD / -Base and the chroma-unlocked-vNN checkpoints): a FLUX.1-derived
transformer (ChromaTransformer2DModel) + FLUX's 16-channel VAE + T5-XXL, no CLIP, no guidance
embedding; each block's modulation comes from one distilled network (the "approximator",
distilled_guidance_layer) fed the timestep only.

Training is rectified flow as for FLUX (aitk.models.flow_matching): x = (1 - sigma) * x0 +
sigma * noise, target = noise - x0, NoisyBatch.timesteps = 1000 * sigma (the transformer gets
sigma). timestep_type "shift" / "flux_shift" / "lumina2_shift" use FLUX's resolution-dependent mu
(calculate_shift of the image token count with the scheduler's base / max shift), as ai-toolkit's
Chroma scheduler does; "weighted" weights each sample's loss. Latents stay (B, 16, h, w); `predict`
packs them into FLUX's 2x2-patch tokens and ids (imported from aitk.models.flux).

Text: the prompt through ChromaPipeline's own T5 encoding (attention-masked, max_sequence_length
tokens, default 512 as ai-toolkit), with Chroma's text mask (the prompt and one pad token) kept in
PromptEmbeds.extra["attention_mask"] and applied in the joint attention of every block, in training,
under gradient checkpointing and in previews alike (aitk.models.chroma.masking says why that needs
care in diffusers 0.42). Previews run ChromaPipeline's true classifier-free guidance with the
negative prompt (sample.guidance_scale, ai-toolkit's example uses 4).

LoRA targets are FLUX's: attention projections and feed-forward layers of the double and single
blocks; the approximator stays frozen (ai-toolkit runs it without gradients). Files name modules
`transformer.<module path>` with lora_A / lora_B and a per-module `.alpha`, which ChromaPipeline's
load_lora_weights (FluxLoraLoaderMixin) reads exactly and ComfyUI maps for Chroma as for FLUX
(docs/lora-formats.md). Buckets are multiples of 32 px, as ai-toolkit buckets Chroma.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models import common
from aitk.models.base import BatchContext, ModelAdapter, ModelLoadError, NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.chroma.masking import joint_mask, masked_checkpointing, preview_pipeline_class
from aitk.models.chroma.sources import DEFAULT_EXTRAS, FOLDER_HINT, ChromaSource, resolve
from aitk.models.flux import (
    FluxAdapter,
    FluxInputError,
    encode_flux_latents,
    flux_lora_candidates,
    image_ids,
    image_seq_shift,
    pack_latents,
    unpack_latents,
)

#: the text mask's key in PromptEmbeds.extra: (B, L) bool, the prompt's tokens and one pad token
MASK_KEY = "attention_mask"


class ChromaAdapter(ModelAdapter):
    arch_names = ("chroma",)
    text_encoder_names = ("text_encoder",)
    bucket_divisibility = 32  # ai-toolkit's Chroma value (the model itself needs 16: 8x VAE x 2x2 patches)
    lora_prefix = "transformer."  # dotted module paths: transformer.<path>, as FLUX
    lora_weight_names = ("lora_A", "lora_B")
    diffusers_lora_prefix = "transformer"
    base_model_version = "chroma"  # ai-toolkit's ss_base_model_version for Chroma
    modelspec_architecture = "chroma/lora"
    modelspec_implementation = "https://github.com/lodestone-rock/flow"  # lodestones' reference code
    #: a single transformer file takes its part configs (and the other parts) from here
    default_config_repo = DEFAULT_EXTRAS
    model_label = "Chroma"
    denoiser_names = ("transformer",)
    card_tags = ("chroma",)
    card_license = {"license": "apache-2.0"}  # every Chroma release

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        # the same key names (and widths) as FLUX.1's: a file without a header could be either
        return FluxAdapter.matches_lora_keys(tensors)

    # --- loading -------------------------------------------------------------------------
    def load(self) -> None:
        source = resolve(self.model_cfg.name_or_path, self.model_cfg.model_kwargs)
        try:
            scheduler_config = self._load_parts(source)
        except ModelLoadError:
            raise
        except Exception as exc:  # OSError for missing parts / hub look-ups, others for bad files
            where = "" if Path(source.folder).is_dir() else f" (looked up as a hub id{common.offline_note()})"
            what = repr(source.folder)
            if source.transformer_file:
                what = f"{source.transformer_file} with the other parts from {what}"
            raise ModelLoadError(
                f"model.name_or_path: could not load a Chroma model from {what}{where}: {exc}; {FOLDER_HINT}"
            ) from exc
        common.freeze((self.transformer, self.vae, self.text_encoder))
        for module in (self.transformer, self.text_encoder):
            common.cast(module, self.dtype)
        common.cast(self.vae, torch.float32)  # encodes / decodes in fp32 whatever trains
        self.bind_loaded(scheduler_config)

    def _load_parts(self, source: ChromaSource) -> dict[str, Any]:
        """Load every part (torch_dtype at load: the host never holds a wider copy); returns the
        scheduler config."""
        from diffusers import ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer, T5EncoderModel

        location = source.folder
        self.tokenizer = AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
        self.text_encoder = T5EncoderModel.from_pretrained(location, subfolder="text_encoder", torch_dtype=self.dtype)
        if source.transformer_file:
            self.transformer = ChromaTransformer2DModel.from_single_file(
                source.transformer_file, config=location, subfolder="transformer", torch_dtype=self.dtype
            )
        else:
            self.transformer = ChromaTransformer2DModel.from_pretrained(
                location, subfolder="transformer", torch_dtype=self.dtype
            )
        self.vae = self._load_vae(location)
        return dict(FlowMatchEulerDiscreteScheduler.load_config(location, subfolder="scheduler"))

    def _load_vae(self, location: str) -> Any:
        """The model's vae/, or model.vae_path: a VAE folder, a pipeline folder with vae/, a hub id."""
        from diffusers import AutoencoderKL

        wanted = self.model_cfg.vae_path
        if not wanted:
            return AutoencoderKL.from_pretrained(location, subfolder="vae")
        path = Path(wanted).expanduser()
        in_pipeline = path.is_dir() and (path / "vae" / "config.json").is_file()
        try:
            return AutoencoderKL.from_pretrained(str(path) if path.exists() else wanted,
                                                 subfolder="vae" if in_pipeline else None)
        except Exception as exc:
            raise ModelLoadError(
                f"model.vae_path: could not load a VAE from {wanted!r}: {exc} (give a VAE folder with "
                f"config.json, a pipeline folder with vae/ or a hub id{common.offline_note()})"
            ) from exc

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        wanted = int(self.model_cfg.model_kwargs.get("max_sequence_length", 512))
        # never more T5 tokens than the tokenizer allows (ChromaPipeline refuses more than 512)
        self.max_sequence_length = min(wanted, 512, int(configs.tokenizer_lengths.get("tokenizer", wanted)))
        # FlowMatchEuler's defaults (an empty config) are Chroma's and FLUX.1's shift settings
        self.scheduler_config = dict(configs.scheduler or {})
        self.vae_scale_factor = common.vae_scale_from_config(configs.part("vae"))
        self._preview_size: tuple[int, int] | None = None
        self._text_pipe: Any = None

    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def network_candidates(self, include_conv: bool) -> list[str]:
        return flux_lora_candidates(self.transformer)  # the same block layout; no convs for LoCon

    # --- encoding ------------------------------------------------------------------------
    def _pipeline(self) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return preview_pipeline_class()(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            transformer=self.transformer,
        )

    def release_text_encoders(self) -> int:
        self._text_pipe = None  # it holds the encoder too
        return super().release_text_encoders()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        # the pipeline's own encoding, so training sees exactly what previews see
        if self._text_pipe is None:
            self._text_pipe = self._pipeline()
        hidden, _, mask, *_ = self._text_pipe.encode_prompt(
            prompt=list(prompts), device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds(hidden, {MASK_KEY: mask.to(torch.bool)})

    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        return {
            "prompt_embeds": positive.hidden_states, "prompt_attention_mask": positive.extra[MASK_KEY],
            "negative_prompt_embeds": negative.hidden_states,
            "negative_prompt_attention_mask": negative.extra[MASK_KEY],
        }

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
        from aitk.models.attention import MASKED_BACKENDS, requested
        from aitk.models.flow_matching import check_train_config

        check_train_config(train_cfg, self.model_label)
        if train_cfg.bypass_guidance_embedding:
            raise FluxInputError(
                "train.bypass_guidance_embedding: Chroma has no guidance embedding (its modulation comes "
                "from the timestep alone); remove the key"
            )
        backend = requested(train_cfg)
        if backend is not None and backend[0] not in MASKED_BACKENDS:
            raise FluxInputError(
                f"{backend[1]}: that attention kernel takes no attention mask, and Chroma masks T5's padding "
                f"in every block; use one of {', '.join(MASKED_BACKENDS)} (or leave it unset)"
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
            raise FluxInputError(f"Chroma latents need an even height and width, got {h}x{w}")
        # noise levels first: the same seed then draws the same levels at every image size
        mu = image_seq_shift((h // 2) * (w // 2), self.scheduler_config)
        sigma = sample_sigmas(b, train_cfg, generator, mu=mu).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        noise = apply_noise_offset(noise, train_cfg.noise_offset, generator).to(latents.device)
        noisy, target = noisy_and_target(latents, noise, sigma)
        weights = weighted_loss(sigma) if (train_cfg.timestep_type or "").lower() == "weighted" else None
        return NoisyBatch(noisy.to(self.dtype), sigma * 1000.0, target, weights)

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        channels = config.in_channels // 4  # the transformer sees 2x2 patches of the latent channels
        h, w = size[1] // self.vae_scale_factor, size[0] // self.vae_scale_factor
        latents = torch.randn(batch, channels, h, w)
        noisy = NoisyBatch(latents.to(self.dtype), torch.rand(batch) * 1000.0, torch.randn(latents.shape))
        length = self.max_sequence_length
        mask = torch.arange(length).expand(batch, length) < length // 2  # half prompt, half padding
        hidden = torch.randn(batch, length, config.joint_attention_dim, dtype=self.dtype)
        return noisy, PromptEmbeds(hidden, {MASK_KEY: mask})

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        x = batch.noisy_latents.to(self.dtype)
        _, _, h, w = x.shape
        tokens = pack_latents(x)
        hidden = cond.hidden_states.to(self.device, self.dtype)
        mask = joint_mask(cond.extra[MASK_KEY].to(self.device), tokens.shape[1])
        with masked_checkpointing(self.transformer, mask):
            out = self.transformer(
                hidden_states=tokens,
                timestep=(batch.timesteps / 1000.0).to(x.device, self.dtype),
                encoder_hidden_states=hidden,
                txt_ids=torch.zeros(hidden.shape[1], 3, device=x.device, dtype=self.dtype),
                img_ids=image_ids(h, w, x.device, self.dtype),
                attention_mask=mask,
                return_dict=False,
            )[0]
        size = self.vae_scale_factor
        return unpack_latents(out, h * size, w * size, size)

    # --- previews ------------------------------------------------------------------------
    def sample_pipeline(self, sampler: str | None = None) -> Any:
        # flow-match Euler whatever sample.sampler says (preview_sampler_note says so at start)
        return self._pipeline()

    def preview_sampler_note(self, sampler: str) -> str | None:
        if sampler in ("flowmatch", "euler"):
            return None
        return f"flow-match Euler: {self.model_label} is a flow-matching model, {sampler} does not apply"

    def preview_kwargs(self, request: Any) -> dict[str, Any]:
        # The sampler snaps sizes to 8 px and the pipeline floors them to 16: remember the
        # result, because the packed latents it returns do not carry their image size.
        self._preview_size = (request.height // 16 * 16, request.width // 16 * 16)
        return {"max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        latents = latents.to(self.device, torch.float32)
        if latents.ndim == 3:  # packed tokens from the pipeline
            height, width = self._preview_size or (int(round(latents.shape[1] ** 0.5)) * 2 * self.vae_scale_factor,) * 2
            latents = unpack_latents(latents, height, width, self.vae_scale_factor)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return common.pixels_to_pil(self.vae.decode(latents).sample, self.vae_scale_factor * 2)
