"""Diffusion loss (aitk.trainer.loss), min-SNR weights and noise offset (aitk.models.noise)."""

from __future__ import annotations

import math

import pytest
import torch

from aitk.models.noise import apply_noise_offset, min_snr_weights
from aitk.trainer.loss import diffusion_loss

PRED = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
ZERO = torch.zeros(2, 2)


def test_mse_mae():
    assert diffusion_loss(PRED, ZERO).item() == pytest.approx((2.5 + 12.5) / 2)
    assert diffusion_loss(PRED, ZERO, loss_type="mae").item() == pytest.approx(2.5)
    assert diffusion_loss(PRED, ZERO, loss_type="l1").item() == pytest.approx(2.5)
    assert diffusion_loss(ZERO, PRED, loss_type="mae").item() == pytest.approx(2.5)


def test_pseudo_huber_and_alias():
    c = 1.0
    el = [2 * c * (math.sqrt(v * v + c * c) - c) for v in (1.0, 2.0, 3.0, 4.0)]
    expected = ((el[0] + el[1]) / 2 + (el[2] + el[3]) / 2) / 2
    for kind in ("pseudo_huber", "huber"):
        assert diffusion_loss(PRED, ZERO, loss_type=kind, huber_c=c).item() == pytest.approx(expected)
    small = torch.full((1, 4), 1e-3)  # near 0 it is on the MSE scale
    assert diffusion_loss(small, torch.zeros(1, 4), loss_type="pseudo_huber", huber_c=0.1).item() == pytest.approx(
        1e-6, rel=1e-3
    )


def test_sample_weights_and_shapes():
    w = torch.tensor([2.0, 0.0])
    assert diffusion_loss(PRED, ZERO, sample_weights=w).item() == pytest.approx(2 * 2.5 / 2)
    p4 = PRED.reshape(2, 1, 1, 2).repeat(1, 3, 2, 1).half()  # (B, C, H, W), fp16 in
    out = diffusion_loss(p4, torch.zeros_like(p4), sample_weights=torch.tensor([1.0, 1.0]))
    assert out.dtype == torch.float32 and out.ndim == 0 and out.item() == pytest.approx(7.5)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert diffusion_loss(PRED, ZERO, mask=mask).item() == pytest.approx((0.5 + 4.5) / 2)
    with pytest.raises(ValueError, match="loss_type"):
        diffusion_loss(PRED, ZERO, loss_type="wavelet")


def test_min_snr_weights_match_formula():
    ac = torch.tensor([0.5, 0.8, 0.9999], dtype=torch.float64)
    t = torch.tensor([0, 1, 2])
    snr = [1.0, 4.0, 0.9999 / 0.0001]
    gamma = 5.0
    eps = min_snr_weights(t, ac, gamma, "epsilon")
    assert eps.shape == (3,) and eps.dtype == torch.float32
    assert eps.tolist() == pytest.approx([min(s, gamma) / s for s in snr], rel=1e-5)
    v = min_snr_weights(t, ac, gamma, "v_prediction")
    assert v.tolist() == pytest.approx([min(s, gamma) / (s + 1) for s in snr], rel=1e-5)
    x0 = min_snr_weights(t, ac, gamma, "sample")
    assert x0.tolist() == pytest.approx([min(s, gamma) for s in snr], rel=1e-5)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        min_snr_weights(t, ac, gamma, "flow_matching")


def test_noise_offset():
    noise = torch.randn(2, 3, 4, 4)
    assert apply_noise_offset(noise, 0.0, None) is noise
    g = torch.Generator().manual_seed(7)
    out = apply_noise_offset(noise, 0.1, g)
    shift = 0.1 * torch.randn(2, 3, 1, 1, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(out, noise + shift)
    video = torch.zeros(2, 3, 2, 4, 4)
    d = apply_noise_offset(video, 0.5, torch.Generator().manual_seed(0))
    assert d.shape == video.shape
    assert torch.allclose(d, d[:, :, :1, :1, :1].expand_as(d))  # one shift per (sample, channel)
