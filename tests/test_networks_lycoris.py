"""LoKr, LoHa and DoRA: training through the Trainer (SD 1.5 and FLUX) with identical resume, the
LyCORIS key layout, the scale convention read off the layers, exact round trips through our own
loader, merging into the base weights, and DoRA in diffusers' load_lora_weights."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from aitk.networks.build import build_network, network_algo
from aitk.networks.export import load_lora_file, load_network_file, network_to_kohya, save_lora
from aitk.networks.lora import inject_network
from aitk.networks.merge import merge_network_file
from aitk.networks.targets import unet_lora_candidates
from conftest import base_process, deep_update, write_job
from interop_results import record

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 32 -> 32
FF = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"  # Linear 32 -> 256
CONV = "down_blocks.0.resnets.0.conv1"  # Conv2d 32 -> 32, 3x3
STEM_Q = "lora_unet_" + Q.replace(".", "_")
STEM_CONV = "lora_unet_" + CONV.replace(".", "_")

# rank 2 < half of the tiny model's LoKr factors (32 = 4 x 8): w2 is rank-decomposed
NETS: dict[str, dict] = {
    "lokr": dict(network_type="lokr", linear_rank=2, linear_alpha=3.0, conv_rank=2, conv_alpha=1.5),
    "lokr_full": dict(network_type="lokr", lokr_full_rank=True, linear_rank=8, linear_alpha=8.0, conv_rank=8,
                      conv_alpha=8.0),
    "lokr_factor4": dict(network_type="lokr", lokr_factor=4, linear_rank=2, linear_alpha=2.0),
    "loha": dict(network_type="loha", linear_rank=4, linear_alpha=2.0, conv_rank=2, conv_alpha=3.0),
    "dora": dict(network_type="dora", linear_rank=4, linear_alpha=8.0, conv_rank=2, conv_alpha=1.0),
}


@pytest.fixture(scope="module")
def base_unet(tiny_sd15):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").eval()


def _inject(unet, kind: str, seed: int = 0, **override):
    kw = {**NETS[kind], **override}
    return build_network(unet, candidates=unet_lora_candidates(unet, "conv_rank" in kw), seed=seed, **kw)


def _randomize(handle, seed: int = 1, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in handle.named_trainable_parameters().items():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(p * (1 + noise) if name.endswith("magnitude_vector") else noise)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g)


def _run(unet) -> torch.Tensor:
    with torch.no_grad():
        return unet(*_inputs()).sample


def _delta_out(layer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer(x) - layer.get_base_layer()(x)


def _x_for(layer) -> torch.Tensor:
    base = layer.get_base_layer()
    g = torch.Generator().manual_seed(5)
    if isinstance(base, torch.nn.Conv2d):
        return torch.randn(2, base.in_channels, 6, 6, generator=g)
    return torch.randn(3, base.in_features, generator=g)


def _apply(layer, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x through `weight` with the base layer's conv settings (no bias)."""
    base = layer.get_base_layer()
    if isinstance(base, torch.nn.Conv2d):
        return F.conv2d(x, weight, stride=base.stride, padding=base.padding)
    return F.linear(x, weight)


# --- network kinds ----------------------------------------------------------------------------------
def test_network_algo():
    assert network_algo("lora") == "lora" and network_algo("locon") == "lora"
    assert network_algo("dora") == "dora" and network_algo("lora", dora=True) == "dora"
    assert network_algo("locon", dora=True) == "dora"
    assert network_algo("lokr") == "lokr" and network_algo("loha") == "loha"
    with pytest.raises(ValueError, match="dora: true"):
        network_algo("lokr", dora=True)


@pytest.mark.parametrize("kind", ["lokr", "lokr_full", "loha", "dora"])
def test_seeded_start_is_a_noop_and_identical(base_unet, kind):
    a, b = copy.deepcopy(base_unet), copy.deepcopy(base_unet)
    ha, hb = _inject(a, kind, seed=3), _inject(b, kind, seed=3)
    sa, sb = ha.network_state_dict(), hb.network_state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(_run(a), _run(base_unet))  # one factor starts at zero
    assert all(p.requires_grad for p in ha.trainable_parameters())
    assert sum(p.requires_grad for p in a.parameters()) == len(ha.trainable_parameters())


