"""Model presets: a complete job (as plain data) that the new-job form starts from, and the job
that quick train builds.

A preset leaves three things for the form: the dataset folder (`datasets[0].folder_path`), the job
name and the trigger word. `training_folder` is set by the server. The values follow the model
notes in docs/models.md and, for the alpha schedules, the two presets of docs/alpha-scheduling.md.
"""

from __future__ import annotations

import copy
from typing import Any

# docs/alpha-scheduling.md, "Video preset (WAN 2.1 / 2.2, rank 32)"
VIDEO_ALPHA_SCHEDULE: dict[str, Any] = {
    "enabled": True,
    "alpha_phases": {
        "foundation": {
            "alpha": 16,
            "min_steps": 1000,
            "exit_criteria": {
                "loss_improvement_rate_below": 0.0008,
                "min_gradient_stability": 0.48,
                "min_loss_r2": 0.01,
                "min_samples": 200,
            },
        },
        "balance": {
            "alpha": 24,
            "min_steps": 1500,
            "exit_criteria": {
                "loss_improvement_rate_below": 0.0005,
                "min_gradient_stability": 0.48,
                "min_samples": 200,
            },
        },
        "emphasis": {"alpha": 32},
    },
    "per_expert": {
        "high_noise": {
            "alpha_phases": {
                "foundation": {"min_steps": 1400},
                "balance": {"min_steps": 1800},
                "emphasis": {},
            }
        }
    },
}

# docs/alpha-scheduling.md, "Image preset (SD 1.5, SDXL, FLUX; rank 16)"
IMAGE_ALPHA_SCHEDULE: dict[str, Any] = {
    "enabled": True,
    "alpha_phases": {
        "foundation": {
            "alpha": 8,
            "min_steps": 400,
            "exit_criteria": {
                "loss_improvement_rate_below": 0.0005,
                "min_gradient_stability": 0.50,
                "max_loss_cv": 0.8,
                "min_samples": 100,
            },
        },
        "balance": {
            "alpha": 12,
            "min_steps": 600,
            "exit_criteria": {
                "loss_improvement_rate_below": 0.0003,
                "min_gradient_stability": 0.50,
                "max_loss_cv": 0.8,
                "min_samples": 150,
            },
        },
        "emphasis": {"alpha": 16},
    },
}


def _job(
    *,
    arch: str,
    model: str,
    resolution: list[int],
    rank: int,
    steps: int,
    lr: float,
    optimizer: str,
    dtype: str,
    sample: dict[str, Any],
    model_extra: dict[str, Any] | None = None,
    dataset_extra: dict[str, Any] | None = None,
    train_extra: dict[str, Any] | None = None,
    network_extra: dict[str, Any] | None = None,
    save_every: int = 250,
) -> dict[str, Any]:
    process: dict[str, Any] = {
        "type": "sd_trainer",
        "training_folder": "output",
        "trigger_word": "",
        "network": {"type": "lora", "linear": rank, "linear_alpha": rank, **(network_extra or {})},
        "save": {"dtype": "float16", "save_every": save_every, "max_step_saves_to_keep": 4},
        "datasets": [{
            "folder_path": "",
            "caption_ext": "txt",
            "caption_dropout_rate": 0.05,
            "resolution": resolution,
            "cache_latents_to_disk": True,
            **(dataset_extra or {}),
        }],
        "train": {
            "steps": steps,
            "batch_size": 1,
            "gradient_accumulation": 1,
            "lr": lr,
            "optimizer": optimizer,
            "lr_scheduler": "constant",
            "dtype": dtype,
            "gradient_checkpointing": True,
            "max_grad_norm": 1.0,
            **(train_extra or {}),
        },
        "model": {"name_or_path": model, "arch": arch, **(model_extra or {})},
        "sample": {"sample_every": save_every, "seed": 42, "walk_seed": True, **sample},
    }
    return {"job": "extension", "config": {"name": "my_lora", "process": [process]}, "meta": {"name": "[name]"}}


