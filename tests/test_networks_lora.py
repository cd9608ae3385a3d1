"""LoRA / LoCon injection: targeting, live alpha, multiplier, state dicts, seeded init."""

from __future__ import annotations

import pytest
import torch

from aitk.networks.lora import inject_network, select_targets
from aitk.networks.targets import unet_lora_candidates

LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"
CONV_1X1 = "down_blocks.0.attentions.0.proj_in"


@pytest.fixture
def unet(tiny_sd15):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").eval()


def _randomize(handle, seed: int = 1, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10, 500]),
        torch.randn(2, 77, 32, generator=g),
    )


def _run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


# --- targeting --------------------------------------------------------------------------------
def test_default_unet_candidates(unet):
    lora = unet_lora_candidates(unet, include_conv=False)
    locon = unet_lora_candidates(unet, include_conv=True)
    assert len(lora) == 48  # 4 transformer blocks x (proj_in, 8 attention, 2 ff, proj_out)
    assert all(".attentions." in n for n in lora)
    assert LINEAR in lora and CONV_1X1 in lora
    assert "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj" in lora
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0" in lora
    assert set(lora) < set(locon) and len(locon) == 79
    for name in (
        CONV,
        "down_blocks.0.resnets.0.conv2",
        "down_blocks.0.resnets.0.time_emb_proj",
        "down_blocks.1.resnets.0.conv_shortcut",
        "down_blocks.0.downsamplers.0.conv",
        "up_blocks.0.upsamplers.0.conv",
        "mid_block.resnets.1.conv2",
    ):
        assert name in locon
    for never in ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"):
        assert never not in locon


def test_only_and_ignore_select_exact_names(unet):
    names = select_targets(
        unet,
        candidates=unet_lora_candidates(unet, include_conv=False),
        only_if_contains=["attn1"],
        ignore_if_contains=["to_k", "up_blocks"],
    )
    expected = [
        f"{block}.attentions.0.transformer_blocks.0.attn1.{leaf}"
        for block in ("down_blocks.0", "mid_block")
        for leaf in ("to_q", "to_v", "to_out.0")
    ]
    assert sorted(names) == sorted(expected)

    # ignore wins over only_if_contains
    names = select_targets(
        unet,
        candidates=unet_lora_candidates(unet, include_conv=False),
        only_if_contains=["attn2.to_q", "ff.net.2"],
        ignore_if_contains=["attn2"],
    )
    assert sorted(names) == sorted(
        f"{b}.transformer_blocks.0.ff.net.2"
        for b in (
            "down_blocks.0.attentions.0",
            "mid_block.attentions.0",
            "up_blocks.1.attentions.0",
            "up_blocks.1.attentions.1",
        )
    )

    handle = inject_network(
        unet, linear_rank=2, linear_alpha=2, only_if_contains=["attn1"], ignore_if_contains=["to_k", "up_blocks"],
        candidates=unet_lora_candidates(unet, include_conv=False),
    )
    assert sorted(handle.wrapped_module_names()) == sorted(expected)


def test_kxk_convs_only_with_conv_rank(unet):
    # candidates=None: every Linear/Conv2d; without conv_rank only 1x1 convs qualify
    names = select_targets(unet, only_if_contains=["conv"])
    assert sorted(names) == sorted(
        [
            "down_blocks.1.resnets.0.conv_shortcut",
            "up_blocks.0.resnets.0.conv_shortcut",
            "up_blocks.0.resnets.1.conv_shortcut",
            "up_blocks.1.resnets.0.conv_shortcut",
            "up_blocks.1.resnets.1.conv_shortcut",
        ]
    )
    with_conv = select_targets(unet, conv_rank=2, only_if_contains=["conv"])
    assert "conv_in" in with_conv and CONV in with_conv and len(with_conv) == 25  # conv_in, conv_out, 16 resnet, 2 sampler, 5 shortcut


def test_zero_targets_error_names_filters(unet):
    with pytest.raises(ValueError) as err:
        inject_network(
            unet, linear_rank=4, linear_alpha=4, only_if_contains=["attn2.to_q"], ignore_if_contains=["attn2"],
            candidates=unet_lora_candidates(unet, include_conv=False),
        )
    msg = str(err.value)
    assert "attn2.to_q" in msg and "ignore_if_contains" in msg and "proj_in" in msg
    with pytest.raises(ValueError, match="not Linear/Conv2d"):
        select_targets(unet, candidates=["no.such.module"])


