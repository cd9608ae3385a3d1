"""Default (comfyui-layout) LoRA files with alpha folded into the up weights, for the families
whose diffusers loader refuses `.alpha` (AuraFlow and FLUX.2 here, on their tiny models): the
file diffusers loads exactly, aitk reads back into the trained network (trained alphas from the
header, never applied twice), `aitk convert` / `merge` / `lora info` handle, and DoRA's.

AuraFlow trains with alpha / rank = 2 (a power of two: the up weights come back bit for bit),
FLUX.2 with 1.5 (within one float32 rounding) and q / k / v fused into ComfyUI's qkv.
Offline, CPU, fp32 files, 64 px.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aitk.config.schema import ModelConfig, TrainConfig
from aitk.models.base import PromptEmbeds
from aitk.networks.folded_alpha import ALPHA_RECORD_KEY
from family_checks import check_folded_lora_file  # noqa: F401 - also used by the family tests
from conftest import base_process, build_tiny_model_for, deep_update, write_job
from interop_results import record

CPU = torch.device("cpu")
PROMPT = "a red circle, shp style"
#: arch -> (rank, alpha) of its run
NETWORKS = {"auraflow": (8, 16.0), "flux2": (4, 6.0)}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("alpha-models")


def _adapter(arch: str, folder: Path) -> Any:
    from aitk.models.registry import adapter_class

    adapter = adapter_class(arch)(ModelConfig(name_or_path=str(folder), arch=arch), CPU, torch.float32)
    adapter.load()
    return adapter


def _train(tmp: Path, arch: str, model: Path, data: Path, name: str, **network: Any) -> tuple[Any, Any]:
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    rank, alpha = NETWORKS[arch]
    process = deep_update(base_process(model, data, tmp / "out"), {
        "model": {"arch": arch},
        "train": {"steps": 4, "batch_size": 2, "lr": 2e-2, "lr_scheduler": "constant"},
        "network": {"type": "lora", "linear": rank, "linear_alpha": alpha, **network},
        "sample": {"sample_every": 1000, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 3.5,
                   "prompts": ["a red circle, [trigger] style"], "neg": "", "seed": 5},
    })
    loaded = load_job_file(write_job(tmp / f"{name}.yaml", name, process))
    trainer = Trainer(loaded.job, loaded.job.config.process[0])
    result = trainer.run()
    assert result.state == "completed"
    return trainer, result


@pytest.fixture(scope="module", params=["auraflow", "flux2"])
def run(request: pytest.FixtureRequest, models: Path, shapes_dataset: Path,
        tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any, Any, Path]:
    arch = request.param
    model = build_tiny_model_for(arch, models)
    tmp = tmp_path_factory.mktemp(f"alpha-{arch}")
    return (arch, model, *_train(tmp, arch, model, shapes_dataset, f"{arch}_lora"), tmp)


def _render(arch: str, adapter: Any, pipe: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    common = dict(height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(3),
                  output_type="latent")
    if arch == "auraflow":
        return pipe(prompt=PROMPT, guidance_scale=3.5, max_sequence_length=32, **common).images
    embeds = adapter.preview_prompt_kwargs(adapter.encode_prompts([PROMPT]), adapter.encode_prompts([""]))
    return pipe(**embeds, guidance_scale=4.0, max_sequence_length=64, **common).images


def _pipeline_class(arch: str) -> type:
    from diffusers import AuraFlowPipeline, Flux2Pipeline

    return AuraFlowPipeline if arch == "auraflow" else Flux2Pipeline


def _predict_diff(trainer: Any, adapter: Any) -> float:
    """Max |trainer's prediction - `adapter`'s| on one noisy batch of random images."""
    live = trainer.adapter
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    batch = live.make_noisy_batch(live.encode_images(pixels), TrainConfig(), torch.Generator().manual_seed(1))
    cond = PromptEmbeds.cat([live.encode_prompts([PROMPT])] * 2)
    with torch.no_grad():
        return float((live.predict(batch, cond) - adapter.predict(batch, cond)).abs().max())


def _read_back(arch: str, model: Path, lora: Path | tuple, **network: Any) -> tuple[Any, Any]:
    """(a fresh adapter, its network built with another seed and alpha 1) with `lora` read by aitk's loader."""
    from aitk.networks.build import build_network
    from aitk.networks.export import load_network_file

    fresh = _adapter(arch, model)
    rank, _ = NETWORKS[arch]
    handle = build_network(fresh.transformer, network_type="lora", linear_rank=rank, linear_alpha=1.0, seed=9,
                           candidates=fresh.network_candidates(False), **network)
    load_network_file(handle, lora, prefix=fresh.lora_prefix, key_for=fresh.lora_key_stem,
                      diffusers_prefix=fresh.diffusers_lora_prefix, fused=fresh.lora_fused_weights)
    return fresh, handle