def _image_sample(width: int, sampler: str, guidance: float, steps: int) -> dict[str, Any]:
    return {
        "sampler": sampler, "width": width, "height": width, "guidance_scale": guidance, "sample_steps": steps,
        "prompts": ["[trigger] a photo, detailed", "[trigger] in a garden at golden hour"],
    }


def _video_sample(frames: int, ctrl: bool = False) -> dict[str, Any]:
    sample: dict[str, Any] = {
        "sampler": "flowmatch", "width": 480, "height": 320, "guidance_scale": 4.0, "sample_steps": 25,
        "num_frames": frames, "fps": 16, "prompts": ["[trigger] walking through a city street at night"],
    }
    if ctrl:
        sample["ctrl_img"] = ""  # I2V previews need a first frame: the form asks for it
    return sample


def _qwen_job(arch: str, model: str, recovery_adapter: str, edit: bool = False) -> dict[str, Any]:
    """Upstream's Qwen-Image examples (train_lora_qwen_image_24gb.yaml; its UI preset trains with
    timestep_type weighted): a 3-bit base with its accuracy-recovery adapter (`recovery_adapter`,
    a file of ostris/accuracy_recovery_adapters), cached text embeddings, low VRAM; `edit`: the edit
    models' 3000 steps, control images and caption dropout."""
    sample = {**_image_sample(1024, "flowmatch", 3.0, 25), "neg": "", **({"ctrl_img": ""} if edit else {})}
    return _job(
        arch=arch, model=model, resolution=[512, 768, 1024], rank=16, steps=3000 if edit else 2000, lr=1e-4,
        optimizer="adamw8bit", dtype="bf16", sample=sample,
        train_extra={"noise_scheduler": "flowmatch", "timestep_type": "weighted", "cache_text_embeddings": True},
        dataset_extra={"control_path": "", "caption_dropout_rate": 0.05} if edit else None,
        model_extra={"quantize": True, "quantize_te": True, "qtype_te": "qfloat8", "low_vram": True,
                     "qtype": f"uint3|ostris/accuracy_recovery_adapters/{recovery_adapter}"},
    )


