"""Parts the tiny model builders (each family's tiny*.py: sd/tiny.py, flux/tiny.py, ...) share.

The folder's version marker, the offline CLIP and T5-family tokenizers, the small CLIP text
encoder, 8x-downscale AutoencoderKL and two-level UNet configurations, and writing the folder.
Changing anything here changes every builder's saved files: bump each builder's version marker.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch


#: the file in a built folder that records what was built (its version and options)
MARKER_NAME = "aitk_tiny.json"
#: every printable ASCII character: the T5-family vocabularies keep each one, so any ASCII
#: prompt tokenizes without <unk>
PRINTABLE = string.ascii_letters + string.digits + string.punctuation
#: CLIP's context length; the tiny CLIP text encoders have as many positions
CLIP_MAX_LENGTH = 77


def is_built(folder: Path, **expected: object) -> bool:
    """Whether `folder` already holds a build whose marker records each of `expected` (version,
    variant, ...), so the builder can keep it instead of writing it again."""
    marker = folder / MARKER_NAME
    if not marker.exists():
        return False
    info = json.loads(marker.read_text())
    return all(info.get(key) == value for key, value in expected.items())


def save_pipeline(pipe: Any, folder: Path, marker: Mapping[str, object]) -> Path:
    """Write `pipe` to `folder` as a diffusers folder (safetensors), then its marker.

    The marker comes last, so an interrupted save is rebuilt next time instead of kept.
    """
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / MARKER_NAME).write_text(json.dumps(dict(marker)))
    return folder


def build_once(
    folder: str | Path,
    seed: int,
    marker: Mapping[str, object],
    make_pipeline: Callable[[], Any],
    match: tuple[str, ...] = ("version",),
) -> Path:
    """The builders' common frame: keep `folder` when its marker has `marker`'s values for the keys
    in `match`; else seed torch's generator with `seed`, build and save `make_pipeline()`.

    Seeding here, right before the first module is made, keeps the weights a function of `seed`.
    """
    folder = Path(folder)
    if is_built(folder, **{key: marker[key] for key in match}):
        return folder
    torch.manual_seed(seed)
    return save_pipeline(make_pipeline(), folder, marker)


def check_variant(variant: str, variants: tuple[str, ...]) -> None:
    """Refuse a variant the builder does not know before anything is written."""
    if variant not in variants:
        raise ValueError(f"variant {variant!r} is not one of {', '.join(variants)}")


def byte_level_vocab() -> tuple[dict[str, int], list[str]]:
    """A character-level CLIP vocabulary (each byte, alone and word-final) and no merges.

    Built offline in milliseconds; the tokenizer class, special tokens and max length are CLIP's.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, []


def clip_tokenizer(**kwargs: Any) -> Any:
    """A CLIPTokenizer over `byte_level_vocab`; `kwargs` adds options (e.g. SDXL's pad_token)."""
    from transformers import CLIPTokenizer

    vocab, merges = byte_level_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH, **kwargs)


def clip_text_config(width: int = 32, layers: int = 2, act: str = "quick_gelu") -> Any:
    """A small CLIPTextConfig matching `clip_tokenizer`'s vocabulary and special-token ids.

    "quick_gelu" is CLIPTextConfig's own default (CLIP-L's activation).
    """
    from transformers import CLIPTextConfig

    vocab_size = len(byte_level_vocab()[0])  # 514: 256 bytes, alone and word-final, + 2 specials
    return CLIPTextConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=width,
        hidden_act=act,
    )


def t5_tokenizer(vocab: list[tuple[str, float]], max_length: int) -> Any:
    """A T5Tokenizer (the class T5 and umT5 use) over a Unigram `vocab` in T5's layout
    (<pad>=0, </s>=1, <unk>=2); no <extra_id_N> sentinels, so its size is exactly len(vocab)."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def tiny_autoencoder_kl(latent_channels: int, **kwargs: Any) -> Any:
    """An AutoencoderKL with 4 blocks (an 8x downscale, as the real SD / SDXL / FLUX VAEs) of 16
    channels; `kwargs` adds the model's own settings (scaling factor, shift, quant convs)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        **kwargs,
    )


def tiny_unet(sample_size: int = 8, **kwargs: Any) -> Any:
    """A two-level UNet2DConditionModel over 4-channel latents of `sample_size` (8: 64 px images
    through the tiny VAE); `kwargs` gives the blocks and conditioning of the model it stands for."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        **kwargs,
    )


def small_decoder_config(vocab_size: int, width: int, max_positions: int, pad_token_id: int | None,
                         **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of a 2-layer decoder language model's config (Qwen3, GLM ...) as the
    tiny text encoders use it: 4 query heads of 8, 2 key / value heads, a 64-wide MLP."""
    return {
        "vocab_size": vocab_size, "hidden_size": width, "intermediate_size": 64,
        "num_hidden_layers": 2,  # the pipelines read the second-to-last hidden states
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "max_position_embeddings": max_positions, "pad_token_id": pad_token_id, **overrides,
    }
