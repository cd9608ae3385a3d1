"""Lumina-Image 2.0 on its tiny random-init model: the Gemma prompt encoding with its mask, the
flow-matching objective in Lumina's reversed time, lumina2_shift, LoRA targets and key names, and
end-to-end runs (LoRA, DoRA, LoKr, a qint8 base, upstream's full fine-tune) whose files diffusers
loads to the same output and `aitk convert` / `merge` / `lora info` read.

Everything runs offline on CPU in fp32 with 64 px images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from aitk.config.schema import ModelConfig, TrainConfig
from aitk.models.base import ModelLoadError
from aitk.models.flow_matching import sample_sigmas, time_shift
from aitk.models.lumina2 import (
    SCHEDULER_SHIFT,
    Lumina2Adapter,
    fused_qkv_file,
    is_lumina2_lora,
    lora_key_stem,
    module_for_stem,
)
import family_checks as family
from conftest import build_tiny_model
from upstream_jobs import extras_on_path  # noqa: F401 - autouse fixture: torchao for model.quantize

CPU = torch.device("cpu")
PROMPT = "a red circle, shp style"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("lumina2", tmp_path_factory.mktemp("lumina2-model"))


def make_adapter(folder: Path | str, **model_fields: Any) -> Lumina2Adapter:
    return family.load_adapter(Lumina2Adapter, folder, "lumina2", **model_fields)


@pytest.fixture(scope="module")
def lumina(model_dir: Path) -> Lumina2Adapter:
    return make_adapter(model_dir)


_batch = family.noisy_batch


# --- the tiny model and loading --------------------------------------------------------------------


def test_tiny_model_is_the_real_classes_and_small(model_dir: Path, lumina: Lumina2Adapter) -> None:
    from transformers import Gemma2Model, GemmaTokenizer

    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    assert size < 10 * 2**20, size
    assert isinstance(lumina.text_encoder, Gemma2Model) and isinstance(lumina.tokenizer, GemmaTokenizer)
    config = lumina.transformer.config
    assert config.num_kv_heads < config.num_attention_heads  # grouped-query attention, as the real model
    assert lumina.scheduler_config["shift"] == SCHEDULER_SHIFT and not lumina.scheduler_config["use_dynamic_shifting"]
    assert lumina.max_sequence_length == 256 and lumina.bucket_divisibility == 16
    for module in (lumina.transformer, lumina.vae, lumina.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())


def test_load_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model.name_or_path.*neither"):
        make_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"model.name_or_path: folder .* has no transformer/, vae/"):
        make_adapter(tmp_path / "empty")
    (tmp_path / "lumina.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="single file"):
        make_adapter(tmp_path / "lumina.safetensors")


def test_legacy_flag_and_preset_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from aitk.config.validate import validate_command
    from aitk.ui.presets import PRESETS

    assert ModelConfig(name_or_path="x", is_lumina2=True).resolved_arch == "lumina2"
    job = PRESETS["lumina2"]["job"]
    job["config"]["process"][0]["datasets"][0]["folder_path"] = str(tmp_path)
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(job))
    assert validate_command([str(path)]) == 0, capsys.readouterr()
    assert "warning" not in capsys.readouterr().out


# --- prompts and the objective ---------------------------------------------------------------------


def test_prompts_are_the_pipelines_gemma_encoding_with_its_mask(lumina: Lumina2Adapter, model_dir: Path) -> None:
    from diffusers import Lumina2Pipeline

    cond = lumina.encode_prompts([PROMPT, "x"])
    stock = Lumina2Pipeline.from_pretrained(model_dir)
    hidden, mask, _, _ = stock.encode_prompt([PROMPT, "x"], do_classifier_free_guidance=False, max_sequence_length=256)
    assert torch.equal(cond.hidden_states, hidden) and torch.equal(cond.extra["mask"], mask)
    lengths = cond.extra["mask"].sum(1).tolist()
    assert cond.hidden_states.shape == (2, 256, 32) and lengths[0] > lengths[1] > 0  # system prompt + caption
    assert lumina.text_encoder_id().endswith("|gemma:256")


def test_prediction_is_the_negated_transformer_in_lumina_time(lumina: Lumina2Adapter) -> None:
    batch = _batch(lumina, timestep_type="linear")
    sigma = batch.timesteps / 1000
    latents = lumina.encode_images(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    noise = (batch.noisy_latents - (1 - sigma.view(-1, 1, 1, 1)) * latents) / sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(batch.target, noise - latents, rtol=1e-4, atol=1e-4)  # rectified flow
    cond = lumina.encode_prompts([PROMPT, PROMPT])
    with torch.no_grad():
        pred = lumina.predict(batch, cond)
        raw = lumina.transformer(batch.noisy_latents, 1 - sigma, cond.hidden_states, cond.extra["mask"]).sample
    assert pred.shape == latents.shape and torch.equal(pred, -raw)
    # the pipeline steps with -output: one Euler step from sigma to 0 with the target lands on x0
    from diffusers import FlowMatchEulerDiscreteScheduler

    step = FlowMatchEulerDiscreteScheduler(shift=1.0)
    step.set_timesteps(sigmas=[float(sigma[0]), 0.0])
    x0 = step.step(batch.target[:1], step.timesteps[0], batch.noisy_latents[:1]).prev_sample
    torch.testing.assert_close(x0, latents[:1], rtol=1e-4, atol=1e-4)


def test_lumina2_shift_is_the_schedulers_fixed_shift(lumina: Lumina2Adapter) -> None:
    """ai-toolkit draws lumina2_shift (and shift / flux_shift) uniformly through the Lumina 2
    scheduler's shift: sigma = 6u / (1 + 5u), at every image size (no dynamic shifting)."""
    n = 4000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = (SCHEDULER_SHIFT * u / (1 + (SCHEDULER_SHIFT - 1) * u)).float().clamp(min=1e-3)
    for kind in ("lumina2_shift", "shift", "flux_shift"):
        got = sample_sigmas(n, TrainConfig(timestep_type=kind), torch.Generator().manual_seed(0),
                            **lumina.shift_kwargs(8, 8))
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(time_shift(u, math.log(SCHEDULER_SHIFT)), SCHEDULER_SHIFT * u / (1 + 5 * u))
    assert abs(want.median().item() - 6 * 0.5 / 3.5) < 0.02  # the median draw is 0.857: mostly high noise
    small = lumina.make_noisy_batch(torch.zeros(64, 16, 4, 4), TrainConfig(timestep_type="lumina2_shift"),
                                    torch.Generator().manual_seed(1))
    large = lumina.make_noisy_batch(torch.zeros(64, 16, 64, 64), TrainConfig(timestep_type="lumina2_shift"),
                                    torch.Generator().manual_seed(1))
    assert torch.equal(small.timesteps, large.timesteps)
    family.check_weighted_loss_and_min_snr_refused(lumina, lumina.encode_images(family.pixels(0)), 0)


