"""The architectures this version trains: `model.arch` key -> adapter class (imported lazily).

Kept free of torch imports so that validating a job file stays fast.
"""

from __future__ import annotations

# arch key -> "module:Class"; modules are imported lazily so a job loads only its own family.
ADAPTERS: dict[str, str] = {
    "sd1": "aitk.models.sd:SD15Adapter",
    "sd15": "aitk.models.sd:SD15Adapter",
    "sd2": "aitk.models.sd:SD2Adapter",
    "sdxl": "aitk.models.sd:SDXLAdapter",
    "flux": "aitk.models.flux:FluxAdapter",
    "flux_kontext": "aitk.models.flux:FluxKontextAdapter",
    "chroma": "aitk.models.chroma:ChromaAdapter",
    "wan21": "aitk.models.wan:Wan21Adapter",
    "wan21_i2v": "aitk.models.wan:Wan21I2VAdapter",
    "wan22_14b": "aitk.models.wan:Wan22Adapter",
    "wan22_14b_i2v": "aitk.models.wan:Wan22I2VAdapter",
    "wan22_5b": "aitk.models.wan:Wan22TI2VAdapter",
    "sd3": "aitk.models.sd3:SD3Adapter",
    "zimage": "aitk.models.zimage:ZImageAdapter",
    "qwen_image": "aitk.models.qwen_image:QwenImageAdapter",
    "qwen_image_edit": "aitk.models.qwen_image_edit:QwenImageEditAdapter",
    "qwen_image_edit_plus": "aitk.models.qwen_image_edit:QwenImageEditPlusAdapter",
    "lumina2": "aitk.models.lumina2:Lumina2Adapter",
    "flex2": "aitk.models.flex2:Flex2Adapter",
    "pixart": "aitk.models.pixart:PixArtAlphaAdapter",
    "pixart_sigma": "aitk.models.pixart:PixArtSigmaAdapter",
    "auraflow": "aitk.models.auraflow:AuraFlowAdapter",
    "cogview4": "aitk.models.cogview4:CogView4Adapter",
    "flux2": "aitk.models.flux2:Flux2Adapter",
    "flux2_klein_4b": "aitk.models.flux2:Flux2Klein4BAdapter",
    "flux2_klein_9b": "aitk.models.flux2:Flux2Klein9BAdapter",
    "hidream": "aitk.models.hidream:HiDreamAdapter",
    "krea2": "aitk.models.krea2:Krea2Adapter",
    "ernie_image": "aitk.models.ernie_image:ErnieImageAdapter",
    "ltx2": "aitk.models.ltx2:LTX2Adapter",
    "hunyuan_video_1_5": "aitk.models.hunyuan_video_1_5:HunyuanVideo15Adapter",
    "hunyuan_video_1_5_i2v": "aitk.models.hunyuan_video_1_5:HunyuanVideo15I2VAdapter",
}


# What the data pipeline must know of each architecture without importing it (aitk dataset
# inspect loads no model): (bucket size multiple in pixels, accepted frame counts or None for
# image models). Each adapter class states the same values; a test keeps them in step.
DATA_FACTS: dict[str, tuple[int, str | None]] = {
    "sd1": (64, None),
    "sd15": (64, None),
    "sd2": (64, None),
    "sdxl": (64, None),
    "flux": (16, None),
    "flux_kontext": (16, None),
    "chroma": (32, None),  # ai-toolkit buckets Chroma by 32 px
    "wan21": (16, "4k+1"),
    "wan21_i2v": (16, "4k+1"),
    "wan22_14b": (16, "4k+1"),
    "wan22_14b_i2v": (16, "4k+1"),
    "wan22_5b": (32, "4k+1"),  # 16x VAE x 2x2 patches
    "sd3": (16, None),
    "zimage": (16, None),
    "qwen_image": (32, None),  # ai-toolkit buckets Qwen-Image by 32 px
    "qwen_image_edit": (32, None),
    "qwen_image_edit_plus": (32, None),
    "lumina2": (16, None),
    "flex2": (16, None),
    "pixart": (16, None),
    "pixart_sigma": (16, None),
    "auraflow": (16, None),
    "cogview4": (16, None),
    "flux2": (16, None),
    "flux2_klein_4b": (16, None),
    "flux2_klein_9b": (16, None),
    "hidream": (16, None),
    "krea2": (16, None),
    "ernie_image": (16, None),  # the pipeline's 16 px (ai-toolkit buckets ERNIE-Image by 32)
    "ltx2": (32, "8k+1"),  # LTX-2's VAE: 32x spatial, 8x temporal compression
    "hunyuan_video_1_5": (16, "4k+1"),  # 16x VAE, patch 1; 4x temporal compression
    "hunyuan_video_1_5_i2v": (16, "4k+1"),
}


# Architectures whose adapter takes the dataset's control images (ModelAdapter.uses_controls), so
# `aitk validate` can say that control_path is unused elsewhere without importing a model.
# (the edit models read them in the prompt too; Flex.2 as a group of input channels)
CONTROL_ARCHS: frozenset[str] = frozenset({"flux_kontext", "qwen_image_edit", "qwen_image_edit_plus", "flex2"})
#: of those, the archs whose control images are optional (zeros without one): previews and data
#: without a control image are plain text-to-image there
OPTIONAL_CONTROL_ARCHS: frozenset[str] = frozenset({"flex2"})
#: of those, the archs whose previews read several control images (sample ctrl_img_1 .. ctrl_img_3)
MULTI_CONTROL_PREVIEW_ARCHS: frozenset[str] = frozenset({"qwen_image_edit_plus"})

