"""LoRA files: what diffusers' load_lora_weights reproduces, key layout, round trips, metadata."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

from aitk.networks.export import (
    diffusers_kohya_alpha_conflicts,
    diffusers_to_network_state,
    kohya_to_network_state,
    load_lora_file,
    network_to_diffusers,
    network_to_kohya,
    save_lora,
)
from aitk.networks.lora import inject_network
from aitk.networks.metadata import lora_metadata
from aitk.networks.targets import unet_lora_candidates

NETWORKS = {
    "lora": dict(linear_rank=4, linear_alpha=8),
    "locon": dict(linear_rank=4, linear_alpha=8, conv_rank=4, conv_alpha=2),
}


def _pipe(folder: str):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe) -> np.ndarray:
    return pipe(
        "a photo of a cat",
        num_inference_steps=3,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def _inject(unet, kind: str, seed: int = 0):
    kw = NETWORKS[kind]
    return inject_network(unet, candidates=unet_lora_candidates(unet, "conv_rank" in kw), seed=seed, **kw)


def _randomize(handle, seed: int = 1, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _load_in_diffusers(folder: str, path) -> tuple[np.ndarray, object]:
    pipe = _pipe(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(path))
    return _generate(pipe), pipe


def _lora_layer_count(unet) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in unet.modules())


@pytest.fixture(scope="module", params=list(NETWORKS))
def trained(request, tiny_sd15):
    """A pipeline with a random (non-zero) LoRA / LoCon in its UNet, its image and the base image."""
    pipe = _pipe(tiny_sd15)
    base = _generate(pipe)
    handle = _inject(pipe.unet, request.param)
    _randomize(handle)
    return request.param, pipe, handle, base, _generate(pipe)


# --- 1. diffusers' loader reproduces our output -------------------------------------------------
@pytest.mark.parametrize("save_format", ["comfyui", "kohya", "diffusers"])
def test_diffusers_reproduces_saved_lora(trained, tiny_sd15, tmp_path, save_format):
    kind, _, handle, base, image = trained
    assert np.abs(image - base).max() > 1e-3, "the LoRA must change the image, or this test proves nothing"
    path = save_lora(tmp_path / f"{kind}.safetensors", handle, save_format=save_format, dtype=torch.float32)
    loaded, pipe = _load_in_diffusers(tiny_sd15, path)
    assert _lora_layer_count(pipe.unet) == len(handle.wrapped_module_names())
    assert np.abs(loaded - image).max() < 1e-4


def test_kohya_file_without_alpha_loads_differently(trained, tiny_sd15, tmp_path):
    """Guards the test above: a wrong scale (alpha read as rank) must be visible in the image."""
    import safetensors.torch

    kind, _, handle, _, image = trained
    tensors = {k: v for k, v in network_to_kohya(handle, dtype=torch.float32).items() if not k.endswith(".alpha")}
    path = tmp_path / "no_alpha.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    loaded, _ = _load_in_diffusers(tiny_sd15, path)
    assert np.abs(loaded - image).max() > 1e-3


# --- 2. live alpha change reaches the file ------------------------------------------------------
@pytest.mark.parametrize("save_format", ["comfyui", "diffusers"])
def test_file_after_set_alphas(tiny_sd15, tmp_path, save_format):
    pipe = _pipe(tiny_sd15)
    handle = _inject(pipe.unet, "locon")
    _randomize(handle)
    before = _generate(pipe)
    handle.set_alphas(12.0, 3.0)
    image = _generate(pipe)
    assert np.abs(image - before).max() > 1e-3
    path = save_lora(tmp_path / "a.safetensors", handle, save_format=save_format, dtype=torch.float32)
    tensors, meta = load_lora_file(path)
    if save_format == "comfyui":
        alphas = {k: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
        assert alphas["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"] == 12.0
        assert alphas["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"] == 12.0
        assert alphas["lora_unet_down_blocks_0_resnets_0_conv1.alpha"] == 3.0
        assert alphas["lora_unet_down_blocks_0_resnets_0_time_emb_proj.alpha"] == 12.0
        assert set(alphas.values()) == {12.0, 3.0}
    else:
        cfg = json.loads(meta["lora_adapter_metadata"])
        assert cfg["unet.lora_alpha"] == 12.0 and list(cfg["unet.alpha_pattern"].values()) == [3.0]
    loaded, _ = _load_in_diffusers(tiny_sd15, path)
    assert np.abs(loaded - image).max() < 1e-4


def test_multiplier_is_not_saved(tmp_path, tiny_sd15):
    pipe = _pipe(tiny_sd15)
    handle = _inject(pipe.unet, "lora")
    _randomize(handle)
    image = _generate(pipe)
    handle.set_multiplier(0.3)
    path = save_lora(tmp_path / "m.safetensors", handle, dtype=torch.float32)
    assert all(float(v) == 8.0 for k, v in load_lora_file(path)[0].items() if k.endswith(".alpha"))
    loaded, _ = _load_in_diffusers(tiny_sd15, path)
    assert np.abs(loaded - image).max() < 1e-4


# --- 4. key layout ------------------------------------------------------------------------------
def test_comfyui_key_layout(trained, tmp_path):
    kind, _, handle, _, _ = trained
    path = save_lora(tmp_path / "k.safetensors", handle)  # defaults: comfyui, float16
    tensors, meta = load_lora_file(path)
    assert meta.get("format") == "pt"
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert not any(".lora_A" in k or ".lora_B" in k or "default" in k for k in tensors)
    modules: dict[str, set[str]] = {}
    for k in tensors:
        stem, _, kind_ = k.partition(".")
        modules.setdefault(stem, set()).add(kind_)
    assert len(modules) == len(handle.wrapped_module_names())
    assert all(v == {"lora_down.weight", "lora_up.weight", "alpha"} for v in modules.values())
    assert {f"lora_unet_{n.replace('.', '_')}" for n in handle.wrapped_module_names()} == set(modules)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0" in modules
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj" in modules
    for k, t in tensors.items():
        if k.endswith(".alpha"):
            assert t.ndim == 0 and t.dtype == torch.float32
        else:
            assert t.dtype == torch.float16
    down = tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
    up = tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"]
    assert down.shape == (4, 32, 1, 1) and up.shape == (32, 4, 1, 1)
    if kind == "locon":
        assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
        assert float(tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 2.0


def test_diffusers_key_layout(trained):
    _, _, handle, _, _ = trained
    tensors, meta = network_to_diffusers(handle, dtype=torch.float32)
    assert all(k.startswith("unet.") and (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")) for k in tensors)
    assert len(tensors) == 2 * len(handle.wrapped_module_names())
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["unet.r"] == 4 and cfg["unet.lora_alpha"] == 8.0
    assert all(isinstance(v, str) for v in meta.values())


# --- 5. round trips ----------------------------------------------------------------------------
def test_kohya_round_trip_exact(trained):
    _, _, handle, _, _ = trained
    state = handle.network_state_dict()
    for dtype in (torch.float32, torch.float16):
        back, alphas = kohya_to_network_state(handle, network_to_kohya(handle, dtype=dtype))
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k].to(dtype)) for k in state)
        assert alphas == handle.module_alphas()
    back = diffusers_to_network_state(handle, network_to_diffusers(handle, dtype=torch.float32)[0])
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_saved_file_reloads_into_fresh_handle(trained, tiny_sd15, tmp_path):
    from diffusers import UNet2DConditionModel

    kind, pipe, handle, _, _ = trained
    path = save_lora(tmp_path / "r.safetensors", handle, dtype=torch.float32)
    fresh = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").eval()
    h2 = _inject(fresh, kind, seed=7)
    state, alphas = kohya_to_network_state(h2, load_lora_file(path)[0])
    h2.load_network_state_dict(state)
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300]), torch.randn(1, 77, 32, generator=g))
    with torch.no_grad():
        assert torch.equal(fresh(*inputs).sample, pipe.unet(*inputs).sample)
    assert alphas == handle.module_alphas()

    tensors = load_lora_file(path)[0]
    tensors["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="lora_unet_not_a_module"):
        kohya_to_network_state(h2, tensors)


# --- atomic write, formats ---------------------------------------------------------------------
def test_save_is_atomic_and_overwrites(trained, tmp_path):
    _, _, handle, _, _ = trained
    path = tmp_path / "sub" / "x.safetensors"
    save_lora(path, handle, save_format="kohya")
    first = path.read_bytes()
    save_lora(path, handle, save_format="kohya", dtype=torch.float32)
    assert path.read_bytes() != first
    assert os.listdir(path.parent) == ["x.safetensors"]  # no temp file left behind
    with pytest.raises(ValueError, match="save_format"):
        save_lora(tmp_path / "y.safetensors", handle, save_format="lycoris")
    assert not (tmp_path / "y.safetensors").exists()
    with pytest.raises(TypeError):
        save_lora(tmp_path / "z.safetensors", handle, metadata={"ss_steps": 5})


def test_diffusers_alpha_quirk_is_flagged(tiny_sd15, tmp_path):
    """diffusers misreads kohya alphas of to_q/k/v/out when they are not the file's most common alpha."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    ok = inject_network(unet, candidates=unet_lora_candidates(unet, True), **NETWORKS["locon"])
    assert diffusers_kohya_alpha_conflicts(ok) == []  # default targets: linear alpha is the majority
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    odd = inject_network(unet, candidates=unet_lora_candidates(unet, True), only_if_contains=["attn1.to_q", "conv1"],
                         **NETWORKS["locon"])
    assert len(diffusers_kohya_alpha_conflicts(odd)) == 4
    with pytest.warns(UserWarning, match="most common alpha"):
        save_lora(tmp_path / "odd.safetensors", odd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_lora(tmp_path / "odd_d.safetensors", odd, save_format="diffusers")


# --- 6. metadata -------------------------------------------------------------------------------
def test_metadata(trained, tmp_path):
    _, _, handle, _, _ = trained
    handle.set_alphas(6.0, handle.conv_alpha)
    try:
        md = lora_metadata(
            name="my_lora",
            steps=1234,
            network_dim=handle.linear_rank,
            network_alpha=handle.linear_alpha,
            conv_dim=4,
            conv_alpha=2.0,
            base_model_version="sd_v1",
            architecture="stable-diffusion-v1/lora",
            resolution=(512, 768),
            training_settings={"lr": 1e-4, "optimizer": "adamw", "steps": 1234},
            meta={"author": "me", "version": 2, "tags": ["a", "b"], "ss_network_alpha": "999"},
            trigger_word="sks",
            tag_frequency={"set": {"cat": 3}},
        )
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
        assert md["ss_network_dim"] == "4"
        assert float(md["ss_network_alpha"]) == 6.0  # the alpha in effect, not the configured one
        assert md["ss_network_module"] == "networks.lora"
        assert json.loads(md["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2.0"}
        assert md["ss_base_model_version"] == "sd_v1" and md["ss_output_name"] == "my_lora"
        assert md["ss_steps"] == "1234" and md["ss_training_comment"] == "sks"
        assert json.loads(md["ss_tag_frequency"]) == {"set": {"cat": 3}}
        assert md["modelspec.sai_model_spec"] == "1.0.0"
        assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert md["modelspec.title"] == "my_lora" and md["modelspec.resolution"] == "512x768"
        assert md["modelspec.date"] and md["modelspec.implementation"]
        assert md["author"] == "me" and md["version"] == "2" and json.loads(md["tags"]) == ["a", "b"]
        assert json.loads(md["aitk_training_settings"])["optimizer"] == "adamw"

        path = save_lora(tmp_path / "meta.safetensors", handle, metadata=md)
        _, back = load_lora_file(path)
        assert {k: back[k] for k in md} == md
    finally:
        handle.set_alphas(8.0, handle.conv_alpha)


def test_metadata_without_conv_or_trigger():
    md = lora_metadata(
        name="n", steps=0, network_dim=16, network_alpha=16, conv_dim=None, conv_alpha=None,
        base_model_version="sd_v1", architecture="stable-diffusion-v1/lora", resolution=(512, 512),
        training_settings={}, meta=None, trigger_word=None,
    )
    assert json.loads(md["ss_network_args"]) == {}
    assert "ss_training_comment" not in md and md["modelspec.resolution"] == "512x512"
    assert all(isinstance(v, str) for v in md.values())