def test_default_file_has_no_alpha_and_records_the_trained_alphas(run: tuple) -> None:
    arch, _, trainer, result, _ = run
    rank, alpha = NETWORKS[arch]
    tensors = load_file(str(result.final_lora))
    assert not any(k.endswith(".alpha") for k in tensors)
    with safe_open(str(result.final_lora), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta[ALPHA_RECORD_KEY]) == {"alpha": alpha, "modules": {}}
    assert float(meta["ss_network_alpha"]) == alpha  # kohya's field keeps the trained alpha
    handle = trainer.network.first
    layers = handle.lora_layers()
    name = handle.wrapped_module_names()[-1]  # not a q / k / v part: its own stem in every family
    up = tensors[f"{trainer.adapter.lora_key_stem(name)}.lora_B.weight"]
    trained = layers[name].lora_B[handle.adapter_name].weight
    assert torch.equal(up, trained.detach() * (alpha / rank)) and up.abs().max() > 0


def test_default_file_loads_exactly_in_diffusers(run: tuple) -> None:
    arch, model, trainer, result, _ = run
    adapter = trainer.adapter
    adapter.denoiser().eval()
    with adapter.preview_context():
        ours = _render(arch, adapter, adapter.sample_pipeline())
    fresh = _pipeline_class(arch).from_pretrained(model)
    base = _render(arch, adapter, fresh)
    fresh.load_lora_weights(str(result.final_lora))
    diff, effect = float((ours - _render(arch, adapter, fresh)).abs().max()), float((ours - base).abs().max())
    print(f"{arch}: default file in diffusers max abs diff {diff:.3g}, LoRA effect {effect:.3g}")
    record(arch, "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="comfyui",
           note="default file: alpha folded into lora_B")
    assert effect > 1e-3 and diff < 1e-4, (diff, effect)


def test_reading_back_gives_the_trained_network(run: tuple) -> None:
    arch, model, trainer, result, _ = run
    rank, alpha = NETWORKS[arch]
    fresh, handle = _read_back(arch, model, result.final_lora)
    trained = trainer.network.first
    assert handle.module_alphas() == trained.module_alphas() == {n: alpha for n in trained.wrapped_module_names()}
    got, want = handle.named_trainable_parameters(), trained.named_trainable_parameters()
    assert got.keys() == want.keys()
    for key, t in want.items():
        if ".lora_B." in key and (alpha / rank) != 2.0:  # 1.5: one float32 rounding each way
            assert torch.allclose(got[key], t, rtol=1e-6, atol=0), key
        else:
            assert torch.equal(got[key], t), key
    diff = _predict_diff(trainer, fresh)
    record(arch, "lora", "aitk loader (round trip)", diff < 1e-5, diff, note="default file: alpha folded into lora_B")
    assert diff < 1e-5


def test_the_record_never_scales_twice(run: tuple, tmp_path: Path) -> None:
    """Without the record (another tool's copy) the file loads at alpha = rank with the weights as
    they are: the same update. An explicit `.alpha` = rank next to the record is the same again;
    the header's kohya ss_network_alpha is never applied."""
    arch, model, trainer, result, _ = run
    rank, _ = NETWORKS[arch]
    tensors, meta = load_file(str(result.final_lora)), {}
    with safe_open(str(result.final_lora), "pt") as f:
        meta = dict(f.metadata())
    stripped = {k: v for k, v in meta.items() if k != ALPHA_RECORD_KEY}
    fresh, handle = _read_back(arch, model, (tensors, stripped))
    assert set(handle.module_alphas().values()) == {float(rank)}
    assert _predict_diff(trainer, fresh) < 1e-5
    stems = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_A.weight")}
    explicit = {**tensors, **{f"{s}.alpha": torch.tensor(float(tensors[f"{s}.lora_A.weight"].shape[0])) for s in stems}}
    fresh, handle = _read_back(arch, model, (explicit, meta))
    assert handle.module_alphas() == trainer.network.first.module_alphas()
    assert _predict_diff(trainer, fresh) < 1e-5