# --- the LyCORIS key layout -----------------------------------------------------------------------
def test_lycoris_key_layout(base_unet):
    lora = inject_network(copy.deepcopy(base_unet), linear_rank=2, linear_alpha=2, conv_rank=2,
                          candidates=unet_lora_candidates(base_unet, True))
    lora_stems = {k.rsplit(".", 2)[0] for k in network_to_kohya(lora) if not k.endswith(".alpha")}

    files = {}
    for kind in ("lokr", "lokr_full", "loha"):
        handle = _inject(copy.deepcopy(base_unet), kind)
        files[kind] = network_to_kohya(handle, dtype=torch.float32)
        stems = {k.rsplit(".", 1)[0] for k in files[kind]}
        assert stems == lora_stems  # the same kohya stems as our LoRA files, which ComfyUI maps
        assert all(not k.endswith(".weight") for k in files[kind])

    lokr, full, loha = files["lokr"], files["lokr_full"], files["loha"]
    # LoKr: 32 = 4 x 8 -> w1 (4 x 4) full, w2 (8 x 8) rank-decomposed through rank 2
    assert sorted(k for k in lokr if k.startswith(STEM_Q + ".")) == [
        f"{STEM_Q}.alpha", f"{STEM_Q}.lokr_w1", f"{STEM_Q}.lokr_w2_a", f"{STEM_Q}.lokr_w2_b"]
    assert lokr[f"{STEM_Q}.lokr_w1"].shape == (4, 4)
    assert lokr[f"{STEM_Q}.lokr_w2_a"].shape == (8, 2) and lokr[f"{STEM_Q}.lokr_w2_b"].shape == (2, 8)
    assert lokr[f"{STEM_Q}.alpha"].dtype == torch.float32 and lokr[f"{STEM_Q}.alpha"].dim() == 0
    assert float(lokr[f"{STEM_Q}.alpha"]) == 3.0 and float(lokr[f"{STEM_CONV}.alpha"]) == 1.5
    # conv 3x3: w2_b flattens (in x k x k), as LyCORIS without a Tucker core
    assert lokr[f"{STEM_CONV}.lokr_w2_b"].shape == (2, 8 * 9)
    # full rank: both factors full; alpha written as the rank (scale 1)
    assert sorted(k for k in full if k.startswith(STEM_Q + ".")) == [
        f"{STEM_Q}.alpha", f"{STEM_Q}.lokr_w1", f"{STEM_Q}.lokr_w2"]
    assert full[f"{STEM_CONV}.lokr_w2"].shape == (8, 8, 3, 3) and float(full[f"{STEM_Q}.alpha"]) == 8.0
    # LoHa
    assert sorted(k for k in loha if k.startswith(STEM_Q + ".")) == [
        f"{STEM_Q}.alpha", f"{STEM_Q}.hada_w1_a", f"{STEM_Q}.hada_w1_b", f"{STEM_Q}.hada_w2_a", f"{STEM_Q}.hada_w2_b"]
    assert loha[f"{STEM_Q}.hada_w1_a"].shape == (32, 4) and loha[f"{STEM_Q}.hada_w2_b"].shape == (4, 32)
    assert loha[f"{STEM_CONV}.hada_w1_b"].shape == (2, 32 * 9)

    factor4 = network_to_kohya(_inject(copy.deepcopy(base_unet), "lokr_factor4"))
    stem_ff = "lora_unet_" + FF.replace(".", "_")
    assert factor4[f"{stem_ff}.lokr_w1"].shape == (4, 4)  # 256 = 4 x 64, 32 = 4 x 8
    assert factor4[f"{stem_ff}.lokr_w2_a"].shape == (64, 2) and factor4[f"{stem_ff}.lokr_w2_b"].shape == (2, 8)