def _build() -> dict[str, dict[str, Any]]:
    flux_train = {"noise_scheduler": "flowmatch", "timestep_type": "sigmoid"}
    wan_dataset = {"num_frames": 33, "max_pixels_per_frame": 262144, "shrink_video_to_frames": True}
    # Z-Image's presets: upstream's UI defaults for it (qfloat8 transformer and text encoder, low VRAM)
    zimage_train = {"noise_scheduler": "flowmatch", "timestep_type": "weighted"}
    zimage_model = {"quantize": True, "qtype": "qfloat8", "quantize_te": True, "low_vram": True}
    presets = {
        "sd15": ("SD 1.5", "Stable Diffusion 1.5: fast, small, 512 px.", _job(
            arch="sd1", model="stable-diffusion-v1-5/stable-diffusion-v1-5", resolution=[512], rank=16,
            steps=2000, lr=1e-4, optimizer="adamw", dtype="fp16",
            sample={**_image_sample(512, "ddpm", 7.0, 25), "neg": "blurry, low quality"},
            train_extra={"noise_scheduler": "ddpm"},
        )),
        "sdxl": ("SDXL", "Stable Diffusion XL base 1.0, 1024 px.", _job(
            arch="sdxl", model="stabilityai/stable-diffusion-xl-base-1.0", resolution=[1024], rank=16,
            steps=2000, lr=1e-4, optimizer="adamw8bit", dtype="bf16",
            sample={**_image_sample(1024, "ddpm", 6.0, 30), "neg": "blurry, low quality"},
            train_extra={"noise_scheduler": "ddpm"},
        )),
        "flux_dev": ("FLUX.1 dev", "FLUX.1 dev (guidance-distilled), 512-1024 px buckets.", _job(
            arch="flux", model="black-forest-labs/FLUX.1-dev", resolution=[512, 768, 1024], rank=16,
            steps=2000, lr=1e-4, optimizer="adamw8bit", dtype="bf16",
            sample=_image_sample(1024, "flowmatch", 4.0, 20), train_extra=flux_train,
            model_extra={"quantize": True},
        )),
        "flux_schnell": ("FLUX.1 schnell", "FLUX.1 schnell with the training adapter (on while training, "
                         "off for previews).", _job(
            arch="flux", model="black-forest-labs/FLUX.1-schnell", resolution=[512, 768, 1024], rank=16,
            steps=2000, lr=1e-4, optimizer="adamw8bit", dtype="bf16",
            sample=_image_sample(1024, "flowmatch", 1.0, 4), train_extra=flux_train,
            model_extra={"quantize": True, "assistant_lora_path": "ostris/FLUX.1-schnell-training-adapter"},
        )),
        "flux_kontext": ("FLUX.1 Kontext", "FLUX.1 Kontext dev (edit): captions are instructions; each image "
                         "needs its control image (datasets[0].control_path).", _job(
            arch="flux_kontext", model="black-forest-labs/FLUX.1-Kontext-dev", resolution=[512, 768], rank=16,
            steps=2000, lr=1e-4, optimizer="adamw8bit", dtype="bf16",
            sample={**_image_sample(768, "flowmatch", 4.0, 20), "ctrl_img": ""}, train_extra=flux_train,
            model_extra={"quantize": True}, dataset_extra={"control_path": ""},
        )),
        "flex2": ("Flex.2", "Flex.2 preview (FLUX-shaped, built-in inpaint and control inputs): random inpaint "
                  "areas and dropouts, guidance embedding bypassed, quantized: upstream's UI defaults for it; "
                  "control images are optional (datasets[0].control_path).", _job(
            arch="flex2", model="ostris/Flex.2-preview", resolution=[512, 768, 1024], rank=32,
            steps=3000, lr=1e-4, optimizer="adamw8bit", dtype="bf16",
            sample={**_image_sample(1024, "flowmatch", 4.0, 25), "neg": ""},
            train_extra={"noise_scheduler": "flowmatch", "timestep_type": "shift", "bypass_guidance_embedding": True},
            model_extra={"quantize": True, "quantize_te": True, "model_kwargs": {
                "invert_inpaint_mask_chance": 0.2, "inpaint_dropout": 0.5, "control_dropout": 0.5,
                "inpaint_random_chance": 0.2, "do_random_inpainting": True, "random_blur_mask": True,
                "random_dialate_mask": True}},
        )),
        "chroma": ("Chroma", "Chroma1-Base (FLUX-derived, T5 only, true CFG previews), 512-1024 px buckets, "
                   "quantized base, EMA: upstream's 24 GB example.", _job(
            arch="chroma", model="lodestones/Chroma1-Base", resolution=[512, 768, 1024], rank=16,
            steps=2000, lr=1e-4, optimizer="adamw8bit", dtype="bf16",
            sample={**_image_sample(1024, "flowmatch", 4.0, 25), "neg": ""},
            train_extra={"noise_scheduler": "flowmatch", "ema_config": {"use_ema": True, "ema_decay": 0.99}},
            model_extra={"quantize": True},
        )),
        "sd35_large": ("SD 3.5 Large", "Stable Diffusion 3.5 Large (8B MMDiT, three text encoders), 1024 px, "
                       "quantized base: upstream's 24 GB example.", _job(
            arch="sd3", model="stabilityai/stable-diffusion-3.5-large", resolution=[1024], rank=16,
            steps=2000, lr=1e-4, optimizer="adamw8bit", dtype="bf16",
            sample={**_image_sample(1024, "flowmatch", 4.0, 25), "neg": ""},
            train_extra={"noise_scheduler": "flowmatch", "timestep_type": "linear",
                         "ema_config": {"use_ema": True, "ema_decay": 0.99}},
            model_extra={"quantize": True},
        )),
        "pixart_sigma": ("PixArt-Sigma", "PixArt-Sigma XL 1024 (0.6B DiT, T5-XXL text encoder), 1024 px, "
                         "DDPM training: the SD 3.5 example's settings, as upstream has no PixArt example.", _job(
            arch="pixart_sigma", model="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", resolution=[1024], rank=16,
            steps=2000, lr=1e-4, optimizer="adamw8bit", dtype="bf16",
            sample={**_image_sample(1024, "ddpm", 4.5, 20), "neg": ""}, train_extra={"noise_scheduler": "ddpm"},
        )),
        "auraflow": ("AuraFlow", "AuraFlow v0.3 (6.8B MMDiT, UMT5 text encoder), 1024 px, quantized base: the "
                     "SD 3.5 example's settings, as upstream has no AuraFlow example.", _job(
            arch="auraflow", model="fal/AuraFlow-v0.3", resolution=[1024], rank=16,
            steps=2000, lr=1e-4, optimizer="adamw8bit", dtype="bf16",
            sample={**_image_sample(1024, "flowmatch", 3.5, 25), "neg": ""},
            train_extra={"noise_scheduler": "flowmatch", "timestep_type": "linear"}, model_extra={"quantize": True},
        )),
        "lumina2": ("Lumina-Image 2.0", "Lumina-Image 2.0 (2.6B, Gemma-2 text encoder), 512-1024 px buckets, "
                    "quantized text encoder, EMA: upstream's 24 GB example.", _job(
            arch="lumina2", model="Alpha-VLLM/Lumina-Image-2.0", resolution=[512, 768, 1024], rank=16,
            steps=2000, lr=1e-4, optimizer="adamw8bit", dtype="bf16",
            sample={**_image_sample(1024, "flowmatch", 4.0, 25), "neg": ""},
            train_extra={"noise_scheduler": "flowmatch", "timestep_type": "lumina2_shift",
                         "ema_config": {"use_ema": True, "ema_decay": 0.99}},
            model_extra={"quantize_te": True},
        )),
        **{key: (label, f"{label} ({about}), quantized (qfloat8 transformer and text encoder), low VRAM, "
                 "text-to-image: upstream's UI defaults for it.", _job(
            arch=key, model=repo, resolution=[512, 768, 1024], rank=16, steps=2000, lr=1e-4, optimizer="adamw8bit",
            dtype="bf16", sample={**_image_sample(1024, "flowmatch", 4.0, 30), "neg": ""},
            train_extra={"noise_scheduler": "flowmatch", "timestep_type": "weighted"},
            model_extra={"quantize": True, "qtype": "qfloat8", "quantize_te": True, "low_vram": True},
        )) for key, label, about, repo in (
            ("flux2", "FLUX.2 dev", "32B, Mistral Small 3.1 text encoder", "black-forest-labs/FLUX.2-dev"),
            ("flux2_klein_4b", "FLUX.2 Klein base 4B", "Qwen3-4B text encoder", "black-forest-labs/FLUX.2-klein-base-4B"),
            ("flux2_klein_9b", "FLUX.2 Klein base 9B", "Qwen3-8B text encoder", "black-forest-labs/FLUX.2-klein-base-9B"),
        )},
        "zimage_turbo": ("Z-Image Turbo", "Z-Image Turbo (6B, Qwen3 text encoder) with its training adapter (on "
                         "while training, off for previews: the LoRA keeps the 8-step distillation), quantized, "
                         "low VRAM: upstream's 24 GB preset.", _job(
            arch="zimage", model="Tongyi-MAI/Z-Image-Turbo", resolution=[512, 768, 1024], rank=16,
            steps=2000, lr=1e-4, optimizer="adamw8bit", dtype="bf16",
            sample=_image_sample(1024, "flowmatch", 1.0, 9), train_extra=zimage_train,
            model_extra={**zimage_model, "assistant_lora_path":
                         "ostris/zimage_turbo_training_adapter/zimage_turbo_training_adapter_v2.safetensors"},
        )),
        "zimage_deturbo": ("Z-Image De-Turbo", "Z-Image De-Turbo (de-distilled Turbo transformer; VAE and text "
                           "encoder from Z-Image Turbo): trains without an adapter, previews with guidance 3 in "
                           "25 steps, quantized, low VRAM: upstream's 24 GB preset.", _job(
            arch="zimage", model="ostris/Z-Image-De-Turbo", resolution=[512, 768, 1024], rank=16,
            steps=2000, lr=1e-4, optimizer="adamw8bit", dtype="bf16",
            sample={**_image_sample(1024, "flowmatch", 3.0, 25), "neg": ""}, train_extra=zimage_train,
            model_extra={**zimage_model, "extras_name_or_path": "Tongyi-MAI/Z-Image-Turbo"},
        )),
        "krea2": ("Krea 2", "Krea 2 raw (single-stream MMDiT, Qwen3-VL-4B text encoder), quantized, low "
                  "VRAM: upstream's UI defaults for it.", _job(
            arch="krea2", model="krea/Krea-2-Raw", resolution=[512, 768, 1024], rank=16,
            steps=2000, lr=1e-4, optimizer="adamw8bit", dtype="bf16",
            sample={**_image_sample(1024, "flowmatch", 4.0, 30), "neg": ""},
            train_extra={"noise_scheduler": "flowmatch", "timestep_type": "linear"},
            model_extra={"quantize": True, "qtype": "qfloat8", "quantize_te": True, "low_vram": True},
        )),
        "krea2_turbo": ("Krea 2 Turbo", "Krea 2 Turbo with its training adapter (on while training, off for "
                        "previews), previews in 9 steps without guidance, quantized, low VRAM: upstream's UI "
                        "defaults for it.", _job(
            arch="krea2:turbo", model="krea/Krea-2-Turbo", resolution=[512, 768, 1024], rank=16,
            steps=2000, lr=1e-4, optimizer="adamw8bit", dtype="bf16",
            sample=_image_sample(1024, "flowmatch", 1.0, 9),
            train_extra={"noise_scheduler": "flowmatch", "timestep_type": "linear"},
            model_extra={"quantize": True, "qtype": "qfloat8", "quantize_te": True, "low_vram": True,
                         "assistant_lora_path":
                         "ostris/krea2_turbo_training_adapter/krea2_turbo_training_adapter_v1.safetensors"},
        )),
        "qwen_image": ("Qwen-Image", "Qwen-Image (20B MMDiT, Qwen2.5-VL text encoder): 3-bit base with "
                       "its accuracy-recovery adapter, cached text embeddings, low VRAM: upstream's 24 GB "
                       "example.", _qwen_job(
            "qwen_image", "Qwen/Qwen-Image", "qwen_image_torchao_uint3.safetensors"
        )),
        "qwen_image_2512": ("Qwen-Image-2512", "Qwen-Image-2512 (the December 2025 weights, same architecture), "
                            "set up as the Qwen-Image preset with the 2512 recovery adapter.", _qwen_job(
            "qwen_image:2512", "Qwen/Qwen-Image-2512", "qwen_image_2512_torchao_uint3.safetensors"
        )),
        "qwen_image_edit": ("Qwen-Image-Edit", "Qwen-Image-Edit (instruction edits): captions are instructions, "
                            "each image needs its control image (datasets[0].control_path); 3-bit base with its "
                            "accuracy-recovery adapter, cached text embeddings (each caption with its control "
                            "image), low VRAM: upstream's 32 GB example.", _qwen_job(
            "qwen_image_edit", "Qwen/Qwen-Image-Edit", "qwen_image_edit_torchao_uint3.safetensors", edit=True
        )),
        "qwen_image_edit_plus": ("Qwen-Image-Edit-2509", "Qwen-Image-Edit-2509 (up to three control images per "
                                 "image: datasets[0].control_path as a list of folders; previews take a samples "
                                 "entry's ctrl_img_1 .. ctrl_img_3), set up as the Qwen-Image-Edit preset with the "
                                 "2509 recovery adapter: upstream's 32 GB example.", _qwen_job(
            "qwen_image_edit_plus", "Qwen/Qwen-Image-Edit-2509", "qwen_image_edit_2509_torchao_uint3.safetensors",
            edit=True,
        )),
        "wan21": ("WAN 2.1 T2V 1.3B", "WAN 2.1 text to video (1.3B), 33-frame clips.", _job(
            arch="wan21", model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", resolution=[512], rank=32,
            steps=3000, lr=1e-4, optimizer="adamw8bit", dtype="bf16", sample=_video_sample(33),
            train_extra={"noise_scheduler": "flowmatch", "timestep_type": "shift"}, dataset_extra=wan_dataset,
        )),
        "wan22_t2v": ("WAN 2.2 T2V 14B", "WAN 2.2 text to video, both experts (switching every 100 steps).", _job(
            arch="wan22_14b", model="Wan-AI/Wan2.2-T2V-A14B-Diffusers", resolution=[512], rank=32,
            steps=5000, lr=1e-4, optimizer="adamw8bit", dtype="bf16", sample=_video_sample(33),
            train_extra={"noise_scheduler": "flowmatch", "timestep_type": "shift", "switch_boundary_every": 100},
            dataset_extra=wan_dataset, model_extra={"quantize": True},
        )),
        "wan22_i2v": ("WAN 2.2 I2V 14B", "WAN 2.2 image to video: the first frame of each clip conditions "
                      "it; previews need a first frame (sample.ctrl_img).", _job(
            arch="wan22_14b_i2v", model="Wan-AI/Wan2.2-I2V-A14B-Diffusers", resolution=[512], rank=32,
            steps=5000, lr=1e-4, optimizer="adamw8bit", dtype="bf16", sample=_video_sample(33, ctrl=True),
            train_extra={"noise_scheduler": "flowmatch", "timestep_type": "shift", "switch_boundary_every": 100},
            dataset_extra={**wan_dataset, "do_i2v": True}, model_extra={"quantize": True},
        )),
        "wan22_5b": ("WAN 2.2 TI2V 5B", "WAN 2.2 text and image to video in one 5B model (48-channel VAE, "
                     "32 px buckets): each clip's first frame conditions it (do_i2v); previews from the prompt, "
                     "or from a first frame with sample.ctrl_img. Upstream's 24 GB preset.", _job(
            arch="wan22_5b", model="Wan-AI/Wan2.2-TI2V-5B-Diffusers", resolution=[512, 768, 1024], rank=32,
            steps=3000, lr=1e-4, optimizer="adamw8bit", dtype="bf16",
            sample={**_video_sample(121), "width": 768, "height": 768, "fps": 24},
            train_extra={"noise_scheduler": "flowmatch", "timestep_type": "weighted"},
            dataset_extra={**wan_dataset, "do_i2v": True, "fps": 24},
            model_extra={"quantize": True, "quantize_te": True, "low_vram": True},
        )),
        "hunyuan_video_1_5": ("HunyuanVideo 1.5 T2V", "HunyuanVideo 1.5 text to video (8.3B, 480p; Qwen2.5-VL "
                              "and ByT5 prompts cached, then released), quantized, 4k+1-frame clips in 16 px "
                              "buckets. Upstream has no preset: aitk's 24 GB example.", _job(
            arch="hunyuan_video_1_5", model="hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v",
            resolution=[480], rank=32, steps=2000, lr=1e-4, optimizer="adamw8bit", dtype="bf16",
            sample={**_video_sample(33), "width": 848, "height": 480, "fps": 24, "guidance_scale": 6.0},
            train_extra={"noise_scheduler": "flowmatch", "timestep_type": "shift", "cache_text_embeddings": True},
            dataset_extra=wan_dataset, model_extra={"quantize": True, "quantize_te": True, "low_vram": True},
        )),
        "hunyuan_video_1_5_i2v": ("HunyuanVideo 1.5 I2V", "HunyuanVideo 1.5 image to video (480p): each clip's "
                                  "first frame conditions it (latent and SigLIP tokens); previews need a first "
                                  "frame (sample.ctrl_img). aitk's 24 GB example.", _job(
            arch="hunyuan_video_1_5_i2v", model="hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_i2v",
            resolution=[480], rank=32, steps=2000, lr=1e-4, optimizer="adamw8bit", dtype="bf16",
            sample={**_video_sample(33, ctrl=True), "fps": 24, "guidance_scale": 6.0},
            train_extra={"noise_scheduler": "flowmatch", "timestep_type": "shift", "cache_text_embeddings": True},
            dataset_extra={**wan_dataset, "do_i2v": True},
            model_extra={"quantize": True, "quantize_te": True, "low_vram": True},
        )),
        "video_training": ("Video training (alpha schedule)", "WAN 2.2 T2V, rank 32, with the video alpha "
                           "schedule: foundation (alpha 16) -> balance (24) -> emphasis (32), longer early "
                           "phases for the high-noise expert (docs/alpha-scheduling.md).", _job(
            arch="wan22_14b", model="Wan-AI/Wan2.2-T2V-A14B-Diffusers", resolution=[512], rank=32,
            steps=8000, lr=1e-4, optimizer="adamw8bit", dtype="bf16", sample=_video_sample(33),
            train_extra={"noise_scheduler": "flowmatch", "timestep_type": "shift", "switch_boundary_every": 100},
            dataset_extra={**wan_dataset, "caption_dropout_rate": 0.1}, model_extra={"quantize": True},
            network_extra={"linear_alpha": 32, "alpha_schedule": VIDEO_ALPHA_SCHEDULE}, save_every=500,
        )),
        "hidream": ("HiDream-I1", "HiDream-I1 Full (17B mixture-of-experts DiT; CLIP-L, CLIP-G, T5 and Llama 3.1 "
                    "8B text encoders), quantized, LoRA off the routed experts: upstream's preset and its "
                    "48 GB example (about 35 GB; not a 24 GB model).", _job(
            arch="hidream", model="HiDream-ai/HiDream-I1-Full", resolution=[512, 768, 1024], rank=32,
            steps=3000, lr=2e-4, optimizer="adamw8bit", dtype="bf16",
            sample={**_image_sample(1024, "flowmatch", 4.0, 25), "neg": ""},
            train_extra={"noise_scheduler": "flowmatch", "timestep_type": "shift"},
            model_extra={"quantize": True, "quantize_te": True, "extras_name_or_path": "HiDream-ai/HiDream-I1-Full",
                         "model_kwargs": {"llama_model_path": "unsloth/Meta-Llama-3.1-8B-Instruct"}},
            network_extra={"network_kwargs": {"ignore_if_contains": ["ff_i.experts", "ff_i.gate"]}},
        )),
        "ernie_image": ("ERNIE-Image", "ERNIE-Image (8B single-stream DiT, Ministral 3 text encoder, FLUX.2 VAE), "
                        "quantized, low VRAM: upstream's 24 GB preset (baidu/ERNIE-Image-Turbo loads alike).", _job(
            arch="ernie_image", model="baidu/ERNIE-Image", resolution=[512, 768, 1024], rank=32,
            steps=3000, lr=1e-4, optimizer="adamw8bit", dtype="bf16",
            sample={**_image_sample(1024, "flowmatch", 4.0, 30), "neg": ""},
            train_extra={"noise_scheduler": "flowmatch", "timestep_type": "weighted"},
            model_extra={"quantize": True, "qtype": "qfloat8", "quantize_te": True, "qtype_te": "qfloat8",
                         "low_vram": True},
        )),
    }
    # upstream's UI defaults for LTX-2: quantized, low VRAM, 121-frame previews at 24 fps, weighted timesteps
    presets["ltx2"] = ("LTX-2", "LTX-2 (audio-video DiT, Gemma 3): the video branch trains, audio stays "
                       "frozen; 8k+1-frame clips at 24 fps, quantized, low VRAM (upstream's 24 GB defaults).", _job(
        arch="ltx2", model="Lightricks/LTX-2", resolution=[512], rank=32, steps=3000, lr=1e-4,
        optimizer="adamw8bit", dtype="bf16",
        sample={"sampler": "flowmatch", "width": 768, "height": 768, "guidance_scale": 4.0, "sample_steps": 25,
                "num_frames": 121, "fps": 24, "prompts": ["[trigger] walking through a city street at night"]},
        train_extra={"noise_scheduler": "flowmatch", "timestep_type": "weighted"},
        dataset_extra={"num_frames": 121, "fps": 24, "do_i2v": False},
        model_extra={"quantize": True, "quantize_te": True, "low_vram": True},
    ))
    return {
        key: {"id": key, "label": label, "description": text, "arch": job["config"]["process"][0]["model"]["arch"],
              "job": job}
        for key, (label, text, job) in presets.items()
    }