# --- LoRA names ------------------------------------------------------------------------------------


def test_lora_targets_and_comfyui_names(lumina: Lumina2Adapter) -> None:
    names = lumina.network_candidates(False)
    blocks = 2 * 8 + 8 + 7  # layers and noise_refiner blocks have norm1.linear, context_refiner's not
    assert len(names) == blocks and "context_refiner.0.norm1.linear" not in names
    family.check_original_names(lora_key_stem, module_for_stem, lumina.transformer, {
        "layers.1.attn.to_out.0": "diffusion_model.layers.1.attention.out",
        "noise_refiner.0.norm1.linear": "diffusion_model.noise_refiner.0.adaLN_modulation.1",
        "layers.0.feed_forward.linear_3": "diffusion_model.layers.0.feed_forward.w3",
        "layers.0.attn.to_k": "diffusion_model.layers.0.attention.qkv.k",
        "norm_out.linear_2": "diffusion_model.final_layer.linear",
    }, unnamed="layers.0.attn.norm_q")
    assert lumina.offload_blocks(lumina.transformer)[0] is lumina.transformer.context_refiner[0]
    assert len(lumina.offload_blocks(lumina.text_encoder)) == 2


def _random_lora(out_dim: int, in_dim: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, in_dim, generator=g), torch.randn(out_dim, rank, generator=g)


