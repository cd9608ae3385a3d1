"""The diffusion training loss: train.loss_type, train.huber_c, loss masks.

train.noise_offset and train.min_snr_gamma's weights are drawn by the adapters (aitk.models.noise);
the weights reach `diffusion_loss` as NoisyBatch.loss_weights."""

from __future__ import annotations

import torch

LOSS_TYPES = ("mse", "mae", "l1", "pseudo_huber", "huber")


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    loss_type: str = "mse",
    huber_c: float = 0.1,
    sample_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar loss, computed in float32.

    Per element: mse (x^2), mae / l1 (|x|), pseudo_huber / huber (2c * (sqrt(x^2 + c^2) - c),
    the kohya / diffusers form: ~x^2 near 0 so it is on the MSE scale, ~2c|x| far out),
    with x = pred - target and c = huber_c.
    mask (optional, broadcastable to pred): multiplies the per-element loss before averaging.
    Each sample's loss is the mean over its non-batch dims; the batch loss is
    sum_i(w_i * l_i) / B with sample_weights w of shape (B,) (min-SNR weights, loss_multiplier),
    i.e. the plain batch mean when no weights are given.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    x = pred.float() - target.float()
    kind = loss_type.lower()
    if kind == "mse":
        el = x * x
    elif kind in ("mae", "l1"):
        el = x.abs()
    elif kind in ("pseudo_huber", "huber"):
        c = float(huber_c)
        if c <= 0:
            raise ValueError(f"train.huber_c: {huber_c!r} must be > 0")
        el = 2.0 * c * (torch.sqrt(x * x + c * c) - c)
    else:
        raise ValueError(f"train.loss_type: unknown {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if mask is not None:
        el = el * mask.to(device=el.device, dtype=torch.float32)
    per_sample = el.reshape(el.shape[0], -1).mean(dim=1) if el.ndim > 1 else el
    if sample_weights is None:
        return per_sample.mean()
    w = sample_weights.to(device=per_sample.device, dtype=torch.float32).reshape(-1)
    if w.shape[0] != per_sample.shape[0]:
        raise ValueError(f"sample_weights has {w.shape[0]} entries for a batch of {per_sample.shape[0]}")
    return (per_sample * w).mean()


def latent_mask(masks: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel loss masks (B, 1, H, W) in [0, 1] at the training target's resolution.

    Each latent cell gets the mean of the pixels it covers (area pooling), so a mask edge gives a
    partial weight. Works for image targets (B, C, h, w) and video targets (B, C, F, h, w) (the
    mask applies to every frame). Returns a tensor that broadcasts against `target`.
    """
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"masks must be (B, 1, H, W), got {tuple(masks.shape)}")
    if target.ndim not in (4, 5):
        raise ValueError(
            f"a loss mask needs an image- or video-shaped target, got {tuple(target.shape)}"
        )
    size = tuple(target.shape[-2:])
    pooled = torch.nn.functional.adaptive_avg_pool2d(masks.float(), size)
    return pooled.unsqueeze(2) if target.ndim == 5 else pooled