PRESETS = _build()


def list_presets() -> list[dict[str, Any]]:
    return [{k: v for k, v in p.items() if k != "job"} for p in PRESETS.values()]


def preset(key: str) -> dict[str, Any] | None:
    found = PRESETS.get(key)
    return copy.deepcopy(found) if found else None


def quick_train_job(
    key: str,
    *,
    name: str,
    trigger_word: str,
    dataset_folder: str,
    model_path: str | None = None,
    steps: int | None = None,
    device: str | None = None,
    sample_prompts: list[str] | None = None,
) -> dict[str, Any]:
    """Quick train ("LoRA Ease"): the preset with the user's name, trigger word and fresh dataset.

    Captions are the user's own; the trigger word is put in front by the trainer ([trigger] in the
    default caption for images left without one)."""
    found = preset(key)
    if found is None or key in QUICK_TRAIN_REFUSED:
        raise KeyError(QUICK_TRAIN_REFUSED.get(key, f"unknown preset {key!r}"))
    job = found["job"]
    job["config"]["name"] = name
    process = job["config"]["process"][0]
    process["trigger_word"] = trigger_word or None
    dataset = process["datasets"][0]
    dataset["folder_path"] = dataset_folder
    dataset["default_caption"] = "[trigger]" if trigger_word else ""
    if model_path:
        process["model"]["name_or_path"] = model_path
    if device:
        process["device"] = device
    if steps:
        process["train"]["steps"] = steps
        every = max(1, steps // 4)
        process["save"]["save_every"] = every
        process["sample"]["sample_every"] = every
    if sample_prompts:
        process["sample"]["prompts"] = sample_prompts
    if process["sample"].get("ctrl_img") == "":
        # I2V previews need a first frame, which quick train does not ask for: no previews
        del process["sample"]["ctrl_img"]
        process["train"]["disable_sampling"] = True
    return job


QUICK_TRAIN_REFUSED = {
    "flux_kontext": "FLUX Kontext trains on pairs (each image with its control image); use the new-job form "
    "with datasets[0].control_path",
    "qwen_image_edit": "Qwen-Image-Edit trains on pairs (each image with its control image); use the new-job "
    "form with datasets[0].control_path",
    "qwen_image_edit_plus": "Qwen-Image-Edit-2509 trains on pairs (each image with its control images); use the "
    "new-job form with datasets[0].control_path",
}
