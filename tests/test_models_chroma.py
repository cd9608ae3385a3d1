"""Chroma on its tiny random-init model: the T5 padding mask (training, gradient checkpointing and
previews alike), the flow-matching objective, LoRA targets, where the model comes from, and
end-to-end runs (LoRA, DoRA, LoKr, a qint8 base) whose files diffusers loads to the same output and
`aitk convert` / `merge` / `lora info` read.

Everything runs offline on CPU in fp32 with 64 px images.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest's job builders

from aitk.config.schema import TrainConfig  # noqa: E402
from aitk.models.base import ModelLoadError, PromptEmbeds  # noqa: E402
from aitk.models.chroma import MASK_KEY, ChromaAdapter  # noqa: E402
from aitk.models.flow_matching import FlowMatchingConfigError, sample_sigmas  # noqa: E402
from aitk.models.flux import FluxInputError, flux_lora_candidates, image_seq_shift  # noqa: E402
import family_checks as family  # noqa: E402
from conftest import build_tiny_model  # noqa: E402
from interop_results import record  # noqa: E402
from upstream_jobs import extras_on_path  # noqa: E402, F401 - autouse fixture: torchao for model.quantize

CPU = torch.device("cpu")
PROMPT = "a red circle, shp style"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("chroma", tmp_path_factory.mktemp("chroma-model"))


def make_adapter(folder: Path | str, **model_fields: Any) -> ChromaAdapter:
    return family.load_adapter(ChromaAdapter, folder, "chroma", **model_fields)


@pytest.fixture(scope="module")
def chroma(model_dir: Path) -> ChromaAdapter:
    return make_adapter(model_dir)


_batch = family.noisy_batch


# --- text and its mask -----------------------------------------------------------------------------


def test_prompts_are_the_pipelines_t5_encoding_with_one_pad_token_unmasked(chroma: ChromaAdapter,
                                                                           model_dir: Path) -> None:
    from diffusers import ChromaPipeline

    cond = chroma.encode_prompts([PROMPT, "x"])
    stock = ChromaPipeline.from_pretrained(model_dir)
    hidden, _, mask, *_ = stock.encode_prompt([PROMPT, "x"], device=CPU, do_classifier_free_guidance=False,
                                              max_sequence_length=chroma.max_sequence_length)
    assert torch.allclose(cond.hidden_states, hidden, atol=1e-5, rtol=0), (cond.hidden_states - hidden).abs().max()
    tokens = chroma.tokenizer([PROMPT, "x"], padding="max_length", max_length=chroma.max_sequence_length,
                              truncation=True, return_tensors="pt").attention_mask
    assert cond.extra[MASK_KEY].dtype == torch.bool
    assert cond.extra[MASK_KEY].sum(1).tolist() == (tokens.sum(1) + 1).tolist()  # the prompt and one pad
    assert torch.equal(cond.extra[MASK_KEY], mask.bool())


def test_padding_after_the_first_pad_token_changes_nothing(chroma: ChromaAdapter) -> None:
    cond = chroma.encode_prompts(["x", "ab"])
    batch = _batch(chroma)
    kept = int(cond.extra[MASK_KEY][0].sum())  # "x": its tokens and one pad token
    with torch.no_grad():
        base = chroma.predict(batch, cond)
        far = PromptEmbeds(cond.hidden_states.clone(), dict(cond.extra))
        far.hidden_states[~cond.extra[MASK_KEY]] += 5.0  # every masked position of both prompts
        assert torch.allclose(chroma.predict(batch, far), base, atol=1e-6, rtol=0)
        near = PromptEmbeds(cond.hidden_states.clone(), dict(cond.extra))
        near.hidden_states[0, kept - 1] += 5.0  # the one pad token Chroma attends to
        assert (chroma.predict(batch, near) - base)[0].abs().max() > 1e-4


def test_a_checkpointed_step_computes_what_a_plain_one_does(chroma: ChromaAdapter) -> None:
    """diffusers' checkpointed single blocks get no mask of their own; ours hand it to them, in the
    forward pass and in backward's recomputation."""
    cond = chroma.encode_prompts(["x", PROMPT])
    batch = _batch(chroma, seed=1)
    transformer = chroma.transformer
    params = [transformer.single_transformer_blocks[0].attn.to_q.weight,
              transformer.transformer_blocks[0].attn.add_k_proj.weight]

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        for p in params:
            p.grad = None
        out = chroma.predict(batch, cond)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in params]

    for p in params:
        p.requires_grad_(True)
    try:
        plain, plain_grads = step()
        transformer.enable_gradient_checkpointing()
        checkpointed, checkpointed_grads = step()
    finally:
        transformer.disable_gradient_checkpointing()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    assert torch.allclose(checkpointed, plain, atol=1e-6, rtol=0)
    for a, b in zip(plain_grads, checkpointed_grads):
        assert a.abs().max() > 0 and torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_previews_mask_the_padding_as_training_does(chroma: ChromaAdapter) -> None:
    """The preview pipeline hands the transformer a boolean mask (stock ChromaPipeline a float one,
    which SDPA adds to the logits) and renders text and cached embeddings alike."""
    seen: list[torch.dtype] = []
    hook = chroma.transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["attention_mask"].dtype), with_kwargs=True)
    pipe = chroma.sample_pipeline()
    pipe.set_progress_bar_config(disable=True)
    common = dict(height=64, width=64, num_inference_steps=2, guidance_scale=4.0, output_type="latent",
                  max_sequence_length=chroma.max_sequence_length)
    try:
        from_text = pipe(prompt=PROMPT, negative_prompt="", generator=torch.Generator().manual_seed(3), **common)
        cached = chroma.preview_prompt_kwargs(chroma.encode_prompts([PROMPT]), chroma.encode_prompts([""]))
        from_cache = pipe(**cached, generator=torch.Generator().manual_seed(3), **common)
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bool}
    assert len(seen) == 8  # 2 steps x (prompt + negative) x 2 renders: true CFG
    assert torch.equal(from_text.images, from_cache.images)