def test_dora_key_layout(base_unet):
    handle = _inject(copy.deepcopy(base_unet), "dora")
    kohya = network_to_kohya(handle, dtype=torch.float32)
    assert sorted(k for k in kohya if k.startswith(STEM_Q + ".")) == [
        f"{STEM_Q}.alpha", f"{STEM_Q}.dora_scale", f"{STEM_Q}.lora_down.weight", f"{STEM_Q}.lora_up.weight"]
    # LyCORIS's output-axis layout; it starts at the base weight's row norms
    assert kohya[f"{STEM_Q}.dora_scale"].shape == (32, 1) and kohya[f"{STEM_CONV}.dora_scale"].shape == (32, 1, 1, 1)
    w = handle.lora_layers()[Q].get_base_layer().weight
    torch.testing.assert_close(kohya[f"{STEM_Q}.dora_scale"][:, 0], w.norm(dim=1))


# --- scale convention: the file's tensors and alpha give exactly the layer's update ------------------
def _file_delta(kind: str, f: dict[str, torch.Tensor], stem: str, shape) -> torch.Tensor:
    """dW from the file by the LyCORIS convention, written out here independently of merge.py."""
    alpha = float(f[f"{stem}.alpha"])
    if kind == "loha":
        r = f[f"{stem}.hada_w1_b"].shape[0]
        w = (f[f"{stem}.hada_w1_a"] @ f[f"{stem}.hada_w1_b"]) * (f[f"{stem}.hada_w2_a"] @ f[f"{stem}.hada_w2_b"])
        return alpha / r * w.reshape(shape)
    w1 = f[f"{stem}.lokr_w1"]
    if f"{stem}.lokr_w2" in f:
        w2, scale = f[f"{stem}.lokr_w2"], 1.0  # no decomposed factor: alpha does not apply
    else:
        w2 = f[f"{stem}.lokr_w2_a"] @ f[f"{stem}.lokr_w2_b"]
        scale = alpha / f[f"{stem}.lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return scale * torch.kron(w1, w2).reshape(shape)


@pytest.mark.parametrize("kind", ["lokr", "lokr_full", "loha"])
def test_lycoris_scale_convention(base_unet, kind):
    handle = _inject(copy.deepcopy(base_unet), kind)
    _randomize(handle)
    layers = handle.lora_layers()
    for alphas in [None, (6.0, 0.75)]:
        if alphas:
            handle.set_alphas(*alphas)
        f = network_to_kohya(handle, dtype=torch.float32)
        for name, stem in ((Q, STEM_Q), (CONV, STEM_CONV)):
            layer = layers[name]
            expected_alpha = (alphas or (NETS[kind]["linear_alpha"], NETS[kind]["conv_alpha"]))[name == CONV]
            if kind == "lokr_full":
                expected_alpha = handle.module_rank(name)  # the alpha is not in effect: scale 1
            assert float(f[f"{stem}.alpha"]) == handle.module_alpha(name) == expected_alpha
            x = _x_for(layer)
            dw = _file_delta(kind, f, stem, layer.get_base_layer().weight.shape)
            torch.testing.assert_close(_delta_out(layer, x), _apply(layer, dw, x), rtol=1e-5, atol=1e-6)
    # the multiplier scales the update linearly
    x = _x_for(layers[Q])
    full = _delta_out(layers[Q], x)
    handle.set_multiplier(0.5)
    torch.testing.assert_close(_delta_out(layers[Q], x), 0.5 * full, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_set_alphas_is_alpha_over_rank(base_unet, kind):
    """LoRA: dW = alpha / r * B @ A; DoRA: W' = m * (W + alpha / r * B @ A) / ||...|| per output row."""
    if kind == "dora":
        handle = _inject(copy.deepcopy(base_unet), "dora")
    else:
        handle = inject_network(copy.deepcopy(base_unet), linear_rank=4, linear_alpha=8, conv_rank=2, conv_alpha=1,
                                candidates=unet_lora_candidates(base_unet, True), seed=0)
    _randomize(handle)
    for alphas in [(8.0, 1.0), (2.0, 5.0)]:
        handle.set_alphas(*alphas)
        f = network_to_kohya(handle, dtype=torch.float32)
        for name, stem in ((Q, STEM_Q), (CONV, STEM_CONV)):
            layer = handle.lora_layers()[name]
            w = layer.get_base_layer().weight
            down, up, alpha = f[f"{stem}.lora_down.weight"], f[f"{stem}.lora_up.weight"], float(f[f"{stem}.alpha"])
            assert alpha == alphas[name == CONV]
            dw = (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
            if kind == "dora":
                combined = w + dw
                norm = combined.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
                dw = f[f"{stem}.dora_scale"] * combined / norm - w
            x = _x_for(layer)
            torch.testing.assert_close(_delta_out(layer, x), _apply(layer, dw, x), rtol=1e-4, atol=1e-5)


# --- round trip through our loader, and merging -----------------------------------------------------
CASES = [(k, "comfyui") for k in NETS] + [("dora", "diffusers"), ("lokr", "diffusers")]


@pytest.mark.parametrize("kind, save_format", CASES, ids=[f"{k}-{f}" for k, f in CASES])
def test_round_trip_and_merge(base_unet, tmp_path, kind, save_format):
    unet = copy.deepcopy(base_unet)
    handle = _inject(unet, kind)
    _randomize(handle)
    handle.set_alphas(NETS[kind]["linear_alpha"] * 1.5, 2.5 if "conv_rank" in NETS[kind] else None)
    live, base = _run(unet), _run(base_unet)
    assert (live - base).abs().max() > 1e-2, "the network must change the output, or this proves nothing"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = save_lora(tmp_path / "n.safetensors", handle, save_format=save_format, dtype=torch.float32)
    if kind == "lokr" and save_format == "diffusers":
        assert any("LyCORIS key layout" in str(w.message) for w in caught)  # no diffusers layout for LoKr

    # our loader: a fresh network of the same configuration (other seed, other alphas)
    other = copy.deepcopy(base_unet)
    other_alphas = {"linear_alpha": 1.0, **({"conv_alpha": 7.0} if "conv_rank" in NETS[kind] else {})}
    fresh = _inject(other, kind, seed=11, **other_alphas)
    load_network_file(fresh, path)
    record("sd1", NETS[kind]["network_type"], "aitk loader (round trip)",
           (max_diff := float((_run(other) - live).abs().max())) < 1e-6, max_diff,
           layout="diffusers" if (save_format, kind) == ("diffusers", "dora") else "comfyui")
    assert (_run(other) - live).abs().max() < 1e-6
    assert fresh.module_alphas() == handle.module_alphas()
    saved = handle.network_state_dict()
    assert all(torch.equal(fresh.network_state_dict()[k], saved[k]) for k in saved)

    # merged into the base weights: the same output as the live network
    merged_model = copy.deepcopy(base_unet)
    merged = merge_network_file(merged_model, path)
    assert sorted(merged) == sorted(handle.wrapped_module_names())
    record("sd1", NETS[kind]["network_type"], "aitk merge",
           (max_diff := float((_run(merged_model) - live).abs().max())) < 1e-4, max_diff,
           layout="diffusers" if (save_format, kind) == ("diffusers", "dora") else "comfyui")
    assert (_run(merged_model) - live).abs().max() < 1e-4

    # strength = the live multiplier
    half = copy.deepcopy(base_unet)
    merge_network_file(half, path, strength=0.5)
    handle.set_multiplier(0.5)
    assert (_run(half) - _run(unet)).abs().max() < 1e-4


def test_load_refuses_another_structure(base_unet, tmp_path):
    path = save_lora(tmp_path / "lokr.safetensors", _inject(copy.deepcopy(base_unet), "lokr"))
    for other in ("lokr_full", "loha"):
        with pytest.raises(KeyError, match="does not match"):
            load_network_file(_inject(copy.deepcopy(base_unet), other), path)
    with pytest.raises(KeyError):
        merge_network_file(copy.deepcopy(base_unet), path, prefix="lora_te")


def test_per_module_alphas_round_trip(base_unet, tmp_path):
    handle = _inject(copy.deepcopy(base_unet), "loha")
    _randomize(handle)
    handle.set_module_alphas({Q: 9.0})
    path = save_lora(tmp_path / "a.safetensors", handle, dtype=torch.float32)
    assert float(load_file(str(path))[f"{STEM_Q}.alpha"]) == 9.0
    fresh = _inject(copy.deepcopy(base_unet), "loha")
    load_network_file(fresh, path)
    assert fresh.module_alpha(Q) == 9.0 and fresh.module_alphas() == handle.module_alphas()


# --- DoRA in diffusers ------------------------------------------------------------------------------
def _pipe(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe) -> np.ndarray:
    return pipe("a photo of a cat", num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_dora_loads_in_diffusers_sd15(tiny_sd15, tmp_path):
    pipe = _pipe(tiny_sd15)
    base = _generate(pipe)
    handle = _inject(pipe.unet, "dora")
    _randomize(handle)
    handle.set_alphas(6.0, 3.0)
    image = _generate(pipe)
    assert np.abs(image - base).max() > 1e-3

    path = save_lora(tmp_path / "dora.safetensors", handle, save_format="diffusers", dtype=torch.float32)
    assert json.loads(load_lora_file(path)[1]["lora_adapter_metadata"])["unet.use_dora"] is True
    fresh = _pipe(tiny_sd15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.load_lora_weights(str(path))
    layers = [m for m in fresh.unet.modules() if hasattr(m, "lora_magnitude_vector") and m.lora_magnitude_vector]
    assert len(layers) == len(handle.wrapped_module_names())
    record("sd1", "dora", "diffusers load_lora_weights",
           (max_diff := float(np.abs(_generate(fresh) - image).max())) < 1e-4, max_diff, layout="diffusers")
    assert np.abs(_generate(fresh) - image).max() < 1e-4

    # the kohya / ComfyUI layout: diffusers 0.42 drops `dora_scale` and loads a plain LoRA
    kohya = save_lora(tmp_path / "dora_kohya.safetensors", handle, save_format="comfyui", dtype=torch.float32)
    other = _pipe(tiny_sd15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other.load_lora_weights(str(kohya))
    record("sd1", "dora", "diffusers load_lora_weights",
           False, float(np.abs(_generate(other) - image).max()), note="drops dora_scale: loads a plain LoRA")
    assert np.abs(_generate(other) - image).max() > 1e-3


def test_dora_loads_in_diffusers_flux(tiny_flux, tmp_path):
    import diffusers

    from aitk.models.flux import flux_lora_candidates

    def render(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt="a red circle", height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
                    max_sequence_length=32, generator=torch.Generator().manual_seed(3), output_type="latent").images

    pipe = diffusers.FluxPipeline.from_pretrained(tiny_flux)
    base = render(pipe)
    handle = build_network(pipe.transformer, network_type="dora", linear_rank=4, linear_alpha=8,
                           candidates=flux_lora_candidates(pipe.transformer), seed=0)
    _randomize(handle)
    handle.set_alphas(6.0, None)
    ours = render(pipe)
    assert (ours - base).abs().max() > 1e-3
    path = save_lora(tmp_path / "dora.safetensors", handle, save_format="diffusers", diffusers_prefix="transformer",
                     dtype=torch.float32)
    fresh = diffusers.FluxPipeline.from_pretrained(tiny_flux)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.load_lora_weights(str(path))
    record("flux", "dora", "diffusers load_lora_weights",
           (max_diff := float((render(fresh) - ours).abs().max())) < 1e-4, max_diff, layout="diffusers")
    assert (render(fresh) - ours).abs().max() < 1e-4


def test_wan_original_names_merge_and_dora_in_diffusers(tmp_path):
    """WAN files use the original checkpoint names (what ComfyUI loads): every kind round-trips
    through merge with them, and a DoRA in the diffusers layout loads in WanPipeline exactly."""
    import diffusers

    from aitk.models.wan import build_tiny_wan
    from aitk.models.wan import is_block_target, lora_key_stem
    from aitk.networks.lora import eligible_modules

    folder = build_tiny_wan(tmp_path / "wan", "t2v")
    pipe = diffusers.WanPipeline.from_pretrained(folder)
    base_model = pipe.transformer.eval()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, base_model.config.in_channels, 5, 8, 8, generator=g), torch.tensor([500]),
              torch.randn(1, 16, base_model.config.text_dim, generator=g))

    def run(model):
        with torch.no_grad():
            return model(*inputs).sample

    base = run(base_model)
    for kind in ("lokr", "loha", "dora"):
        model = copy.deepcopy(base_model)
        handle = build_network(model, network_type=kind, linear_rank=2, linear_alpha=4, seed=0,
                               candidates=[n for n in eligible_modules(model) if is_block_target(n)])
        _randomize(handle)
        ours = run(model)
        assert (ours - base).abs().max() > 1e-3
        path = save_lora(tmp_path / f"{kind}.safetensors", handle, prefix="diffusion_model.", key_for=lora_key_stem,
                         dtype=torch.float32)
        keys = load_file(str(path))
        assert all(k.startswith("diffusion_model.blocks.") for k in keys)
        assert {"lokr": "diffusion_model.blocks.0.self_attn.q.lokr_w1",
                "loha": "diffusion_model.blocks.0.self_attn.q.hada_w1_a",
                "dora": "diffusion_model.blocks.0.self_attn.q.dora_scale"}[kind] in keys
        merged = copy.deepcopy(base_model)
        assert len(merge_network_file(merged, path, key_for=lora_key_stem)) == len(handle.wrapped_module_names())
        record("wan21", kind, "aitk merge", (max_diff := float((run(merged) - ours).abs().max())) < 1e-4, max_diff)
        assert (run(merged) - ours).abs().max() < 1e-4
    path = save_lora(tmp_path / "dora_d.safetensors", handle, save_format="diffusers", diffusers_prefix="transformer",
                     dtype=torch.float32)
    fresh = diffusers.WanPipeline.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.load_lora_weights(str(path))
    record("wan21", "dora", "diffusers load_lora_weights",
           (max_diff := float((run(fresh.transformer.eval()) - ours).abs().max())) < 1e-4, max_diff, layout="diffusers")
    assert (run(fresh.transformer.eval()) - ours).abs().max() < 1e-4


# --- through the Trainer: SD 1.5 and FLUX, save and identical resume ---------------------------------
TRAIN_NETS = {
    "lokr": {"type": "lokr", "linear": 2, "linear_alpha": 4, "lokr_factor": -1},
    "loha": {"type": "loha", "linear": 4, "linear_alpha": 4},
    "dora": {"type": "lora", "dora": True, "linear": 4, "linear_alpha": 8},
}


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
    from aitk.models.flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "flux_dev", "dev")


def _job(arch: str, kind: str, name: str, tiny_sd15, tiny_flux, data, tmp_path) -> Path:
    model = tiny_sd15 if arch == "sd15" else tiny_flux
    changes = {
        "network": TRAIN_NETS[kind],
        "train": {"steps": 4, "lr": 5e-3, "lr_scheduler": "constant"},
        "save": {"save_every": 2},
    }
    if arch == "flux":
        changes["model"] = {"arch": "flux"}
    process = deep_update(base_process(model, data, tmp_path / "out"), changes)
    return write_job(tmp_path / f"{name}.yaml", name, process)


def _train(job: Path, **kwargs):
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    loaded = load_job_file(job)
    trainer = Trainer(loaded.job, loaded.job.config.process[0], **kwargs)
    return trainer, trainer.run()


def _losses(result, name: str) -> list[float]:
    lines = (result.output_dir / f"metrics_{name}.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.mark.parametrize("arch", ["sd15", "flux"])
@pytest.mark.parametrize("kind", list(TRAIN_NETS))
def test_trains_saves_and_resumes_identically(arch, kind, tiny_sd15, tiny_flux, shapes_dataset, tmp_path):
    trainer, straight = _train(_job(arch, kind, "straight", tiny_sd15, tiny_flux, shapes_dataset, tmp_path))
    assert straight.state == "completed" and straight.step == 4
    losses = _losses(straight, "straight")
    assert len(losses) == 4 and all(np.isfinite(losses))
    handle = trainer.network.first
    assert handle.algo == kind
    start = _build_like(trainer, trainer.seed).network_state_dict()  # where training started
    moved = [k for k, v in handle.network_state_dict().items() if not torch.equal(v, start[k])]
    assert moved, "training changed no weight"

    (path,) = straight.final_loras
    tensors = load_file(str(path))
    adapter = trainer.adapter
    expected: set[str] = set()
    for name in handle.wrapped_module_names():
        if kind == "dora":
            parts = [f"{w}.weight" for w in adapter_weight_names(adapter)] + ["dora_scale"]
        else:
            parts = list(handle.layer_parameters(name))
        expected |= {f"{adapter.lora_key_stem(name)}.{p}" for p in parts + ["alpha"]}
    assert set(tensors) == expected
    allowed = {"lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"},
               "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}}.get(kind)
    if allowed:
        assert {k.rsplit(".", 1)[1] for k in tensors} - {"alpha"} <= allowed
    if kind == "lokr":
        assert any(k.endswith(".lokr_w2_a") for k in tensors)  # rank 2: decomposed where the factor is large
    if arch == "flux":
        assert all(k.startswith("transformer.") for k in tensors)
    # the file loads back into a network of the same configuration: the trained weights, exactly
    # (save dtype float32 in these jobs)
    loaded = _build_like(trainer, seed=123)
    load_network_file(loaded, path, prefix=adapter.lora_prefix, key_for=adapter.lora_key_stem)
    state = handle.network_state_dict()
    assert all(torch.equal(loaded.network_state_dict()[k], state[k]) for k in state)

    job = _job(arch, kind, "resumed", tiny_sd15, tiny_flux, shapes_dataset, tmp_path)

    def stop_at_2(trainer, step):
        if step == 2:
            trainer.stop.request("test")

    _, first = _train(job, on_step_end=stop_at_2)
    assert first.state == "stopped" and first.step == 2
    _, second = _train(job)
    assert second.state == "completed" and second.step == 4
    assert _losses(second, "resumed") == losses
    x, y = load_file(str(straight.final_loras[0])), load_file(str(second.final_loras[0]))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def adapter_weight_names(adapter) -> tuple[str, str]:
    return adapter.lora_weight_names


def _build_like(trainer, seed: int):
    """A network like the trainer's, on a copy of its frozen model (the trainer's seed: its start)."""
    net = trainer.process.network
    module = copy.deepcopy(trainer.network.first.module)
    # the copy carries the trained adapter: strip it by building on the base layers' model
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, sub in list(module.named_modules()):
        for child_name, child in list(sub.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(sub, child_name, child.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config
    return build_network(
        module, network_type=net.type, dora=net.dora, linear_rank=net.linear_rank,
        linear_alpha=net.linear_alpha_value, conv_rank=net.conv_rank, conv_alpha=net.conv_alpha_value,
        candidates=trainer.adapter.network_candidates(net.conv_rank is not None), seed=seed,
        lokr_factor=net.lokr_factor, lokr_full_rank=net.lokr_full_rank,
    )
