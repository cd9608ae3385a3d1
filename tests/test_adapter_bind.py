"""`ModelAdapter.bind` and `example_batch` for every arch, on the tiny models.

An adapter bound to the modules another one loaded, with the configs `aitk plan` reads from the
same folder (aitk.plan.sources.ModelSpec, the tokenizers' lengths, the scheduler's config), draws
the same noisy batch and predicts the same as the loaded one; `example_batch` gives `predict`
inputs of the shapes the trainer's own batch has.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from aitk.config.schema import ModelConfig, TrainConfig
from aitk.models.archs import ADAPTERS
from aitk.models.base import BatchContext, ModelAdapter, NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.registry import adapter_class

SIZE = 64  # pixels per side: even latents for FLUX's 2x2 patches, whole blocks for the UNets


def tiny_folder(root: Path, arch: str) -> Path:
    """The tiny model folder of `arch` (one per builder variant, built once)."""
    from conftest import TINY_VARIANT_OF_ARCH, build_tiny_model_for

    assert arch in TINY_VARIANT_OF_ARCH, f"{arch}: add its tiny builder variant to tests/conftest.py TINY_VARIANT_OF_ARCH"
    return build_tiny_model_for(arch, root)


def test_every_arch_has_a_tiny_model():
    from conftest import TINY_VARIANT_OF_ARCH

    assert set(TINY_VARIANT_OF_ARCH) == set(ADAPTERS)


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bind_models")


def folder_configs(folder: Path, arch: str) -> PartConfigs:
    """What the plan knows of `folder` (no weights), with the scheduler config beside it."""
    from aitk.plan.planner import _tokenizer_lengths
    from aitk.plan.sources import model_spec

    configs = model_spec(str(folder), arch).configs(_tokenizer_lengths(str(folder)))
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return dataclasses.replace(configs, scheduler=scheduler)


def new_adapter(arch: str, folder: Path) -> ModelAdapter:
    return adapter_class(arch)(ModelConfig(name_or_path=str(folder), arch=arch), torch.device("cpu"), torch.float32)


def pixels(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1


def tensor_extras(extra: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in extra.items() if isinstance(value, torch.Tensor)}


def assert_same_batch(a: NoisyBatch, b: NoisyBatch) -> None:
    assert torch.equal(a.noisy_latents, b.noisy_latents)
    assert torch.equal(a.timesteps, b.timesteps)
    assert torch.equal(a.target, b.target)
    assert (a.loss_weights is None) == (b.loss_weights is None)
    assert a.extra.keys() == b.extra.keys()
    for key, value in a.extra.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b.extra[key]), key
        else:
            assert value == b.extra[key], key


@pytest.fixture(scope="module")
def loaded_and_bound(models_root: Path) -> dict[str, tuple[ModelAdapter, ModelAdapter]]:
    """arch -> (adapter after load(), a fresh adapter bound to the same modules)."""
    pairs = {}
    for arch in sorted(ADAPTERS):
        folder = tiny_folder(models_root, arch)
        loaded = new_adapter(arch, folder)
        loaded.load()
        bound = new_adapter(arch, folder)
        bound.bind(loaded.loaded_parts(), folder_configs(folder, arch))
        pairs[arch] = (loaded, bound)
    return pairs


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_bound_adapter_draws_and_predicts_as_the_loaded_one(loaded_and_bound, arch):
    loaded, bound = loaded_and_bound[arch]
    images = pixels()
    latents = loaded.encode_images(images)
    context = BatchContext(controls=images) if loaded.uses_controls else None
    # min_snr_gamma only where the objective has it (DDPM models); flow models refuse it
    train_cfg = TrainConfig(min_snr_gamma=5.0) if hasattr(loaded, "alphas_cumprod") else TrainConfig()
    cond = loaded.encode_prompts(["a red square", "a blue circle"])
    with torch.no_grad():
        for seed in (0, 1):
            from_load = loaded.make_noisy_batch(latents, train_cfg, torch.Generator().manual_seed(seed), context)
            from_bind = bound.make_noisy_batch(latents, train_cfg, torch.Generator().manual_seed(seed), context)
            assert_same_batch(from_load, from_bind)
            assert torch.equal(loaded.predict(from_load, cond), bound.predict(from_bind, cond))


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_example_batch_has_the_trainers_shapes_and_runs_through_predict(loaded_and_bound, arch):
    loaded, bound = loaded_and_bound[arch]
    images = pixels()
    real: tuple[NoisyBatch, PromptEmbeds] = (
        loaded.make_noisy_batch(
            loaded.encode_images(images), TrainConfig(), torch.Generator().manual_seed(0),
            BatchContext(controls=images) if loaded.uses_controls else None,
        ),
        loaded.encode_prompts(["a red square", "a blue circle"]),
    )
    frames = 1  # the real batch above is of stills
    for expert in bound.trained_experts():
        noisy, cond = bound.example_batch(2, (SIZE, SIZE), frames, expert=expert, with_controls=bound.uses_controls)
        assert noisy.noisy_latents.shape == real[0].noisy_latents.shape
        assert noisy.target.shape == real[0].target.shape
        assert tensor_extras(noisy.extra) == tensor_extras(real[0].extra)
        assert noisy.extra.get("expert", expert) == expert
        # prompts that keep their own length (Qwen-Image: a batch pads to its longest, the mask says
        # where) have no one length: the example holds the longest a batch can have
        length, real_length = cond.hidden_states.shape[1], real[1].hidden_states.shape[1]
        assert length == real_length or ("mask" in real[1].extra and length > real_length)

        def at_real_length(shape: torch.Size) -> tuple[int, ...]:  # dim 1 of the tokens
            return (shape[0], real_length, *shape[2:]) if len(shape) > 1 and shape[1] == length else tuple(shape)

        assert at_real_length(cond.hidden_states.shape) == real[1].hidden_states.shape
        assert {k: at_real_length(v.shape) for k, v in cond.extra.items()} == {
            k: tuple(v.shape) for k, v in real[1].extra.items()
        }
        with torch.no_grad():
            prediction = bound.predict(noisy, cond)
        assert prediction.shape == noisy.target.shape
        assert torch.isfinite(prediction).all()
    if bound.frame_rule:  # video: 9 frames make 3 latent frames under a 4k+1 rule, 2 under 8k+1
        step = int(bound.frame_rule.split("k")[0])
        noisy, _ = bound.example_batch(1, (SIZE, SIZE), 9, expert=bound.trained_experts()[0], with_controls=False)
        assert noisy.noisy_latents.shape[2] == 8 // step + 1


def test_bind_refuses_parts_the_adapter_does_not_have(loaded_and_bound):
    loaded, _ = loaded_and_bound["sd15"]
    fresh = new_adapter("sd15", Path("unused"))
    with pytest.raises(ValueError, match="unknown parts"):
        fresh.bind({"transformer": loaded.unet}, PartConfigs())