# --- objective -------------------------------------------------------------------------------------


def test_noise_levels_and_the_training_target(chroma: ChromaAdapter) -> None:
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = chroma.encode_images(pixels)
    for size in (64, 128):
        big = torch.nn.functional.interpolate(latents, size=(size // 8, size // 8))
        batch = chroma.make_noisy_batch(big, TrainConfig(timestep_type="shift"), torch.Generator().manual_seed(4))
        mu = image_seq_shift((size // 16) ** 2, chroma.scheduler_config)
        expected = sample_sigmas(2, TrainConfig(timestep_type="shift"), torch.Generator().manual_seed(4), mu=mu)
        assert torch.allclose(batch.timesteps, expected * 1000)
        sigma = (batch.timesteps / 1000).view(-1, 1, 1, 1)
        noise = (batch.noisy_latents - (1 - sigma) * big) / sigma
        assert torch.allclose(batch.target, noise - big, atol=1e-4)
    weighted = chroma.make_noisy_batch(latents, TrainConfig(timestep_type="weighted"), torch.Generator())
    assert weighted.loss_weights is not None and weighted.loss_weights.shape == (2,)
    with pytest.raises(FlowMatchingConfigError, match="train.min_snr_gamma"):
        chroma.make_noisy_batch(latents, TrainConfig(min_snr_gamma=5), None)
    with pytest.raises(FluxInputError, match="train.bypass_guidance_embedding: Chroma has no guidance"):
        chroma.check_train_settings(TrainConfig(bypass_guidance_embedding=True))
    with pytest.raises(FluxInputError, match="train.attention_backend flash: .*takes no attention mask"):
        chroma.check_train_settings(TrainConfig(attention_backend="flash"))
    chroma.check_train_settings(TrainConfig(attention_backend="sdpa"))


def test_lora_targets_are_fluxs_and_leave_the_approximator_frozen(chroma: ChromaAdapter) -> None:
    names = chroma.network_candidates(include_conv=True)
    assert names == flux_lora_candidates(chroma.transformer)
    assert "transformer_blocks.0.attn.add_q_proj" in names and "single_transformer_blocks.0.proj_mlp" in names
    assert not [n for n in names if n.startswith(("distilled_guidance_layer", "norm_out", "x_embedder"))]


# --- where the model comes from ----------------------------------------------------------------------


def test_load_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model.name_or_path: file .* does not exist"):
        make_adapter(tmp_path / "missing.safetensors")
    with pytest.raises(ModelLoadError, match="neither an existing folder nor a hub id"):
        make_adapter(tmp_path / "no" / "such" / "folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="(?s)could not load a Chroma model from .*ChromaPipeline's layout"):
        make_adapter(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="its newest version, which needs the hub"):
        make_adapter("lodestones/Chroma")  # offline here


def test_a_single_file_and_upstreams_hub_names_load_with_the_extras_folder(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lodestones/Chroma (the newest chroma-unlocked-vNN), lodestones/Chroma/vNN and a local file load
    the transformer through from_single_file and the rest from model_kwargs.extras_name_or_path.
    (diffusers' converter is written for the real model's width, so the tiny one stands in for it.)"""
    import huggingface_hub
    from diffusers import ChromaTransformer2DModel

    checkpoint = tmp_path / "chroma-unlocked-v50.safetensors"
    checkpoint.write_bytes(b"")
    files = ["README.md", "chroma-unlocked-v9.safetensors", "chroma-unlocked-v50.safetensors", "v50-detail.sft"]
    downloads: list[tuple[str, str]] = []
    calls: list[tuple[str, dict]] = []

    def download(repo_id: str, filename: str, **_: Any) -> str:
        downloads.append((repo_id, filename))
        return str(checkpoint)

    def from_single_file(path: str, **kwargs: Any) -> Any:
        calls.append((path, kwargs))
        return ChromaTransformer2DModel.from_pretrained(kwargs["config"], subfolder="transformer")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(ChromaTransformer2DModel, "from_single_file", from_single_file)
    extras = {"extras_name_or_path": str(model_dir)}
    for name in ("lodestones/Chroma", "lodestones/Chroma/v9", str(checkpoint)):
        adapter = make_adapter(name, model_kwargs=extras)
        assert adapter.text_encoder is not None and adapter.vae is not None
    assert downloads == [("lodestones/Chroma", "chroma-unlocked-v50.safetensors"),
                         ("lodestones/Chroma", "chroma-unlocked-v9.safetensors")]
    assert [c[0] for c in calls] == [str(checkpoint)] * 3
    assert all(c[1]["config"] == str(model_dir) and c[1]["subfolder"] == "transformer" for c in calls)


# --- end to end ------------------------------------------------------------------------------------------


def _job(tmp_path: Path, name: str, model_dir: Path, data: Path, **changes: Any) -> Path:
    return family.write_job(tmp_path, name, model_dir, data, {
        "model": {"arch": "chroma"},
        # overfit a few images: 30 steps lower the loss clearly at this size
        "train": {"steps": 30, "batch_size": 2, "lr": 5e-3, "gradient_checkpointing": True},
        "network": {"type": "lora", "linear": 8, "linear_alpha": 16},
        "sample": {"sample_every": 1000, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 4.0,
                   "neg": "", "prompts": ["a red circle, [trigger] style"], "seed": 5},
    }, changes)


_train = family.train_to_the_end


def _render(pipe: Any, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(**embeds, height=64, width=64, num_inference_steps=2, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(3), output_type="latent").images


def _diffusers_diff(trainer: Any, model: Path, lora: Path) -> tuple[float, float]:
    """(max |ours - diffusers with the file|, max |ours - the base model|) of a 2-step render from the
    same prompt embeddings (boolean masks, so both pipelines mask as training does)."""
    from diffusers import ChromaPipeline

    embeds = trainer.adapter.preview_prompt_kwargs(trainer.adapter.encode_prompts([PROMPT]),
                                                   trainer.adapter.encode_prompts([""]))
    return family.diffusers_lora_diff(trainer.adapter, ChromaPipeline, model, lora, lambda p: _render(p, embeds))


@pytest.fixture(scope="module")
def lora_run(model_dir: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("chroma-lora")
    return (*_train(_job(tmp, "lora", model_dir, shapes_dataset)), tmp)


def test_lora_trains_and_loads_exactly_in_diffusers(lora_run: tuple, model_dir: Path) -> None:
    trainer, result, losses, _ = lora_run
    assert len(losses) == 30 and np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10]), losses
    family.check_lora_file(trainer, result.final_lora, "chroma/lora", "chroma", prefix="transformer.",
                           weight_names=("lora_A", "lora_B"))
    diff, effect = _diffusers_diff(trainer, model_dir, result.final_lora)
    record("chroma", "lora", "diffusers load_lora_weights", diff < 1e-4, diff)
    assert effect > 1e-3 and diff < 1e-4, (diff, effect)
    assert _round_trip(trainer, model_dir, result.final_lora, "lora") < 1e-5


def test_tools_know_chroma_files(lora_run: tuple, model_dir: Path) -> None:
    """`aitk lora info` names the arch from the header, `aitk convert` writes the diffusers layout
    (which diffusers loads exactly too), `aitk merge` bakes the file into a Chroma folder."""
    from aitk.tools.convert import convert_file
    from aitk.tools.lora_info import _guess_arch, lora_info

    trainer, result, _, tmp = lora_run
    info = lora_info(result.final_lora)
    assert info.architecture == "chroma" and info.network_type == "lora"
    # without the header the keys cannot tell Chroma from FLUX.1 (same names and widths)
    guess = _guess_arch(load_file(str(result.final_lora)))
    assert guess.startswith("flux / ") and "chroma" in guess and "share one naming" in guess
    converted, _ = convert_file(result.final_lora, "diffusers", "chroma", tmp / "diffusers.safetensors")
    assert all(k.startswith("transformer.") and ".alpha" not in k for k in load_file(str(converted)))
    diff, effect = _diffusers_diff(trainer, model_dir, converted)
    record("chroma", "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="diffusers")
    assert effect > 1e-3 and diff < 1e-4, (diff, effect)

    assert _merged_diff(trainer, model_dir, result.final_lora, "lora", tmp / "merged") < 1e-4


def _round_trip(trainer: Any, model_dir: Path, lora: Path, kind: str) -> float:
    """Max |trainer's prediction - a fresh model's with the file loaded by our own loader| (a network
    of the same configuration, another seed and alpha: the file's weights and alphas must win)."""
    adapter, net = trainer.adapter, trainer.process.network
    batch = _batch(adapter, seed=2)
    cond = adapter.encode_prompts([PROMPT, "x"])
    diff = family.loader_round_trip_diff(adapter, make_adapter(model_dir), lora, batch, cond, network_type=net.type,
                                         dora=net.dora, linear_rank=net.linear_rank, lokr_factor=net.lokr_factor,
                                         lokr_full_rank=net.lokr_full_rank)
    layout = "diffusers" if trainer.process.save.save_format == "diffusers" else "comfyui"
    record("chroma", kind, "aitk loader (round trip)", diff < 1e-5, diff, layout=layout)
    return diff


def _merged_diff(trainer: Any, model_dir: Path, lora: Path, kind: str, out: Path) -> float:
    """Max |trainer's prediction - the prediction of the base with the file baked in by `aitk merge`|."""
    from aitk.tools.merge import merge_model

    merged = merge_model(str(model_dir), [str(lora)], arch="chroma", output=out)
    assert len(merged.merged["main"]) == len(trainer.network.wrapped_module_names())
    adapter = trainer.adapter
    batch = _batch(adapter, seed=2)
    cond = adapter.encode_prompts([PROMPT, "x"])
    with torch.no_grad():
        diff = float((make_adapter(out).predict(batch, cond) - adapter.predict(batch, cond)).abs().max())
    layout = "diffusers" if trainer.process.save.save_format == "diffusers" else "comfyui"
    record("chroma", kind, "aitk merge", diff < 1e-4, diff, layout=layout)
    return diff


NETWORKS = {
    "dora": {"type": "lora", "dora": True},
    "lokr": {"type": "lokr", "linear": 2, "linear_alpha": 4, "lokr_factor": 4},
    "loha": {"type": "loha", "linear": 4, "linear_alpha": 4},
}


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_dora_lokr_and_loha_train_and_load_back(kind: str, model_dir: Path, shapes_dataset: Path,
                                                tmp_path: Path) -> None:
    changes: dict[str, Any] = {"network": NETWORKS[kind], "train": {"steps": 8}}
    if kind == "dora":
        changes["save"] = {"save_format": "diffusers"}
    trainer, result, losses = _train(_job(tmp_path, kind, model_dir, shapes_dataset, **changes))
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert trainer.network.first.algo == kind
    tensors = load_file(str(result.final_lora))
    assert all(k.startswith("transformer.") for k in tensors)
    part = {"dora": "lora_magnitude_vector", "lokr": ".lokr_w1", "loha": ".hada_w1_a"}[kind]
    assert any(part in k for k in tensors), sorted(tensors)[:4]
    assert _round_trip(trainer, model_dir, result.final_lora, kind) < 1e-5
    assert _merged_diff(trainer, model_dir, result.final_lora, kind, tmp_path / "merged") < 1e-4
    if kind == "dora":  # diffusers loads DoRA from its own layout (not LyCORIS files)
        diff, effect = _diffusers_diff(trainer, model_dir, result.final_lora)
        record("chroma", "dora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="diffusers")
        assert effect > 1e-4 and diff < 1e-4, (diff, effect)


def test_a_qint8_base_trains_with_cached_text_and_previews(model_dir: Path, shapes_dataset: Path,
                                                           tmp_path: Path) -> None:
    """The quantized base trains; with cached text embeddings the encoder is released and the
    previews run on the cached prompt and negative embeddings with their masks."""
    job = _job(tmp_path, "q8", model_dir, shapes_dataset, model={"arch": "chroma", "quantize": True, "qtype": "qint8"},
               train={"cache_text_embeddings": True}, sample={"sample_every": 15})
    trainer, result, losses = _train(job)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses
    assert trainer.adapter.text_encoder is None  # released after caching
    samples = sorted(p.name for p in (result.output_dir / "samples").iterdir())
    assert samples == [f"{step:09d}_0.jpg" for step in (0, 15, 30)]
    linears = [m for m in trainer.network.lora_layers().values() if isinstance(m.base_layer, torch.nn.Linear)]
    assert linears and all("torchao" in type(m.base_layer.weight).__module__ for m in linears)
    assert result.final_lora.is_file()


def test_validate_refuses_attention_kernels_without_a_mask(tmp_path):
    """Chroma masks T5's padding in every block: flash / sage cannot, so validate stops the job."""
    import yaml

    from aitk.config.loader import parse_job_text
    from aitk.config.support import unsupported_failures

    def failures(train: dict) -> list[str]:
        job = {"job": "extension", "config": {"name": "c", "process": [{
            "training_folder": "out", "model": {"name_or_path": "lodestones/Chroma1-HD", "arch": "chroma"},
            "datasets": [{"folder_path": "/d"}], "train": train}]}}
        return unsupported_failures(parse_job_text(yaml.safe_dump(job)).job)

    assert any("attention kernel without an attention mask" in f for f in failures({"attention_backend": "flash"}))
    assert failures({"attention_backend": "sage"}) and failures({"xformers": False}) == []
    assert failures({"attention_backend": "native"}) == [] and failures({"xformers": True}) == []