def test_fused_qkv_is_what_diffusers_reads_from_original_files() -> None:
    """ComfyUI's Lumina 2 holds q / k / v as one `attention.qkv`: the fused form of our three LoRAs
    gives each projection exactly its own update when diffusers' reader of original-layout files
    splits it again (that reader knows the real model's sizes: 2304 / 768 / 768 rows)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lumina2_lora_to_diffusers

    sizes = {"q": 2304, "k": 768, "v": 768}
    tensors: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    for block in ("noise_refiner.0", "context_refiner.0", "layers.0"):
        for i, (part, rows) in enumerate(sizes.items()):
            down, up = _random_lora(rows, 2304, 2, seed=i)
            stem = f"diffusion_model.{block}.attention.qkv.{part}"
            tensors |= {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up,
                        f"{stem}.alpha": torch.tensor(4.0 + i)}
            deltas[f"{block}.attn.to_{part}"] = (4.0 + i) / 2 * up @ down
        others = {"attention.out": "attn.to_out.0"}
        others |= {f"feed_forward.w{j}": f"feed_forward.linear_{j}" for j in (1, 2, 3)}
        if block != "context_refiner.0":
            others["adaLN_modulation.1"] = "norm1.linear"
        for j, (orig, path) in enumerate(others.items()):
            down, up = _random_lora(16, 2304, 2, seed=10 + j)
            tensors |= {f"diffusion_model.{block}.{orig}.lora_A.weight": down,
                        f"diffusion_model.{block}.{orig}.lora_B.weight": up}
            deltas[f"{block}.{path}"] = up @ down
    fused = fused_qkv_file(tensors)
    assert "diffusion_model.layers.0.attention.qkv.lora_A.weight" in fused
    assert not any(".qkv.q." in k or ".qkv.k." in k for k in fused)
    # rank 6 with alpha 6: scale 1, so the file needs no .alpha (diffusers' reader takes none)
    alphas = {k: v for k, v in fused.items() if k.endswith(".alpha")}
    assert alphas and all(v.item() == fused[k.replace(".alpha", ".lora_A.weight")].shape[0] for k, v in alphas.items())
    converted = _convert_non_diffusers_lumina2_lora_to_diffusers({k: v for k, v in fused.items() if k not in alphas})
    for path, delta in deltas.items():
        a = converted[f"transformer.{path}.lora_A.weight"]
        b = converted[f"transformer.{path}.lora_B.weight"]
        torch.testing.assert_close(b @ a, delta, rtol=1e-5, atol=1e-4)


def test_lora_files_are_recognised_by_their_keys() -> None:
    ours = {"diffusion_model.noise_refiner.0.attention.qkv.k.lora_A.weight": torch.zeros(1)}
    theirs = {"transformer.context_refiner.0.attn.to_q.lora_A.weight": torch.zeros(1)}
    flux = {"transformer.single_transformer_blocks.0.proj_out.lora_A.weight": torch.zeros(1)}
    wan = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(1)}
    assert is_lumina2_lora(ours) and is_lumina2_lora(theirs)
    zimage = {"diffusion_model.noise_refiner.0.attention.qkv.lora_A.weight": torch.zeros(1)}  # fused: ambiguous
    assert not is_lumina2_lora(flux) and not is_lumina2_lora(wan) and not is_lumina2_lora(zimage)


# --- end to end ------------------------------------------------------------------------------------


def _job(tmp_path: Path, name: str, model_dir: Path, data: Path, **changes: Any) -> Path:
    return family.write_job(tmp_path, name, model_dir, data, {
        "model": {"arch": "lumina2"},
        "train": {"steps": 12, "batch_size": 2, "lr": 5e-3, "timestep_type": "lumina2_shift"},
        "network": {"type": "lora", "linear": 4, "linear_alpha": 8},
        "sample": {"sample_every": 1000, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 4.0,
                   "neg": "", "prompts": ["a red circle, [trigger] style"], "seed": 5},
    }, changes)



def _render(pipe: Any, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(**embeds, height=64, width=64, num_inference_steps=2, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(3), output_type="latent").images


def _embeds(adapter: Lumina2Adapter) -> dict[str, torch.Tensor]:
    return adapter.preview_prompt_kwargs(adapter.encode_prompts([PROMPT]), adapter.encode_prompts([""]))


def _diffusers_diff(trainer: Any, model: Path, lora: Path) -> tuple[float, float]:
    """(max |ours - diffusers with the file|, max |ours - the base model|) of a 2-step render with
    classifier-free guidance from the same prompt embeddings."""
    from diffusers import Lumina2Pipeline

    embeds = _embeds(trainer.adapter)
    return family.diffusers_lora_diff(trainer.adapter, Lumina2Pipeline, model, lora, lambda p: _render(p, embeds))


@pytest.fixture(scope="module")
def lora_run(model_dir: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("lumina2-lora")
    return (*family.train_to_the_end(_job(tmp, "lora", model_dir, shapes_dataset, train={"steps": 20})), tmp)


def test_lora_trains_with_comfyui_names(lora_run: tuple) -> None:
    trainer, result, losses, _ = lora_run
    assert len(losses) == 20 and np.mean(losses[-6:]) < np.mean(losses[:6]), losses
    tensors = load_file(str(result.final_lora))
    wrapped = trainer.network.wrapped_module_names()
    parts = ("lora_A.weight", "lora_B.weight", "alpha")
    # q / k / v are written as one LoRA on ComfyUI's fused attention.qkv: rank 3r, alpha 3a
    stems = {lora_key_stem(m).removesuffix(".q").removesuffix(".k").removesuffix(".v") for m in wrapped}
    assert set(tensors) == {f"{stem}.{s}" for stem in stems for s in parts}
    fused = {k.removesuffix(".alpha") for k in tensors if k.endswith(".attention.qkv.alpha")}
    assert fused and all(tensors[f"{stem}.alpha"].item() == 24.0 and tensors[f"{stem}.lora_A.weight"].shape[0] == 12
                         for stem in fused)
    assert all(v.item() == 8.0 for k, v in tensors.items() if k.endswith(".alpha") and k.removesuffix(".alpha") not in fused)
    with safe_open(str(result.final_lora), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "lumina-image-2/lora" and meta["ss_base_model_version"] == "lumina2"


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_diffusers_layout_loads_exactly_in_diffusers(kind: str, model_dir: Path, shapes_dataset: Path,
                                                     tmp_path: Path) -> None:
    network = {"type": "lora", "linear": 4, "linear_alpha": 8, "dora": kind == "dora"}
    job = _job(tmp_path, kind, model_dir, shapes_dataset, network=network, train={"steps": 6},
               save={"save_format": "diffusers"})
    trainer, result, losses = family.train_to_the_end(job)
    family.check_diffusers_layout_run("lumina2", kind, result, losses,
                                      lambda lora: _diffusers_diff(trainer, model_dir, lora))


def test_tools_know_lumina2_files(lora_run: tuple, model_dir: Path) -> None:
    """`aitk lora info` names the arch (header, and key names without one), `aitk convert` turns the
    comfyui file into the diffusers layout (which diffusers loads exactly) and back bit for bit,
    `aitk merge` bakes it into a folder Lumina2Pipeline loads."""
    from diffusers import Lumina2Pipeline

    from aitk.tools.lora_info import _guess_arch, lora_info

    trainer, result, _, tmp = lora_run
    info = lora_info(result.final_lora)
    assert info.architecture == "lumina2" and info.network_type == "lora" and info.ranks == {"4": 31}
    original = load_file(str(result.final_lora))
    assert _guess_arch(original) == "lumina2"
    # diffusers reads original-layout Lumina 2 files only with a fused attention.qkv and no .alpha
    with pytest.raises(Exception, match="qkv|split_with_sizes"):
        Lumina2Pipeline.from_pretrained(model_dir).load_lora_weights(str(result.final_lora))
    family.check_conversion_loads_in_diffusers("lumina2", result.final_lora, tmp, lambda lora: _diffusers_diff(trainer, model_dir, lora))
    embeds = _embeds(trainer.adapter)
    family.check_merged_folder_renders_alike("lumina2", trainer, model_dir, result.final_lora, tmp, Lumina2Pipeline,
                                             lambda pipe: _render(pipe, embeds))


def test_lokr_trains(model_dir: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, "lokr", model_dir, shapes_dataset, network={"type": "lokr", "lokr_factor": 4},
               train={"steps": 6})
    trainer, result, losses = family.train_to_the_end(job)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert trainer.network.first.algo == "lokr"
    tensors = load_file(str(result.final_lora))
    assert any(k.endswith(".lokr_w1") for k in tensors) and all(k.startswith("diffusion_model.") for k in tensors)


def test_a_qint8_base_trains(model_dir: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, "q8", model_dir, shapes_dataset, model={"quantize": True, "qtype": "qint8"})
    trainer, result, losses = family.train_to_the_end(job)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    family.check_quantized_base(trainer)
    assert result.final_lora.is_file()


def test_upstream_full_fine_tune_saves_a_transformer_diffusers_loads(tmp_path: Path, model_dir: Path,
                                                                      shapes_dataset: Path) -> None:
    """Upstream's full fine-tune example (no network:, Adafactor) on the tiny model: the saved
    folder is a Lumina2Transformer2DModel holding the trained weights."""
    from diffusers import Lumina2Transformer2DModel

    from upstream_jobs import CORPUS, copy_folder, localise, read_job, run_job, write_job as write_upstream

    job = read_job(CORPUS / "lumina_full_fine_tune_24gb.yaml")
    assert "network" not in job["config"]["process"][0]
    local = localise(job, out=tmp_path / "out", model=model_dir, data=copy_folder(shapes_dataset, tmp_path / "data"),
                     steps=3, keep_prompts=1)
    _, trainer, result = run_job(write_upstream(local, tmp_path / "full.yaml"))
    assert result.state == "completed" and result.step == 3
    saved = Lumina2Transformer2DModel.from_pretrained(result.final_loras[0])
    base = Lumina2Transformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    trained = trainer.adapter.denoiser().state_dict()
    changed = [k for k, v in saved.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert len(changed) > 0.5 * len(trained)
    # saved in save.dtype bf16, as upstream's example asks
    assert all(torch.equal(v, trained[k].to(v.dtype)) for k, v in saved.state_dict().items())
