"""`aitk convert`, `aitk merge` and `aitk lora info` on tiny SD 1.5, SDXL, FLUX and WAN models.

- convert: comfyui -> diffusers -> comfyui gives back bit-identical tensors and alphas, and the
  diffusers file equals what save_format diffusers writes for the same network;
- merge: the merged model, saved and re-loaded from disk, gives the live network's output for
  LoRA / LoCon, LoKr, LoHa and DoRA (diffusers cannot load LoKr / LoHa, so this and the round trip
  through our own loader are their interop proof), WAN 2.2 with one file per expert, and SD / SDXL
  single-file checkpoints;
- lora info: type, ranks, alphas, module count, architecture and the hash check;
- bad input: exit code 1 and one `error:` line, never a traceback.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interop_results import record  # noqa: E402

from aitk.networks.build import build_network  # noqa: E402
from aitk.networks.export import config_alphas, load_network_file, save_lora  # noqa: E402
from aitk.tools.commands import add_tool_commands  # noqa: E402
from aitk.tools.layout import naming_adapter  # noqa: E402

STRENGTH = 0.8
UNETS = ("sd1", "sdxl")
#: denoiser subfolders per expert, in the adapters' expert order
SUBFOLDERS = {"sd1": ["unet"], "sdxl": ["unet"], "flux": ["transformer"], "flux_kontext": ["transformer"],
              "wan21": ["transformer"], "wan21_i2v": ["transformer"], "wan22_14b": ["transformer", "transformer_2"],
              "wan22_14b_i2v": ["transformer", "transformer_2"]}
NETS: dict[str, dict] = {
    "lora": dict(network_type="lora", linear_rank=4, linear_alpha=8.0, conv_rank=2, conv_alpha=3.0),
    "dora": dict(network_type="dora", linear_rank=4, linear_alpha=6.0, conv_rank=2, conv_alpha=1.0),
    "lokr": dict(network_type="lokr", linear_rank=2, linear_alpha=3.0, conv_rank=2, conv_alpha=1.5),
    "loha": dict(network_type="loha", linear_rank=4, linear_alpha=2.0, conv_rank=2, conv_alpha=3.0),
}


# --- models and networks ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, tiny_sd15: Path) -> dict[str, Path]:
    from aitk.models.flux import build_tiny_flux
    from aitk.models.sd import build_tiny_sdxl
    from aitk.models.wan import build_tiny_wan

    root = tmp_path_factory.mktemp("tool-models")
    flux = {arch: build_tiny_flux(root / arch, variant)
            for arch, variant in (("flux", "dev"), ("flux_kontext", "kontext"))}
    wan = {arch: build_tiny_wan(root / arch, variant) for arch, variant in
           (("wan21", "t2v"), ("wan21_i2v", "i2v"), ("wan22_14b", "22_t2v"), ("wan22_14b_i2v", "22_i2v"))}
    return {"sd1": tiny_sd15, "sdxl": build_tiny_sdxl(root / "sdxl"), **flux, **wan}


def _denoiser_class(arch: str) -> type:
    import diffusers

    if arch in UNETS:
        return diffusers.UNet2DConditionModel
    return diffusers.FluxTransformer2DModel if arch.startswith("flux") else diffusers.WanTransformer3DModel


@pytest.fixture(scope="module")
def bases(folders: dict[str, Path]) -> dict[str, dict[str, torch.nn.Module]]:
    """The base denoisers per arch ({expert: module}); tests deep-copy them."""
    return {arch: {sub: _denoiser_class(arch).from_pretrained(folders[arch], subfolder=sub).eval() for sub in subs}
            for arch, subs in SUBFOLDERS.items()}


def _candidates(arch: str, module: torch.nn.Module, include_conv: bool) -> list[str]:
    from aitk.networks.lora import eligible_modules

    if arch in UNETS:
        from aitk.networks.targets import unet_lora_candidates

        return unet_lora_candidates(module, include_conv)
    if arch.startswith("flux"):
        from aitk.models.flux import flux_lora_candidates

        return flux_lora_candidates(module)
    from aitk.models.wan import is_block_target

    return [n for n in eligible_modules(module) if is_block_target(n)]


def _network(arch: str, module: torch.nn.Module, kind: str, seed: int = 0, **override):
    """kind: lora (linear layers only), locon (+ the UNets' 3x3 convs), dora, lokr, loha (UNets:
    with the convs too); FLUX and WAN have no kxk convs to add."""
    kw = {**NETS["lora" if kind == "locon" else kind], **override}
    if arch not in UNETS or kind == "lora":
        kw.pop("conv_rank"), kw.pop("conv_alpha")
    return build_network(module, candidates=_candidates(arch, module, "conv_rank" in kw), seed=seed, **kw)


def _randomize(handle, seed: int = 1, std: float | None = None) -> None:
    # LoHa's update is a product of two products: larger factors, or it barely moves the output
    std = std if std is not None else (0.3 if handle.algo == "loha" else 0.1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in handle.named_trainable_parameters().items():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(p * (1 + noise) if name.endswith("magnitude_vector") else noise)


def _run(module: torch.nn.Module) -> torch.Tensor:
    """The denoiser's output on fixed inputs shaped for its class."""
    g = torch.Generator().manual_seed(0)
    cfg = module.config
    kind = type(module).__name__
    if kind == "UNet2DConditionModel":
        kw = dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 8, cfg.cross_attention_dim, generator=g))
        if cfg.addition_embed_type == "text_time":
            width = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, width, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    elif kind == "FluxTransformer2DModel":
        ids = torch.zeros(16, 3)
        ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
        kw = dict(hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
                  encoder_hidden_states=torch.randn(1, 4, cfg.joint_attention_dim, generator=g),
                  pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                  timestep=torch.tensor([0.5]), img_ids=ids, txt_ids=torch.zeros(4, 3), guidance=torch.tensor([3.5]))
    else:
        kw = dict(hidden_states=torch.randn(1, cfg.in_channels, 5, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 16, cfg.text_dim, generator=g))
        if cfg.image_dim:  # WAN 2.1 I2V: CLIP image tokens feed the cross attention's k_img / v_img
            kw["encoder_hidden_states_image"] = torch.randn(1, 4, cfg.image_dim, generator=g)
    with torch.no_grad():
        return module(**kw, return_dict=False)[0]


