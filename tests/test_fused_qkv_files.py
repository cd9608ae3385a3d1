"""Lumina 2 and FLUX.2 LoRA files in ComfyUI's fused q / k / v form (aitk.networks.fused_files).

ComfyUI's models hold one fused qkv weight per attention; aitk trains q, k and v as three LoRAs.
The comfyui layout writes each group as one LoRA on the fused weight (down stacked, up
block-diagonal, rank 3r, alpha 3a) and records the split in the header. Checked here: the fused
update on the original-layout weight (q / k / v of the tiny model concatenated) is the three
updates; aitk's loader, `aitk convert`, `merge` and `lora info` split it back bit for bit; the
diffusers layout converted from it loads exactly in diffusers; DoRA fuses, LoKr keeps split names;
other tools' fused files (no record) split exactly or fail with a message saying what to do.

Tiny models, CPU, fp32, 64 px images.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the family tests' helpers

from aitk.models.flux2 import Flux2Adapter  # noqa: E402
from aitk.models.flux2.keys import FUSED_QKV as FLUX2_QKV  # noqa: E402
from aitk.models.lumina2 import Lumina2Adapter  # noqa: E402
from aitk.models.lumina2.keys import FUSED_QKV as LUMINA2_QKV  # noqa: E402
from aitk.networks.export import load_network_file, save_lora  # noqa: E402
from aitk.networks.fused_files import (  # noqa: E402
    FUSED_RECORD_KEY,
    FusedFileError,
    FusedWeights,
    fuse_lora_tensors,
    split_fused_lora,
)
import family_checks as family  # noqa: E402
from conftest import build_tiny_model  # noqa: E402
from interop_results import record  # noqa: E402
import test_models_flux2 as flux2_tests  # noqa: E402
import test_models_lumina2 as lumina2_tests  # noqa: E402

FAMILIES = {"lumina2": (Lumina2Adapter, "lumina2", LUMINA2_QKV), "flux2": (Flux2Adapter, "flux2_dev", FLUX2_QKV)}


# --- the file transform on its own ------------------------------------------------------------------


def _split_file(spec: FusedWeights, fused_stems: list[str], rows: tuple[int, ...], rank: int, alpha: float,
                dora: bool = False, seed: int = 0, width: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for stem in fused_stems:
        for part, n in zip(spec.part_stems(stem), rows):
            tensors[f"{part}.lora_A.weight"] = torch.randn(rank, width, generator=g)
            tensors[f"{part}.lora_B.weight"] = torch.randn(n, rank, generator=g)
            tensors[f"{part}.alpha"] = torch.tensor(alpha)
            if dora:
                tensors[f"{part}.dora_scale"] = torch.rand(n, 1, generator=g) + 0.5
    tensors["diffusion_model.final_layer.linear.lora_A.weight"] = torch.randn(rank, width, generator=g)
    tensors["diffusion_model.final_layer.linear.lora_B.weight"] = torch.randn(4, rank, generator=g)
    return tensors


def _delta(tensors: dict[str, torch.Tensor], stem: str) -> torch.Tensor:
    down, up = tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"]
    return float(tensors.get(f"{stem}.alpha", down.shape[0])) / down.shape[0] * up @ down  # no .alpha: scale 1


@pytest.mark.parametrize("dora", [False, True])
def test_fused_form_is_the_three_updates_and_splits_back_bit_for_bit(dora: bool) -> None:
    stems = ["diffusion_model.layers.0.attention.qkv", "diffusion_model.noise_refiner.1.attention.qkv"]
    split = _split_file(LUMINA2_QKV, stems, (10, 5, 5), rank=3, alpha=6.0, dora=dora)
    fused, rec, left = fuse_lora_tensors(split, LUMINA2_QKV)
    assert not left and sorted(rec) == stems
    assert not any(".qkv.q." in k or ".qkv.k." in k or ".qkv.v." in k for k in fused)
    for stem in stems:
        assert fused[f"{stem}.lora_A.weight"].shape == (9, 12) and fused[f"{stem}.lora_B.weight"].shape == (20, 9)
        assert fused[f"{stem}.alpha"].item() == 18.0  # 3a: the parts' alpha / rank
        parts = [_delta(split, p) for p in LUMINA2_QKV.part_stems(stem)]
        torch.testing.assert_close(_delta(fused, stem), torch.cat(parts), rtol=1e-6, atol=1e-6)
        if dora:  # DoRA normalises each output row on its own: the magnitudes stack
            scales = [split[f"{p}.dora_scale"] for p in LUMINA2_QKV.part_stems(stem)]
            assert torch.equal(fused[f"{stem}.dora_scale"], torch.cat(scales))
    header = {FUSED_RECORD_KEY: json.dumps(rec)}
    back, found, shared = split_fused_lora(fused, header)
    assert found == stems and not shared
    assert back.keys() == split.keys() and all(torch.equal(back[k], split[k]) for k in split)


def test_groups_that_cannot_fuse_keep_split_names() -> None:
    stem = "diffusion_model.double_blocks.0.img_attn.qkv"
    split = _split_file(FLUX2_QKV, [stem, stem.replace("img", "txt")], (8, 8, 8), rank=2, alpha=2.0)
    split[f"{stem}.k.alpha"] = torch.tensor(4.0)  # k's scale differs (alpha_pattern)
    for key in [k for k in split if ".txt_attn.qkv.v." in k]:
        del split[key]  # v of the text stream not trained
    fused, rec, left = fuse_lora_tensors(split, FLUX2_QKV)
    assert fused == split and not rec
    assert "differ" in left[stem] and "no LoRA on v" in left[stem.replace("img", "txt")]
    # readers that take no alpha: scales folded into the up, exact all the same
    folded, rec, left = fuse_lora_tensors(split, FLUX2_QKV, fold_scales=True)
    assert folded[f"{stem}.alpha"].item() == 6.0 and [e[3] for e in rec[stem]] == [2.0, 2.0, 2.0]
    parts = [_delta(split, p) for p in FLUX2_QKV.part_stems(stem)]
    torch.testing.assert_close(_delta(folded, stem), torch.cat(parts), rtol=1e-6, atol=1e-6)
    scaled = _split_file(FLUX2_QKV, [stem], (8, 8, 8), rank=2, alpha=4.0)  # one scale, 2: folded all the same
    folded, _, _ = fuse_lora_tensors(scaled, FLUX2_QKV, fold_scales=True)
    assert folded[f"{stem}.alpha"].item() == 6.0
    parts = [_delta(scaled, p) for p in FLUX2_QKV.part_stems(stem)]
    torch.testing.assert_close(_delta(folded, stem), torch.cat(parts), rtol=1e-6, atol=1e-6)


def test_other_tools_fused_files_split_exactly_or_say_why() -> None:
    """No record: the family's rows. A block-diagonal up splits into rank-r parts; any other up
    into rank-R parts sharing the down (exact too); unknown sizes and damaged records fail clearly."""
    stem = "diffusion_model.double_blocks.1.txt_attn.qkv"
    fused, _, _ = fuse_lora_tensors(_split_file(FLUX2_QKV, [stem], (8, 8, 8), rank=2, alpha=2.0), FLUX2_QKV)
    back, found, shared = split_fused_lora(fused, {}, FLUX2_QKV)
    assert found == [stem] and not shared and back[f"{stem}.q.lora_A.weight"].shape == (2, 12)
    foreign = dict(fused)
    foreign[f"{stem}.lora_B.weight"] = torch.randn(24, 6, generator=torch.Generator().manual_seed(1))
    back, found, shared = split_fused_lora(foreign, {}, FLUX2_QKV)
    assert shared == [stem]
    rows = torch.split(_delta(foreign, stem), 8)
    for part, expected in zip(FLUX2_QKV.part_stems(stem), rows):
        assert back[f"{part}.lora_A.weight"].shape == (6, 12)
        torch.testing.assert_close(_delta(back, part), expected, rtol=1e-6, atol=1e-6)
    # a Lumina 2 file of sizes other than the real model's, without a record: no way to tell q from k
    lumina = "diffusion_model.layers.0.attention.qkv"
    tiny, _, _ = fuse_lora_tensors(_split_file(LUMINA2_QKV, [lumina], (32, 16, 16), 2, 2.0), LUMINA2_QKV)
    with pytest.raises(FusedFileError, match="does not say how those rows split"):
        split_fused_lora(tiny, {}, LUMINA2_QKV)
    with pytest.raises(FusedFileError, match="aitk_fused_lora is damaged"):
        split_fused_lora(tiny, {FUSED_RECORD_KEY: "{not json"})
    with pytest.raises(FusedFileError, match="does not hold"):
        split_fused_lora({}, {FUSED_RECORD_KEY: json.dumps({lumina: [[lumina + ".q", 32, 2, 2.0]]})})


def test_diffusers_original_layout_reader_reads_the_saved_form() -> None:
    """diffusers' reader of original Lumina 2 files splits a fused qkv at the real model's sizes
    (2304 / 768 / 768) and takes no alpha: the saved form at alpha = rank (upstream's 16 / 16) is
    exactly what it reads. (At the tiny model's sizes it cannot run: the sizes are fixed in it.)"""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lumina2_lora_to_diffusers

    blocks = {"layers.0": True, "noise_refiner.0": True, "context_refiner.0": False}
    split = _split_file(LUMINA2_QKV, [f"diffusion_model.{b}.attention.qkv" for b in blocks], (2304, 768, 768),
                        rank=2, alpha=2.0, width=16)
    del split["diffusion_model.final_layer.linear.lora_A.weight"], split["diffusion_model.final_layer.linear.lora_B.weight"]
    g = torch.Generator().manual_seed(4)
    for block, has_norm in blocks.items():  # the reader wants every other layer of a block too
        for layer in ["attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"] + (
                ["adaLN_modulation.1"] if has_norm else []):
            split[f"diffusion_model.{block}.{layer}.lora_A.weight"] = torch.randn(2, 16, generator=g)
            split[f"diffusion_model.{block}.{layer}.lora_B.weight"] = torch.randn(8, 2, generator=g)
    fused, _, _ = fuse_lora_tensors(split, LUMINA2_QKV)
    converted = _convert_non_diffusers_lumina2_lora_to_diffusers({k: v for k, v in fused.items() if ".alpha" not in k})
    for block in blocks:
        for name, part in (("to_q", "q"), ("to_k", "k"), ("to_v", "v")):
            a = converted[f"transformer.{block}.attn.{name}.lora_A.weight"]
            b = converted[f"transformer.{block}.attn.{name}.lora_B.weight"]
            torch.testing.assert_close(b @ a, _delta(split, f"diffusion_model.{block}.attention.qkv.{part}"),
                                       rtol=1e-5, atol=1e-5)


# --- trained tiny models ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fused-models")
    return {arch: build_tiny_model(variant, folder) for arch, (_, variant, _) in FAMILIES.items()}


def _job(arch: str, tmp: Path, name: str, model: Path, data: Path, **changes: Any) -> Path:
    if arch == "lumina2":
        return lumina2_tests._job(tmp, name, model, data, **changes)
    return flux2_tests._job(tmp, name, model, data, "flux2", **changes)


@pytest.fixture(scope="module", params=list(FAMILIES))
def run(request: pytest.FixtureRequest, models: dict[str, Path], shapes_dataset: Path,
        tmp_path_factory: pytest.TempPathFactory) -> tuple:
    arch = request.param
    tmp = tmp_path_factory.mktemp(f"fused-{arch}")
    trainer, result, _ = family.train_to_the_end(_job(arch, tmp, "fused", models[arch], shapes_dataset,
                                                      train={"steps": 4}))
    return arch, trainer, result.final_lora, tmp


def _groups(adapter: Any, names: list[str], spec: FusedWeights | None = None) -> dict[str, list[str]]:
    """fused stem -> its wrapped modules in the fused weight's row order (the adapter's fused weights:
    what the trainer writes; or `spec`)."""
    spec = spec or adapter.lora_fused_weights
    by_stem = {adapter.lora_key_stem(n): n for n in names}
    fused = sorted({spec.fused_stem(s) for s in by_stem} - {None})
    return {f: [by_stem[p] for p in spec.part_stems(f)] for f in fused}


def test_trained_file_is_fused_and_its_update_is_the_split_updates(run: tuple) -> None:
    arch, trainer, lora, _ = run
    adapter, handle = trainer.adapter, trainer.network.first
    groups = _groups(adapter, handle.wrapped_module_names())
    queries = [n for n in handle.wrapped_module_names() if n.endswith(("attn.to_q", "attn.add_q_proj"))]
    assert len(groups) == len(queries) > 0  # every attention's q / k / v: one fused LoRA
    tensors = load_file(str(lora))
    with safe_open(str(lora), "pt") as f:
        rec = json.loads(f.metadata()[FUSED_RECORD_KEY])
    assert sorted(rec) == sorted(groups)
    assert not any(k.rsplit(".", 2)[0].endswith(("qkv.q", "qkv.k", "qkv.v")) for k in tensors)
    layers = handle.lora_layers()
    for stem, modules in groups.items():
        # FLUX.2 folds alpha / rank into lora_B (no .alpha, scale 1); Lumina 2 keeps alpha 3a over rank 3r
        alpha_ok = f"{stem}.alpha" not in tensors if adapter.lora_alpha_in_weights else tensors[f"{stem}.alpha"].item() == 3 * 8.0
        assert alpha_ok and tensors[f"{stem}.lora_A.weight"].shape[0] == 3 * 4
        original = torch.cat([layers[m].get_base_layer().weight for m in modules])  # ComfyUI's fused weight
        split = torch.cat([layers[m].get_base_layer().weight + layers[m].get_delta_weight(handle.adapter_name)
                           for m in modules])
        fused = original + _delta(tensors, stem)
        assert float((fused - original).abs().max()) > 1e-5  # trained: the update is there
        torch.testing.assert_close(fused, split, rtol=0, atol=1e-7)


def test_loading_a_fused_file_gives_the_trained_network_bit_for_bit(run: tuple, models: dict[str, Path]) -> None:
    """What network.pretrained_lora_path and the tools read: another seed and alpha, then the
    fused file's weights and alphas, equal to the trained network's."""
    from aitk.networks.build import build_network

    arch, trainer, lora, _ = run
    adapter = family.load_adapter(FAMILIES[arch][0], models[arch], arch)
    handle = build_network(adapter.transformer, linear_rank=4, linear_alpha=1.0, seed=9,
                           candidates=adapter.network_candidates(False))
    alphas = load_network_file(handle, lora, prefix=adapter.lora_prefix, key_for=adapter.lora_key_stem,
                               diffusers_prefix=adapter.diffusers_lora_prefix)
    trained = trainer.network.first.network_state_dict()
    loaded = handle.network_state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert set(alphas.values()) == {8.0}
    # a fused file without the record (another tool's), read without the family's sizes
    tensors, metadata = load_file(str(lora)), {}
    with pytest.raises(ValueError, match="does not record how it splits"):
        load_network_file(handle, (tensors, metadata), prefix=adapter.lora_prefix, key_for=adapter.lora_key_stem)
    if arch == "flux2":  # FLUX.2's q / k / v are equal thirds: its sizes are known, the up is block-diagonal
        load_network_file(handle, (tensors, metadata), prefix=adapter.lora_prefix, key_for=adapter.lora_key_stem,
                          fused=FLUX2_QKV)
        # no alpha record either: alpha = rank, lora_B as the file holds it (alpha 8 / rank 4 folded in)
        assert all(torch.equal(handle.network_state_dict()[k], trained[k] * (2.0 if ".lora_B." in k else 1.0))
                   for k in trained)
        stem = next(k for k in tensors if ".img_attn.qkv.lora_B" in k)
        tensors[stem] = tensors[stem] + 0.01  # trained on the fused weight: no separate rank-4 LoRAs
        with pytest.raises(ValueError, match="not block-diagonal.*aitk convert --to diffusers"):
            load_network_file(handle, (tensors, metadata), prefix=adapter.lora_prefix,
                              key_for=adapter.lora_key_stem, fused=FLUX2_QKV)


def test_tools_split_and_fuse_it_and_diffusers_loads_the_conversion(run: tuple, models: dict[str, Path]) -> None:
    from aitk.tools.convert import convert_file
    from aitk.tools.lora_info import format_info, lora_info

    arch, trainer, lora, tmp = run
    groups = _groups(trainer.adapter, trainer.network.wrapped_module_names())
    info = lora_info(lora)
    assert info.architecture == arch and info.fused_groups == len(groups) and info.network_type == "lora"
    assert info.modules == len(trainer.network.wrapped_module_names()) and info.ranks == {"4": info.modules}
    assert any(line.startswith("fused:") for line in format_info(info))
    converted, nf = convert_file(lora, "diffusers", arch, tmp / f"{arch}_diffusers.safetensors")
    assert sorted(nf.fused) == sorted(groups) and not nf.fused_shared_down
    if arch == "lumina2":
        diff, effect = lumina2_tests._diffusers_diff(trainer, models[arch], converted)
    else:
        diff, effect = flux2_tests._diffusers_diff(trainer, arch, models[arch], converted)
    record(arch, "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="diffusers",
           note="aitk convert of the fused comfyui file")
    assert effect > 1e-4 and diff < 1e-4, (diff, effect)
    back, _ = convert_file(converted, "comfyui", arch, tmp / f"{arch}_back.safetensors")
    original, again = load_file(str(lora)), load_file(str(back))
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)
    with safe_open(str(back), "pt") as f, safe_open(str(lora), "pt") as g:
        assert json.loads(f.metadata()[FUSED_RECORD_KEY]) == json.loads(g.metadata()[FUSED_RECORD_KEY])


def test_merge_reads_the_fused_file(run: tuple, models: dict[str, Path]) -> None:
    """`aitk merge` bakes the fused file into a folder the family's pipeline renders as our previews."""
    from diffusers import Flux2Pipeline, Lumina2Pipeline

    from aitk.tools.merge import merge_model

    arch, trainer, lora, tmp = run
    merged = merge_model(str(models[arch]), [str(lora)], arch=arch, output=tmp / "merged")
    assert len(merged.merged["main"]) == len(trainer.network.wrapped_module_names())
    adapter = trainer.adapter
    tests, pipeline = (lumina2_tests, Lumina2Pipeline) if arch == "lumina2" else (flux2_tests, Flux2Pipeline)
    embeds = tests._embeds(adapter)
    adapter.denoiser().eval()
    ours = tests._render(adapter.sample_pipeline(), embeds)
    baked = tests._render(pipeline.from_pretrained(tmp / "merged"), embeds)
    max_diff = float((ours - baked).abs().max())
    record(arch, "lora", "aitk merge", max_diff < 1e-4, max_diff, note="fused q / k / v file")
    assert max_diff < 1e-4


def _dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's weight with the norm per output row (peft, ComfyUI's output-axis dora_scale)."""
    combined = weight + delta
    return magnitude.reshape(-1, 1) * combined / combined.norm(dim=1, keepdim=True)


def test_dora_fuses_and_lokr_keeps_split_names(models: dict[str, Path], tmp_path: Path) -> None:
    from aitk.networks.build import build_network

    adapter = family.load_adapter(Lumina2Adapter, models["lumina2"], "lumina2")
    spec = LUMINA2_QKV
    naming = {"prefix": adapter.lora_prefix, "key_for": adapter.lora_key_stem,
              "weight_names": adapter.lora_weight_names, "dtype": torch.float32, "fused": spec}
    dora = build_network(copy.deepcopy(adapter.transformer), dora=True, linear_rank=2, linear_alpha=4.0, seed=1,
                         candidates=adapter.network_candidates(False))
    family.randomize(dora, seed=2)
    path = save_lora(tmp_path / "dora.safetensors", dora, **naming)
    tensors = load_file(str(path))
    layers = dora.lora_layers()
    for stem, modules in _groups(adapter, dora.wrapped_module_names(), spec).items():
        base = torch.cat([layers[m].get_base_layer().weight for m in modules])
        fused = _dora_weight(base, _delta(tensors, stem), tensors[f"{stem}.dora_scale"])
        split = torch.cat([_dora_weight(layers[m].get_base_layer().weight, layers[m].get_delta_weight("default"),
                                        layers[m].lora_magnitude_vector["default"].weight) for m in modules])
        torch.testing.assert_close(fused, split, rtol=1e-6, atol=1e-6)
    again = build_network(copy.deepcopy(adapter.transformer), dora=True, linear_rank=2, linear_alpha=1.0, seed=5,
                          candidates=adapter.network_candidates(False))
    load_network_file(again, path, prefix=adapter.lora_prefix, key_for=adapter.lora_key_stem)
    assert all(torch.equal(again.network_state_dict()[k], v) for k, v in dora.network_state_dict().items())

    lokr = build_network(copy.deepcopy(adapter.transformer), network_type="lokr", linear_rank=2, linear_alpha=2.0,
                         seed=1, candidates=adapter.network_candidates(False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = save_lora(tmp_path / "lokr.safetensors", lokr, **naming)
    assert any("ComfyUI skips" in str(w.message) for w in caught)
    keys = load_file(str(path))
    assert any(".attention.qkv.q.lokr_" in k for k in keys) and not any(".attention.qkv.lokr_" in k for k in keys)
    with safe_open(str(path), "pt") as f:
        assert FUSED_RECORD_KEY not in (f.metadata() or {})


def test_unequal_alphas_keep_split_names_with_a_warning(models: dict[str, Path], tmp_path: Path) -> None:
    from aitk.networks.build import build_network

    adapter = family.load_adapter(Flux2Adapter, models["flux2"], "flux2")
    handle = build_network(copy.deepcopy(adapter.transformer), linear_rank=2, linear_alpha=2.0, seed=1,
                           candidates=adapter.network_candidates(False))
    handle.set_module_alphas({"transformer_blocks.0.attn.to_k": 8.0})
    with pytest.warns(UserWarning, match=r"1 q / k / v group\(s\) keep split names.*img_attn.qkv.*differ"):
        path = save_lora(tmp_path / "odd.safetensors", handle, prefix=adapter.lora_prefix,
                         key_for=adapter.lora_key_stem, weight_names=adapter.lora_weight_names,
                         fused=FLUX2_QKV)
    keys = load_file(str(path))
    assert "diffusion_model.double_blocks.0.img_attn.qkv.k.alpha" in keys
    assert "diffusion_model.double_blocks.0.txt_attn.qkv.alpha" in keys


def test_diffusers_flux2_original_layout_reader_reads_the_fused_file(models: dict[str, Path], tmp_path: Path) -> None:
    """diffusers' reader of original FLUX.2 files (ai-toolkit's: no `.alpha`, scale 1) takes one LoRA
    per fused qkv and splits it at any size: at alpha = rank our fused file, without its `.alpha`
    keys, renders as our previews do (the split names it would not take)."""
    from diffusers import Flux2Pipeline

    from aitk.networks.build import build_network

    adapter = family.load_adapter(Flux2Adapter, models["flux2"], "flux2")
    handle = build_network(adapter.transformer, linear_rank=4, linear_alpha=4.0, seed=1,
                           candidates=adapter.network_candidates(False))
    family.randomize(handle, seed=3, std=0.05)
    path = save_lora(tmp_path / "fused.safetensors", handle, prefix=adapter.lora_prefix, key_for=adapter.lora_key_stem,
                     weight_names=adapter.lora_weight_names, dtype=torch.float32, fused=FLUX2_QKV)
    tensors = load_file(str(path))
    assert any(".img_attn.qkv.lora_A." in k for k in tensors)
    plain = tmp_path / "no_alpha.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.endswith(".alpha")}, str(plain))
    embeds = flux2_tests._embeds(adapter)
    diff, effect = family.diffusers_lora_diff(adapter, Flux2Pipeline, models["flux2"], plain,
                                              lambda pipe: flux2_tests._render(pipe, embeds))
    record("flux2", "lora", "diffusers load_lora_weights", diff < 1e-4, diff,
           note="fused comfyui file at alpha = rank, without .alpha")
    assert effect > 1e-4 and diff < 1e-4, (diff, effect)