# --- scale: alpha / rank, live ------------------------------------------------------------------
def _check_layer(layer, adapter: str, scale: float) -> None:
    g = torch.Generator().manual_seed(3)
    base = layer.get_base_layer()
    if isinstance(base, torch.nn.Conv2d):
        x = torch.randn(2, base.in_channels, 8, 8, generator=g)
    else:
        x = torch.randn(2, 5, base.in_features, generator=g)
    with torch.no_grad():
        delta = layer.lora_B[adapter](layer.lora_A[adapter](x))
        expected = base(x) + scale * delta
        got = layer(x)
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_set_alphas_live(unet):
    handle = inject_network(
        unet, linear_rank=4, linear_alpha=8, conv_rank=2, conv_alpha=2,
        candidates=unet_lora_candidates(unet, include_conv=True), seed=0,
    )
    _randomize(handle)
    layers = handle.lora_layers()
    params_before = [id(p) for p in handle.trainable_parameters()]
    a = handle.adapter_name
    assert handle.is_conv_module(CONV) and not handle.is_conv_module(CONV_1X1)
    assert handle.module_rank(CONV) == 2 and handle.module_rank(LINEAR) == 4 and handle.module_rank(CONV_1X1) == 4

    _check_layer(layers[LINEAR], a, 8 / 4)
    _check_layer(layers[CONV_1X1], a, 8 / 4)
    _check_layer(layers[CONV], a, 2 / 2)

    inputs = _unet_inputs()
    before = _run(unet, inputs)
    handle.set_alphas(3.0, 5.0)
    assert handle.linear_alpha == 3.0 and handle.conv_alpha == 5.0
    assert handle.module_alpha(LINEAR) == 3.0 and handle.module_alpha(CONV) == 5.0
    _check_layer(layers[LINEAR], a, 3 / 4)
    _check_layer(layers[CONV_1X1], a, 3 / 4)
    _check_layer(layers[CONV], a, 5 / 2)
    assert (_run(unet, inputs) - before).abs().max() > 1e-4

    handle.set_alphas(6.0, None)  # conv alpha unchanged
    assert handle.conv_alpha == 5.0
    _check_layer(layers[LINEAR], a, 6 / 4)
    _check_layer(layers[CONV], a, 5 / 2)

    handle.set_multiplier(0.5)
    _check_layer(layers[LINEAR], a, 0.5 * 6 / 4)
    _check_layer(layers[CONV], a, 0.5 * 5 / 2)
    assert handle.linear_alpha == 6.0 and handle.module_alpha(LINEAR) == 6.0  # multiplier is not alpha
    handle.set_alphas(4.0, 2.0)
    _check_layer(layers[LINEAR], a, 0.5 * 4 / 4)
    handle.set_multiplier(1.0)
    _check_layer(layers[CONV], a, 2 / 2)
    assert [id(p) for p in handle.trainable_parameters()] == params_before  # nothing rebuilt


def test_multiplier_zero_gives_base_output(unet):
    inputs = _unet_inputs()
    base = _run(unet, inputs)
    handle = inject_network(unet, linear_rank=4, linear_alpha=4, candidates=unet_lora_candidates(unet, False))
    _randomize(handle)
    assert (_run(unet, inputs) - base).abs().max() > 1e-3
    handle.set_multiplier(0.0)
    torch.testing.assert_close(_run(unet, inputs), base)


def test_conv_alpha_defaults_to_conv_rank(unet):
    handle = inject_network(unet, linear_rank=4, linear_alpha=1, conv_rank=8, candidates=unet_lora_candidates(unet, True))
    assert handle.conv_alpha == 8.0 and handle.module_alpha(CONV) == 8.0 and handle.module_alpha(LINEAR) == 1.0


# --- parameters and state ---------------------------------------------------------------------
def test_trainable_parameters_and_frozen_base(unet):
    handle = inject_network(unet, linear_rank=4, linear_alpha=8, candidates=unet_lora_candidates(unet, False))
    named = handle.named_trainable_parameters()
    assert len(named) == 2 * len(handle.wrapped_module_names())
    assert f"{LINEAR}.lora_A.weight" in named and f"{LINEAR}.lora_B.weight" in named
    assert all("default" not in k for k in named)
    assert all(p.requires_grad for p in named.values())
    lora_ids = {id(p) for p in named.values()}
    others = [p for p in unet.parameters() if id(p) not in lora_ids]
    assert others and not any(p.requires_grad for p in others)
    assert handle.trainable_parameters() == list(named.values())
    assert named[f"{LINEAR}.lora_A.weight"].shape == (4, 32)