def _save(path: Path, arch: str, handle, save_format: str = "comfyui", dtype: torch.dtype = torch.float32,
          metadata: dict[str, str] | None = None) -> Path:
    ad = naming_adapter(arch)
    return save_lora(path, handle, save_format=save_format, prefix=ad.lora_prefix, key_for=ad.lora_key_stem,
                     weight_names=ad.lora_weight_names, diffusers_prefix=ad.diffusers_lora_prefix, dtype=dtype,
                     metadata=metadata)


def aitk(*argv: str) -> tuple[int, str, str]:
    """Run a tool command through a parser built like aitk/cli.py's; (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="aitk")
    add_tool_commands(parser.add_subparsers(dest="command", required=True))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        args = parser.parse_args([str(a) for a in argv])
        code = args.func(args)
    assert "Traceback" not in err.getvalue()
    return code, out.getvalue(), err.getvalue()


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


# --- convert ---------------------------------------------------------------------------------------
CONVERT_CASES = [(a, k) for a in ("sd1", "sdxl", "flux", "wan21") for k in ("locon" if a in UNETS else "lora", "dora")]


def _diffusers_outputs(folder: Path, *loras: Path) -> list[torch.Tensor]:
    """Each denoiser's output after diffusers' own load_lora_weights in a fresh pipeline (WAN 2.2:
    the second file into transformer_2, as diffusers documents it)."""
    import warnings

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on DoRA and adapter names
        for index, lora in enumerate(loras):
            pipe.load_lora_weights(str(lora), **({"load_into_transformer_2": True} if index else {}))
    modules = [pipe.unet] if hasattr(pipe, "unet") else [pipe.transformer, getattr(pipe, "transformer_2", None)]
    return [_run(m.eval()) for m in modules[: len(loras)]]


@pytest.mark.parametrize("arch, kind", CONVERT_CASES, ids=[f"{a}-{k}" for a, k in CONVERT_CASES])
def test_convert_round_trip_is_lossless(arch: str, kind: str, folders, bases, tmp_path: Path) -> None:
    module = copy.deepcopy(bases[arch][SUBFOLDERS[arch][0]])
    handle = _network(arch, module, kind)
    _randomize(handle)
    first = handle.wrapped_module_names()[0]
    handle.set_module_alphas({first: 5.5})  # one odd alpha: the diffusers config needs an alpha_pattern
    meta = {"ss_network_dim": "4", "modelspec.title": "tools test"}
    original = _save(tmp_path / "a.safetensors", arch, handle, dtype=torch.float16, metadata=meta)

    code, out, err = aitk("convert", original, "--to", "diffusers", "--arch", arch, "-o", tmp_path / "b.safetensors")
    assert code == 0, err
    assert "wrote" in out and "diffusers layout" in out
    code, _, err = aitk("convert", tmp_path / "b.safetensors", "--to", "comfyui", "--arch", arch,
                        "-o", tmp_path / "c.safetensors")
    assert code == 0, err
    assert _same_tensors(load_file(str(original)), load_file(str(tmp_path / "c.safetensors")))
    back = _header(tmp_path / "c.safetensors")
    assert back["modelspec.title"] == "tools test" and "lora_adapter_metadata" not in back

    # the converted diffusers file is what save_format diffusers writes for this network
    direct = _save(tmp_path / "d.safetensors", arch, handle, save_format="diffusers", dtype=torch.float16)
    assert _same_tensors(load_file(str(direct)), load_file(str(tmp_path / "b.safetensors")))
    names = handle.wrapped_module_names()
    prefix = naming_adapter(arch).diffusers_lora_prefix + "."

    def alphas(path: Path) -> dict[str, float]:
        cfg = json.loads(_header(path)["lora_adapter_metadata"])
        return config_alphas({k[len(prefix):]: v for k, v in cfg.items()}, names)

    assert alphas(tmp_path / "b.safetensors") == alphas(direct) == {n: float(torch.tensor(a, dtype=torch.float32))
                                                                   for n, a in handle.module_alphas().items()}
    code, _, _ = aitk("convert", tmp_path / "b.safetensors", "--to", "kohya", "--arch", arch,
                      "-o", tmp_path / "c.safetensors")
    assert code == 1  # exists: not replaced without --force

    # the converted file is for diffusers: its load_lora_weights reproduces the live network (whose
    # weights are rounded as the float16 file rounded them)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.copy_(p.half().float())
    live = _run(module)
    for layout, path in (("diffusers", tmp_path / "b.safetensors"), ("comfyui", original)):
        if layout == "comfyui" and kind == "dora":
            continue  # diffusers drops dora_scale (test_networks_lycoris.py shows it)
        diff = float((_diffusers_outputs(folders[arch], path)[0] - live).abs().max())
        record(arch, kind, "diffusers load_lora_weights", diff < 1e-4, diff, layout=layout)
        assert diff < 1e-4, layout
    from aitk.networks.metadata import verify_file_hashes

    assert verify_file_hashes(tmp_path / "b.safetensors").ok and verify_file_hashes(tmp_path / "c.safetensors").ok


@pytest.mark.parametrize("arch", ["flux_kontext", "wan21_i2v", "wan22_14b", "wan22_14b_i2v"])
def test_converted_dora_loads_in_diffusers(arch: str, folders, bases, tmp_path: Path) -> None:
    """The other variants' DoRA files (one per expert for WAN 2.2), converted to the diffusers
    layout, load in diffusers exactly (the comfyui layout's dora_scale is dropped there)."""
    live, converted = [], []
    for index, (name, base) in enumerate(bases[arch].items()):
        module = copy.deepcopy(base)
        handle = _network(arch, module, "dora", seed=index)
        _randomize(handle, seed=index + 1)
        live.append(_run(module))
        path = _save(tmp_path / f"{name}.safetensors", arch, handle)
        converted.append(tmp_path / f"{name}_diffusers.safetensors")
        code, _, err = aitk("convert", path, "--to", "diffusers", "--arch", arch, "-o", converted[-1])
        assert code == 0, err
    for name, ours, theirs in zip(bases[arch], live, _diffusers_outputs(folders[arch], *converted)):
        diff = float((theirs - ours).abs().max())
        record(arch, "dora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="diffusers",
               note="" if len(live) == 1 else f"{name} expert")
        assert diff < 1e-4, name


@pytest.mark.parametrize("arch", ["sd1", "wan21"])
def test_convert_keeps_lycoris_files_and_refuses_a_diffusers_layout(arch: str, bases, tmp_path: Path) -> None:
    for kind in ("lokr", "loha"):
        handle = _network(arch, copy.deepcopy(bases[arch][SUBFOLDERS[arch][0]]), kind)
        _randomize(handle)
        original = _save(tmp_path / f"{kind}.safetensors", arch, handle)
        kohya = tmp_path / f"{kind}_k.safetensors"
        code, _, err = aitk("convert", original, "--to", "kohya", "--arch", arch, "-o", kohya)
        assert code == 0, err
        assert _same_tensors(load_file(str(original)), load_file(str(kohya)))
        code, _, err = aitk("convert", original, "--to", "diffusers", "--arch", arch)
        assert code == 1 and "no diffusers layout" in err


# --- merge ------------------------------------------------------------------------------------------
MERGE_CASES = [(a, k, "comfyui") for a in SUBFOLDERS for k in ("lora", "lokr", "loha")]
MERGE_CASES += [(a, "locon", "comfyui") for a in UNETS]
MERGE_CASES += [(a, "dora", "diffusers" if a == "sd1" else "comfyui") for a in SUBFOLDERS]


@pytest.mark.parametrize("arch, kind, layout", MERGE_CASES, ids=[f"{a}-{k}-{f}" for a, k, f in MERGE_CASES])
def test_merge_and_round_trip_match_the_live_network(arch, kind, layout, folders, bases, tmp_path: Path) -> None:
    ad = naming_adapter(arch)
    experts = {name: copy.deepcopy(m) for name, m in bases[arch].items()}
    files: list[Path] = []
    live: dict[str, torch.Tensor] = {}
    for index, (name, module) in enumerate(experts.items()):
        handle = _network(arch, module, kind, seed=index)
        _randomize(handle, seed=index + 1)
        handle.set_multiplier(STRENGTH)
        live[name] = _run(module)
        assert (live[name] - _run(bases[arch][name])).abs().max() > 1e-3  # the network matters
        files.append(_save(tmp_path / f"{name}.safetensors", arch, handle, save_format=layout))

        # our own loader: a fresh network of the same configuration (other seed, other alphas)
        fresh = copy.deepcopy(bases[arch][name])
        other = _network(arch, fresh, kind, seed=50, linear_alpha=1.0)
        load_network_file(other, files[-1], prefix=ad.lora_prefix, key_for=ad.lora_key_stem,
                          diffusers_prefix=ad.diffusers_lora_prefix)
        other.set_multiplier(STRENGTH)
        diff = float((_run(fresh) - live[name]).abs().max())
        record(arch, kind, "aitk loader (round trip)", diff < 1e-5, diff, layout=layout)
        assert diff < 1e-5

    argv = ["merge", "--model", folders[arch], "--lora", files[0]]
    argv += ["--lora-2", files[1]] if len(files) > 1 else []
    code, out, err = aitk(*argv, "--strength", STRENGTH, "--arch", arch, "-o", tmp_path / "merged",
                          "--dtype", "float32")
    assert code == 0, err
    assert sum(line.startswith("merged ") for line in out.splitlines()) == len(files)
    for name in experts:  # re-loaded from disk
        merged = _denoiser_class(arch).from_pretrained(tmp_path / "merged", subfolder=name).eval()
        diff = float((_run(merged) - live[name]).abs().max())
        record(arch, kind, "aitk merge", diff < 1e-4, diff, layout=layout)
        assert diff < 1e-4, name
    # everything but the merged denoisers is the base's, byte for byte
    for file in folders[arch].rglob("*"):
        rel = file.relative_to(folders[arch])
        if file.is_file() and rel.parts[0] not in SUBFOLDERS[arch]:
            assert (tmp_path / "merged" / rel).read_bytes() == file.read_bytes(), rel
    merge_record = json.loads((tmp_path / "merged" / "aitk_merge.json").read_text())
    assert merge_record["strength"] == STRENGTH and len(merge_record["loras"]) == len(files)


def _single_file(arch: str, folder: Path, out: Path) -> Path:
    if arch == "sd1":
        from ldm_convert import write_ldm_checkpoint

        return write_ldm_checkpoint(folder, out)
    from test_models_sdxl import make_adapter, write_sgm_checkpoint

    return write_sgm_checkpoint(make_adapter(folder), out)


@pytest.mark.parametrize("arch", UNETS)
def test_merge_into_a_single_file_checkpoint(arch: str, folders, bases, tmp_path: Path) -> None:
    from aitk.config.schema import ModelConfig
    from aitk.models.registry import adapter_class

    base_file = _single_file(arch, folders[arch], tmp_path / "base.safetensors")
    module = copy.deepcopy(bases[arch]["unet"])
    handle = _network(arch, module, "locon")
    _randomize(handle)
    live = _run(module)
    lora = _save(tmp_path / "lora.safetensors", arch, handle)
    code, out, err = aitk("merge", "--model", base_file, "--lora", lora, "--arch", arch, "--config", folders[arch],
                          "-o", tmp_path / "merged.safetensors")
    assert code == 0, err

    cfg = ModelConfig(name_or_path=str(tmp_path / "merged.safetensors"), arch=arch,
                      model_kwargs={"config": str(folders[arch])})
    adapter = adapter_class(arch)(cfg, torch.device("cpu"), torch.float32)
    adapter.load()
    diff = float((_run(adapter.unet.eval()) - live).abs().max())
    record(arch, "locon", "aitk merge", diff < 1e-4, diff)
    assert diff < 1e-4
    before, after = load_file(str(base_file)), load_file(str(tmp_path / "merged.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert before.keys() == after.keys() and len(changed) == len(handle.wrapped_module_names())
    assert all(k.startswith("model.diffusion_model.") and k.endswith(".weight") for k in changed)

    # a diffusers folder cannot become a single file here (no full LDM conversion): a clear error
    code, _, err = aitk("merge", "--model", folders[arch], "--lora", lora, "--arch", arch,
                        "-o", tmp_path / "x.safetensors")
    assert code == 1 and "single-file output needs" in err


# --- lora info --------------------------------------------------------------------------------------
def _info(path: Path) -> tuple[dict, str]:
    code, out, err = aitk("lora", "info", path, "--json")
    assert code == 0, err
    code, text, err = aitk("lora", "info", path)
    assert code == 0, err
    return json.loads(out), text


@pytest.mark.parametrize("kind", ["lora", "locon", "dora", "lokr", "loha"])
def test_lora_info_reports_type_ranks_alphas_and_modules(kind: str, bases, tmp_path: Path) -> None:
    handle = _network("sd1", copy.deepcopy(bases["sd1"]["unet"]), kind)
    _randomize(handle)
    path = _save(tmp_path / "net.safetensors", "sd1", handle)
    info, text = _info(path)
    names = handle.wrapped_module_names()
    decomposed = getattr(handle, "is_decomposed", lambda n: True)
    ranks = collections.Counter(str(handle.module_rank(n)) if decomposed(n) else "full" for n in names)
    alphas = collections.Counter(f"{a:g}" for a in handle.module_alphas().values())
    assert info["network_type"] == kind and info["modules"] == len(names)
    assert info["ranks"] == dict(ranks) and info["alphas"] == dict(alphas)
    assert info["architecture"] == "sd1" and "guessed" in info["architecture_source"]
    assert f"network type:  {kind}\n" in text and f"modules:       {len(names)}" in text
    assert "sshs_model_hash matches the file" in text


def test_lora_info_architecture_layouts_and_a_wrong_hash(bases, tmp_path: Path) -> None:
    handle = _network("sdxl", copy.deepcopy(bases["sdxl"]["unet"]), "lora")
    spec = {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "ss_network_dim": "4"}
    path = _save(tmp_path / "sdxl.safetensors", "sdxl", handle, metadata=spec)
    info, text = _info(path)
    assert info["architecture"] == "sdxl" and "modelspec.architecture" in info["architecture_source"]
    assert "ss_network_dim: 4" in text
    for arch in ("flux", "wan21"):
        h = _network(arch, copy.deepcopy(bases[arch]["transformer"]), "lora")
        info, _ = _info(_save(tmp_path / f"{arch}.safetensors", arch, h))
        assert info["architecture"].startswith(arch) and info["network_type"] == "lora"
        info, text = _info(_save(tmp_path / f"{arch}_d.safetensors", arch, h, save_format="diffusers"))
        assert info["layout"].startswith("diffusers") and info["alphas"] == {"8": len(h.wrapped_module_names())}
    # same tensors, a header claiming another hash
    tensors, header = load_file(str(path)), _header(path)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**header, "sshs_model_hash": "0" * 64})
    _, text = _info(tmp_path / "bad.safetensors")
    assert "sshs_model_hash does NOT match the file" in text


# --- bad input --------------------------------------------------------------------------------------
def test_bad_input_is_one_error_line_and_exit_code_1(folders, bases, tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    text = tmp_path / "notes.safetensors"
    text.write_text("not a safetensors file")
    handle = _network("sd1", copy.deepcopy(bases["sd1"]["unet"]), "lora")
    good = _save(tmp_path / "good.safetensors", "sd1", handle)
    lokr = _save(tmp_path / "lokr.safetensors", "sd1", _network("sd1", copy.deepcopy(bases["sd1"]["unet"]), "lokr"))
    tensors = load_file(str(good))
    # a module the model does not have, in the model's own naming: only the loaded model can tell
    ghost = {**tensors, **{k.replace("down_blocks_0_", "down_blocks_7_"): v.clone() for k, v in tensors.items()
                           if "down_blocks_0_attentions_0_proj_in" in k}}
    save_file(ghost, str(tmp_path / "ghost.safetensors"))
    save_file({"lora_unet_foo_bar.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "foreign.safetensors"))
    save_file({"model.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    sd = folders["sd1"]
    out = tmp_path / "out"
    cases = {
        ("lora", "info", missing): "no such file",
        ("lora", "info", text): "not a readable .safetensors file",
        ("lora", "info", tmp_path / "model.safetensors"): "no LoRA",
        ("convert", missing, "--to", "diffusers", "--arch", "sd1"): "no such file",
        ("convert", good, "--to", "diffusers", "--arch", "sd9"): "--arch 'sd9' is not supported",
        ("convert", good, "--to", "onnx", "--arch", "sd1"): "--to 'onnx'",
        ("convert", good, "--to", "diffusers", "--arch", "flux"): "name no flux module",
        ("convert", tmp_path / "foreign.safetensors", "--to", "diffusers", "--arch", "sd1"): "name no sd1 module",
        ("convert", lokr, "--to", "diffusers", "--arch", "sd1"): "no diffusers layout",
        ("merge", "--model", sd, "--lora", missing, "--arch", "sd1", "-o", out): "no such file",
        ("merge", "--model", sd, "--lora", text, "--arch", "sd1", "-o", out): "not a readable",
        ("merge", "--model", sd, "--lora", good, "--arch", "sd9", "-o", out): "not supported",
        ("merge", "--model", tmp_path / "nope", "--lora", good, "--arch", "sd1", "-o", out): "no such file or folder",
        ("merge", "--model", folders["flux"], "--lora", good, "--arch", "flux", "-o", out): "name no flux module",
        ("merge", "--model", sd, "--lora", tmp_path / "ghost.safetensors", "--arch", "sd1", "-o", out):
            "match nothing in the model",
        ("merge", "--model", sd, "--lora", good, "--lora-2", good, "--arch", "sd1", "-o", out): "two experts",
        ("merge", "--model", sd, "--lora", good, "--arch", "sd1", "-o", out, "--dtype", "int8"): "--dtype",
    }
    for argv, message in cases.items():
        code, stdout, err = aitk(*argv)
        assert code == 1, (argv, stdout, err)
        last = err.strip().splitlines()[-1]  # model loading may draw progress bars before it
        assert last.startswith("error: ") and message in last, (argv, err)
    assert not out.exists()


def test_commands_are_wired_into_the_aitk_cli(tmp_path: Path, bases) -> None:
    from aitk import cli

    choices = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "lora" not in choices:
        pytest.skip("aitk/cli.py does not register the tool commands yet (add_tool_commands)")
    path = _save(tmp_path / "x.safetensors", "sd1", _network("sd1", copy.deepcopy(bases["sd1"]["unet"]), "lora"))
    assert cli.main(["lora", "info", str(path)]) == 0
    assert cli.main(["convert", str(path), "--to", "diffusers", "--arch", "sd1"]) == 0