def test_convert_merge_and_lora_info(run: tuple) -> None:
    from aitk.networks.export import network_to_kohya
    from aitk.tools.convert import convert_file
    from aitk.tools.lora_info import format_info, lora_info
    from aitk.tools.merge import merge_model

    arch, model, trainer, result, tmp = run
    rank, alpha = NETWORKS[arch]
    original = load_file(str(result.final_lora))
    info = lora_info(result.final_lora)
    assert info.layout.startswith("comfyui") and info.alpha_in_weights and info.alphas == {f"{alpha:g}": info.modules}
    assert any("folded into the up weights" in line for line in format_info(info))

    converted, _ = convert_file(result.final_lora, "diffusers", arch, tmp / "to_diffusers.safetensors")
    with safe_open(str(converted), "pt") as f:
        meta = dict(f.metadata())
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["transformer.lora_alpha"] == rank and ALPHA_RECORD_KEY in meta  # scale 1, record kept
    fresh, handle = _read_back(arch, model, converted)
    assert handle.module_alphas() == trainer.network.first.module_alphas() and _predict_diff(trainer, fresh) < 1e-5
    back, _ = convert_file(converted, "comfyui", arch, tmp / "back.safetensors")
    again = load_file(str(back))
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)

    # a file with `.alpha` keys (aitk before folding) converts to the same folded file
    handle = trainer.network.first
    old = network_to_kohya(handle, prefix=trainer.adapter.lora_prefix, dtype=torch.float32,
                           key_for=trainer.adapter.lora_key_stem, weight_names=trainer.adapter.lora_weight_names)
    save_file(old, str(tmp / "old.safetensors"))
    folded, _ = convert_file(tmp / "old.safetensors", "comfyui", arch, tmp / "old_folded.safetensors")
    refolded = load_file(str(folded))
    assert refolded.keys() == original.keys() and all(torch.equal(refolded[k], original[k]) for k in original)
    with safe_open(str(folded), "pt") as f:
        assert json.loads(f.metadata()[ALPHA_RECORD_KEY])["alpha"] == alpha

    merged = merge_model(str(model), [str(result.final_lora)], arch=arch, output=tmp / "merged", dtype="float32")
    assert len(merged.merged["main"]) == len(handle.wrapped_module_names())
    baked = _adapter(arch, tmp / "merged")
    diff = _predict_diff(trainer, baked)
    record(arch, "lora", "aitk merge", diff < 1e-4, diff, note="default file: alpha folded into lora_B")
    assert diff < 1e-4


def test_dora_default_file(models: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    """FLUX.2 DoRA: no `.alpha`, `dora_scale` as trained (the direction W + up @ down is the same),
    read back into the trained network and merged exactly. (diffusers' loaders drop `dora_scale`,
    so DoRA loads exactly in diffusers only from save_format: diffusers.)"""
    from aitk.tools.lora_info import lora_info
    from aitk.tools.merge import merge_model

    model = build_tiny_model_for("flux2", models)
    trainer, result = _train(tmp_path, "flux2", model, shapes_dataset, "flux2_dora", dora=True)
    tensors = load_file(str(result.final_lora))
    assert not any(k.endswith(".alpha") for k in tensors) and any(k.endswith(".dora_scale") for k in tensors)
    assert lora_info(result.final_lora).network_type == "dora"
    fresh, handle = _read_back("flux2", model, result.final_lora, dora=True)
    assert handle.module_alphas() == trainer.network.first.module_alphas()
    diff = _predict_diff(trainer, fresh)
    record("flux2", "dora", "aitk loader (round trip)", diff < 1e-5, diff, note="default file: alpha folded into lora_B")
    assert diff < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merge_model(str(model), [str(result.final_lora)], arch="flux2", output=tmp_path / "merged", dtype="float32")
    diff = _predict_diff(trainer, _adapter("flux2", tmp_path / "merged"))
    record("flux2", "dora", "aitk merge", diff < 1e-4, diff, note="default file: alpha folded into lora_B")
    assert diff < 1e-4
