"""LoKr / LoHa files in the LyCORIS key layout (what ComfyUI, A1111/Forge and LyCORIS itself read).

Per wrapped module, under the same key stem as our LoRA files (`key_for`, e.g. kohya
`lora_unet_down_blocks_0_..._to_q` for SD / SDXL, `transformer.<path>` for FLUX,
`diffusion_model.blocks.0.self_attn.q` for WAN):
    LoKr: <stem>.lokr_w1            (or <stem>.lokr_w1_a / <stem>.lokr_w1_b)
          <stem>.lokr_w2            (or <stem>.lokr_w2_a / <stem>.lokr_w2_b)
          <stem>.alpha              0-dim float32
    LoHa: <stem>.hada_w1_a, <stem>.hada_w1_b, <stem>.hada_w2_a, <stem>.hada_w2_b, <stem>.alpha
No `.weight` suffix (LyCORIS names the tensors themselves). `.alpha` is the alpha in effect;
the scale convention (alpha / rank; LoKr with only full factors: 1) is in aitk.networks.lycoris.
"""

from __future__ import annotations

import torch

from aitk.networks.lycoris import LycorisHandle

__all__ = ["LOKR_SUFFIXES", "LOHA_SUFFIXES", "LYCORIS_SUFFIXES", "network_to_lycoris", "lycoris_to_network_state"]

LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LYCORIS_SUFFIXES = LOKR_SUFFIXES + LOHA_SUFFIXES


def network_to_lycoris(
    handle: LycorisHandle,
    key_stems: dict[str, str],
    dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """LyCORIS-layout tensors of a LoKr / LoHa network; `key_stems`: module name -> file key stem."""
    out: dict[str, torch.Tensor] = {}
    for name, stem in key_stems.items():
        for suffix, p in handle.layer_parameters(name).items():
            out[f"{stem}.{suffix}"] = p.detach().to(device="cpu", dtype=dtype).contiguous()
        out[f"{stem}.alpha"] = torch.tensor(handle.module_alpha(name), dtype=torch.float32)
    return out


def split_stem(key: str, suffixes: tuple[str, ...]) -> tuple[str, str]:
    """("<stem>.<suffix>") -> (stem, suffix) for a known suffix (stems may contain dots), else (key, "")."""
    for suffix in sorted(suffixes, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return key, ""


def lycoris_to_network_state(
    handle: LycorisHandle,
    tensors: dict[str, torch.Tensor],
    key_stems: dict[str, str],
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Inverse of `network_to_lycoris`: (state in the handle's names, {module: alpha}).

    Alphas are returned for modules with a rank-decomposed factor only (the others ignore it);
    a module without `.alpha` gets alpha = its rank (scale 1, what LyCORIS loaders assume).
    Keys that name no wrapped module, a different LoKr / LoHa structure (a full factor where the
    network has a decomposed one) or missing tensors raise KeyError.
    """
    by_stem = {stem: name for name, stem in key_stems.items()}
    expected = set(handle.named_trainable_parameters())
    state: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    unexpected: list[str] = []
    for key, t in tensors.items():
        stem, suffix = split_stem(key, LYCORIS_SUFFIXES + ("alpha",))
        module = by_stem.get(stem)
        if module is None or not suffix:
            unexpected.append(key)
        elif suffix == "alpha":
            alphas[module] = float(t.item())
        elif f"{module}.{suffix}" in expected:
            state[f"{module}.{suffix}"] = t
        else:
            unexpected.append(key)
    missing = sorted(expected - set(state))
    if unexpected or missing:
        raise KeyError(
            f"{handle.algo} file does not match the network: {len(missing)} missing {missing[:5]}, "
            f"{len(unexpected)} unexpected {unexpected[:5]} (a different algorithm, rank, factor or "
            "lokr_full_rank setting changes the tensors a module has)"
        )
    out_alphas = {
        n: alphas.get(n, float(handle.module_rank(n))) for n in key_stems if handle.is_decomposed(n)
    }
    return state, out_alphas