def test_state_dict_round_trip(tiny_sd15, unet):
    from diffusers import UNet2DConditionModel

    kw = dict(linear_rank=4, linear_alpha=8, conv_rank=4, conv_alpha=2)
    h1 = inject_network(unet, candidates=unet_lora_candidates(unet, True), seed=1, **kw)
    _randomize(h1, seed=5)
    state = h1.network_state_dict()
    assert all(not t.requires_grad for t in state.values())
    inputs = _unet_inputs()
    out1 = _run(unet, inputs)

    fresh = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").eval()
    h2 = inject_network(fresh, candidates=unet_lora_candidates(fresh, True), seed=2, **kw)
    out_untrained = _run(fresh, inputs)
    assert (out_untrained - out1).abs().max() > 1e-3
    h2.load_network_state_dict(state)
    assert torch.equal(_run(fresh, inputs), out1)
    for k, v in h2.network_state_dict().items():
        assert torch.equal(v, state[k])

    # clones: changing the network does not change an earlier state dict
    _randomize(h1, seed=9)
    assert torch.equal(h2.network_state_dict()[f"{LINEAR}.lora_B.weight"], state[f"{LINEAR}.lora_B.weight"])

    bad = dict(state)
    bad.pop(f"{LINEAR}.lora_A.weight")
    bad["nope.lora_A.weight"] = torch.zeros(1)
    with pytest.raises(KeyError) as err:
        h2.load_network_state_dict(bad)
    assert f"{LINEAR}.lora_A.weight" in str(err.value) and "nope.lora_A.weight" in str(err.value)


def test_seeded_init_is_reproducible(tiny_sd15):
    from diffusers import UNet2DConditionModel

    def build(seed):
        u = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
        return inject_network(u, linear_rank=4, linear_alpha=4, conv_rank=2,
                              candidates=unet_lora_candidates(u, True), seed=seed).network_state_dict()

    torch.manual_seed(0)
    a = build(42)
    torch.manual_seed(999)  # global RNG state must not matter
    b = build(42)
    c = build(43)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if ".lora_A." in k)
    assert all(not a[k].any() for k in a if ".lora_B." in k)  # starts as the base model


def test_dtype_option(unet):
    handle = inject_network(unet, linear_rank=2, linear_alpha=2, only_if_contains=["attn1.to_q"],
                            candidates=unet_lora_candidates(unet, False), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in handle.trainable_parameters())


def test_same_adapter_twice_refused(unet):
    inject_network(unet, linear_rank=2, linear_alpha=2, candidates=unet_lora_candidates(unet, False))
    with pytest.raises(ValueError, match="already"):
        inject_network(unet, linear_rank=2, linear_alpha=2, candidates=unet_lora_candidates(unet, False))


def test_second_adapter_stacks_on_wrapped_layers(unet):
    """An adapter already in the model (an assistant LoRA) stays active and frozen; ours trains."""
    inputs = _unet_inputs()
    base = _run(unet, inputs)
    cands = unet_lora_candidates(unet, include_conv=False)
    assistant = inject_network(unet, linear_rank=2, linear_alpha=2, candidates=cands, adapter_name="assistant")
    _randomize(assistant, seed=3)
    with_assistant = _run(unet, inputs)
    ours = inject_network(unet, linear_rank=4, linear_alpha=8, candidates=cands, seed=0)
    assert ours.wrapped_module_names() == assistant.wrapped_module_names()
    assert torch.equal(_run(unet, inputs), with_assistant)  # ours starts at zero, assistant still on
    trainable = {id(p) for p in unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in ours.trainable_parameters()}
    _randomize(ours, seed=4)
    both = _run(unet, inputs)
    assert (both - with_assistant).abs().max() > 1e-3
    ours.set_multiplier(0.0)
    torch.testing.assert_close(_run(unet, inputs), with_assistant)
    assistant.set_multiplier(0.0)
    torch.testing.assert_close(_run(unet, inputs), base)