#: image-to-video archs: their adapters' `i2v` (a test keeps the two in step)
FIRST_FRAME_ARCHS: frozenset[str] = frozenset({"wan21_i2v", "wan22_14b_i2v", "hunyuan_video_1_5_i2v"})

#: text-and-image-to-video models: a preview's ctrl_img, when given, is its first frame (else text
#: to video); their adapters' `optional_first_frame` (a test keeps the two in step)
OPTIONAL_FIRST_FRAME_ARCHS: frozenset[str] = frozenset({"wan22_5b", "ltx2"})

# Architectures whose attention masks the text's padding: attention kernels without a mask are refused
# (aitk.models.attention.MASKED_BACKENDS lists the ones that take it).
MASKED_ATTENTION_ARCHS: frozenset[str] = frozenset(
    {"chroma", "krea2", "ernie_image", "hunyuan_video_1_5", "hunyuan_video_1_5_i2v"}
)

# Architectures whose denoiser has conv layers a network can wrap (network.conv; LoCon), so that
# `aitk validate` can tell that conv alpha phases change nothing on the others.
CONV_ARCHS: frozenset[str] = frozenset({"sd1", "sd15", "sd2", "sdxl"})

# Architectures whose adapter loads model.assistant_lora_path (aitk.models.assistant: a training
# adapter on while training, off for previews), so `aitk validate` can say it is ignored elsewhere.
ASSISTANT_LORA_ARCHS: frozenset[str] = frozenset({"flux", "flux_kontext", "zimage", "krea2"})

# Architectures whose adapter reads model.extras_name_or_path (the parts besides a transformer-only
# model), so `aitk validate` can say it is ignored elsewhere.
EXTRAS_PATH_ARCHS: frozenset[str] = frozenset({
    "zimage", "qwen_image", "qwen_image_edit", "qwen_image_edit_plus", "cogview4", "flux2", "flux2_klein_4b",
    "flux2_klein_9b", "hidream", "krea2", "ernie_image",
})

# Architectures with two experts (one network each): arch -> the expert names, in training order.
EXPERT_ARCHS: dict[str, tuple[str, ...]] = {
    "wan22_14b": ("high_noise", "low_noise"),
    "wan22_14b_i2v": ("high_noise", "low_noise"),
}


# What each family trains with, for `aitk validate` (no model loads). ai-toolkit's DDPM-family
# scheduler names all noise the same variance-preserving way (they differ as samplers only), so SD
# models train DDPM's forward process under any of them; its flowmatch retrains an SD model as a
# flow-matching one, which this version does not do. FLUX and WAN train flow matching only.
DDPM_NOISE_SCHEDULERS: tuple[str, ...] = ("ddpm", "ddim", "pndm", "lms", "euler", "euler_a")
FLOW_NOISE_SCHEDULERS: tuple[str, ...] = ("flowmatch",)
#: train.timestep_type values the DDPM objective draws (aitk/models/sd/timesteps.py)
DDPM_TIMESTEP_TYPES: tuple[str, ...] = ("uniform", "linear", "sigmoid", "shift", "lognorm", "lognorm_blend")

_DDPM_ARCHS = ("sd1", "sd15", "sd2", "sdxl", "pixart", "pixart_sigma")  # PixArt: a DDPM-trained transformer
#: arch -> the train.noise_scheduler names it accepts (unset is always fine)
NOISE_SCHEDULERS: dict[str, tuple[str, ...]] = {
    arch: DDPM_NOISE_SCHEDULERS if arch in _DDPM_ARCHS else FLOW_NOISE_SCHEDULERS for arch in ADAPTERS
}
#: arch -> the train.timestep_type values it accepts; families not listed check theirs when training starts
TIMESTEP_TYPES: dict[str, tuple[str, ...]] = {arch: DDPM_TIMESTEP_TYPES for arch in _DDPM_ARCHS}


#: architectures upstream trains that this version does not, with their names for messages (the
#: plan says so in one line); a family that lands in ADAPTERS wins over its row here
UNSUPPORTED_ARCH_LABELS: dict[str, str] = {
    "qwen_image": "Qwen-Image",
    "hidream_e1": "HiDream E1", "chroma": "Chroma", "lumina2": "Lumina 2", "sd3": "Stable Diffusion 3", "omnigen2": "OmniGen2",
    "flex1": "Flex.1", "zimage": "Z-Image",
}
#: archs upstream trains whose model diffusers 0.42 has no class for (upstream ships its own model
#: code): this version loads every model through diffusers, so these are refused with that reason
NO_DIFFUSERS_CLASS_ARCHS: dict[str, str] = {
    "omnigen2": "OmniGen2", "boogu_image": "Boogu-Image", "boogu_image_edit": "Boogu-Image Edit",
    "f-lite": "F Lite", "mageflow": "MageFlow", "mageflow_edit": "MageFlow Edit", "zeta_chroma": "Zeta Chroma",
    "chroma_radiance": "Chroma Radiance", "zimage_l2p": "Z-Image L2P (pixel space)",
}
UNSUPPORTED_ARCH_LABELS.update(NO_DIFFUSERS_CLASS_ARCHS)


def supported_archs() -> list[str]:
    return sorted(ADAPTERS)


def data_facts(arch: str) -> tuple[int, str | None]:
    """(bucket divisibility, frame rule) of `arch`; SD 1.5's for an unknown name."""
    return DATA_FACTS.get(arch, DATA_FACTS["sd1"])
