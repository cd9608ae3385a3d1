"""What other parts of aitk learn about a family from its adapter class rather than from its arch
name: the Hub model card's pipeline tag, tags and licence (aitk.hub), the guess of `aitk lora info`
for a file without header metadata, a single file's config repo for `aitk plan`, and the
modelspec.implementation of saved LoRA files. No model is built; the tensors are key-shaped stubs."""

from __future__ import annotations

import pytest
import torch
import yaml

from aitk.hub import CardInfo, model_card
from aitk.models.registry import adapter_class
from aitk.tools.lora_info import _guess_arch


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize(
    ("arch", "base", "pipeline_tag", "family_tag", "license"),
    [
        ("sd1", "stable-diffusion-v1-5/stable-diffusion-v1-5", "text-to-image", "stable-diffusion", "creativeml-openrail-m"),
        ("sd2", "stabilityai/stable-diffusion-2-1", "text-to-image", "stable-diffusion", "openrail++"),
        ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "text-to-image", "stable-diffusion-xl", "openrail++"),
        ("flux", "black-forest-labs/FLUX.1-dev", "text-to-image", "flux", "other"),
        ("flux", "black-forest-labs/FLUX.1-schnell", "text-to-image", "flux", "apache-2.0"),
        ("flux_kontext", "black-forest-labs/FLUX.1-Kontext-dev", "image-to-image", "flux", "other"),
        ("wan21", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "text-to-video", "wan", "apache-2.0"),
        ("wan21_i2v", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "image-to-video", "wan", "apache-2.0"),
        ("wan22_14b_i2v", "Wan-AI/Wan2.2-I2V-A14B-Diffusers", "image-to-video", "wan", "apache-2.0"),
    ],
)
def test_model_card_facts_come_from_the_adapter(arch, base, pipeline_tag, family_tag, license) -> None:
    meta = front_matter(model_card(CardInfo(title="t", base_model=base, architecture=arch)))
    assert meta["pipeline_tag"] == pipeline_tag
    assert family_tag in meta["tags"]
    assert meta["license"] == license


def test_model_card_of_an_arch_this_version_lacks_has_the_interface_defaults() -> None:
    meta = front_matter(model_card(CardInfo(title="t", base_model="someone/model", architecture="not_an_arch")))
    assert meta["pipeline_tag"] == "text-to-image" and "license" not in meta
    assert meta["tags"] == ["lora", "diffusers", "template:sd-lora", "aitk"]


#: the families whose guesses the cases below pin down
FAMILIES_HERE = {"sd1", "sd2", "sdxl", "flux", "flux_kontext", "wan21", "wan21_i2v", "wan22_14b", "wan22_14b_i2v"}


def lora(keys: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    return {key: torch.zeros(shape) for key, shape in keys.items()}


@pytest.mark.parametrize(
    ("tensors", "guess"),
    [
        (lora({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 768)}),
         "sd1"),
        (lora({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 1024)}),
         "sd2"),
        (lora({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 2048)}), "sdxl"),
        (lora({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 1280)}), "sdxl"),
        (lora({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 1024)}), "sd2"),
        (lora({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (4, 3072)}), "flux / flux_kontext"),
        (lora({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 3072)}), "flux / flux_kontext"),
        (lora({"diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": (4, 5120)}), "wan21_i2v"),
        (lora({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": (4, 5120)}),
         "wan21 / wan22_14b / wan22_14b_i2v"),
        (lora({"some.other.model.lora_A.weight": (4, 8)}), "unknown"),
    ],
)
def test_lora_info_guesses_the_family_through_its_adapter(tensors, guess) -> None:
    """Every arch `guess` names, and none of the other families here (a family added later whose
    files share a naming, e.g. one on FLUX's transformer, may be named beside them)."""
    named = _guess_arch(tensors).split(" (")[0].split(" / ")
    expected = guess.split(" / ")
    assert set(expected) <= set(named)
    assert not (set(named) - set(expected)) & (FAMILIES_HERE - set(expected))
    if len(named) > 1:
        assert _guess_arch(tensors).endswith("(their files share one naming)")


def test_plan_and_metadata_facts() -> None:
    from aitk.plan.sources import _default_config_repo

    assert _default_config_repo("sdxl") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert _default_config_repo("sd15") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert _default_config_repo("flux") is None and _default_config_repo("not_an_arch") is None
    assert adapter_class("flux_kontext").modelspec_implementation == "https://github.com/black-forest-labs/flux"
    assert adapter_class("sd2").modelspec_implementation == "https://github.com/Stability-AI/generative-models"
    assert adapter_class("wan21").modelspec_implementation == "diffusers"
