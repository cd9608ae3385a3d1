"""Helpers and checks the model-family tests share (tests/test_models_<family>.py): an adapter on a
tiny model, random pixels, random network weights, a training run and its losses, and the checks
every family makes the same way (a saved LoRA loaded by diffusers renders as our previews do; an
assistant LoRA is on while training and off for previews)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

CPU = torch.device("cpu")


def load_adapter(cls: type, folder: Path | str, arch: str, **model_fields: Any) -> Any:
    """An adapter of `cls` loaded from `folder` on the CPU in fp32."""
    from aitk.config.schema import ModelConfig

    adapter = cls(ModelConfig(name_or_path=str(folder), arch=arch, **model_fields), CPU, torch.float32)
    adapter.load()
    return adapter


def pixels(seed: int, b: int = 2, h: int = 64, w: int = 64) -> torch.Tensor:
    """A batch of random images (b, 3, h, w) in [-1, 1]."""
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def randomize(handle: Any, seed: int, std: float = 0.2) -> None:
    """Random weights for every trainable parameter of a network (a fresh LoRA changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def write_job(tmp_path: Path, name: str, model_dir: Path, data: Path, *sections: dict[str, Any],
              dataset: dict[str, Any] | None = None) -> Path:
    """A job file training `model_dir` on `data` (conftest's base process), `sections` merged in
    order, `dataset` into its dataset."""
    from conftest import base_process, deep_update
    from conftest import write_job as write

    process = base_process(model_dir, data, tmp_path / "out")
    for changes in sections:
        process = deep_update(process, changes)
    process["datasets"][0].update(dataset or {})
    return write(tmp_path / f"{name}.yaml", name, process)


def train(job: Path, **trainer_kwargs: Any) -> tuple[Any, Any]:
    """(trainer, result) of running the job file's first process."""
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    loaded = load_job_file(job)
    trainer = Trainer(loaded.job, loaded.job.config.process[0], **trainer_kwargs)
    return trainer, trainer.run()


def losses(result: Any, name: str) -> list[float]:
    """The loss of every step of run `name` (its metrics file)."""
    lines = (result.output_dir / f"metrics_{name}.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def train_to_the_end(job: Path) -> tuple[Any, Any, list[float]]:
    """(trainer, result, the loss of every step) of a run that must complete (write_job's files)."""
    trainer, result = train(job)
    assert result.state == "completed"
    return trainer, result, losses(result, job.stem)


def noisy_batch(adapter: Any, seed: int = 0, **train_fields: Any) -> Any:
    """The adapter's NoisyBatch of two random 64 px images under TrainConfig(**train_fields)."""
    from aitk.config.schema import TrainConfig

    latents = adapter.encode_images(pixels(seed))
    return adapter.make_noisy_batch(latents, TrainConfig(**train_fields), torch.Generator().manual_seed(seed))


def check_lora_file(trainer: Any, lora: Path, architecture: str, base_version: str, *, prefix: str,
                    weight_names: tuple[str, str], alpha: float = 16.0) -> dict[str, torch.Tensor]:
    """The saved file holds the trained network only: `<prefix><module>.<down / up>.weight` and
    `.alpha` (= `alpha`) of every wrapped module, with the family's modelspec.architecture and
    ss_base_model_version; returns its tensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(lora))
    wrapped = trainer.network.wrapped_module_names()
    names = (f"{weight_names[0]}.weight", f"{weight_names[1]}.weight", "alpha")
    assert set(tensors) == {f"{prefix}{m}.{name}" for m in wrapped for name in names}
    assert all(tensors[f"{prefix}{m}.alpha"].item() == alpha for m in wrapped)
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == architecture and meta["ss_base_model_version"] == base_version
    return tensors


def check_falling_loss_and_previews(result: Any, name: str, steps: int = 30, window: int = 10,
                                    previews: Sequence[int] = (0, 15, 30)) -> None:
    """Run `name` completed `steps` steps, its last `window` losses average at least 10% below
    its first, and it wrote a preview at each of `previews`."""
    import numpy as np

    assert result.state == "completed" and result.step == steps
    run = losses(result, name)
    print(f"{name}: first-{window} mean loss {np.mean(run[:window]):.4f}, last-{window} {np.mean(run[-window:]):.4f}")
    assert np.mean(run[-window:]) < 0.9 * np.mean(run[:window]), run
    samples = sorted(p.name for p in (result.output_dir / "samples").iterdir())
    assert samples == [f"{step:09d}_0.jpg" for step in previews]


def diffusers_lora_diff(
    adapter: Any, pipeline_cls: type, model: Path, lora: Path | dict[str, torch.Tensor],
    render: Callable[[Any], torch.Tensor], prepare: Callable[[Any], None] | None = None,
) -> tuple[float, float]:
    """(max |ours - diffusers with the file|, max |ours - the plain model|): `render` (latents of
    a seeded preview) through the adapter's own preview pipeline, against a fresh `pipeline_cls`
    of `model` (passed to `prepare` first) before and after its load_lora_weights(`lora`: a file
    or its tensors)."""
    adapter.denoiser().eval()
    with adapter.preview_context():
        ours = render(adapter.sample_pipeline())
    fresh = pipeline_cls.from_pretrained(model)
    if prepare is not None:
        prepare(fresh)
    base = render(fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on DoRA
        fresh.load_lora_weights(lora if isinstance(lora, dict) else str(lora))
    return float((ours - render(fresh)).abs().max()), float((ours - base).abs().max())


def check_assistant_on_in_training_off_in_previews(
    helped: Any, reference: Any, batch: Any, cond: Any, modules: Sequence[str], assistant_only: str,
    preview_tol: float = 0.0,
) -> None:
    """`helped` carries an assistant LoRA written with `randomize(seed=4)` on `modules` (rank 2,
    alpha 4, inject seed 3); `reference` is the plain model. With the same trained network on
    both and the assistant injected into `reference` by hand, training predictions agree; the
    assistant changes them; previews (preview_context) match the model without it, within
    `preview_tol` (0: exactly); only the network trains; `assistant_only` (a module only the
    assistant wraps) has it active again afterwards."""
    from aitk.models.assistant import ASSISTANT_ADAPTER
    from aitk.networks.lora import inject_network

    network = inject_network(helped.transformer, linear_rank=4, linear_alpha=4, seed=0,
                             candidates=helped.network_candidates(False))
    randomize(network, seed=11, std=0.05)
    trainable = {id(p) for p in network.trainable_parameters()}
    assert all(p.requires_grad == (id(p) in trainable) for p in helped.transformer.parameters())

    by_hand = inject_network(reference.transformer, linear_rank=2, linear_alpha=4, candidates=list(modules),
                             seed=3, adapter_name="by_hand")
    randomize(by_hand, seed=4)
    ref_net = inject_network(reference.transformer, linear_rank=4, linear_alpha=4, seed=0,
                             candidates=reference.network_candidates(False))
    randomize(ref_net, seed=11, std=0.05)
    with torch.no_grad():
        with_assistant = helped.predict(batch, cond)
        torch.testing.assert_close(with_assistant, reference.predict(batch, cond), rtol=1e-5, atol=1e-5)
        by_hand.set_multiplier(0.0)
        without = reference.predict(batch, cond)
        assert (with_assistant - without).abs().max() > 1e-3  # the assistant changes training
        with helped.preview_context():
            off = helped.predict(batch, cond)
        if preview_tol:
            torch.testing.assert_close(off, without, rtol=preview_tol, atol=preview_tol)
        else:
            assert torch.equal(off, without)
        assert torch.equal(helped.predict(batch, cond), with_assistant)  # back on afterwards
    assert all(p.requires_grad == (id(p) in trainable) for p in helped.transformer.parameters())
    assert ASSISTANT_ADAPTER in dict(helped.transformer.named_modules())[assistant_only].active_adapters


def loader_round_trip_diff(adapter: Any, fresh: Any, lora: Path, batch: Any, cond: Any, **network: Any) -> float:
    """Max |adapter's prediction - `fresh`'s (the plain model) with `lora` read by aitk's own
    loader into a new network of `network`'s configuration (candidates: the default targets)|:
    another seed and alpha 1, so the file's weights and alphas must win."""
    from aitk.networks.build import build_network
    from aitk.networks.export import load_network_file

    network = {"candidates": fresh.network_candidates(False), **network}
    handle = build_network(fresh.transformer, linear_alpha=1.0, seed=9, **network)
    load_network_file(handle, lora, prefix=fresh.lora_prefix, key_for=fresh.lora_key_stem,
                      diffusers_prefix=fresh.diffusers_lora_prefix)
    with torch.no_grad():
        return float((fresh.predict(batch, cond) - adapter.predict(batch, cond)).abs().max())


def diffusers_layout_round_trip(lora: Path, arch: str, folder: Path) -> Path:
    """`aitk convert` of a ComfyUI-layout `lora` to the diffusers layout and back gives the same
    tensors; returns the diffusers-layout file (`transformer.` keys)."""
    from safetensors.torch import load_file

    from test_tools import aitk

    converted = folder / f"{lora.stem}_diffusers.safetensors"
    code, _, err = aitk("convert", lora, "--to", "diffusers", "--arch", arch, "-o", converted)
    assert code == 0, err
    assert all(k.startswith("transformer.") for k in load_file(str(converted)))
    back = folder / f"{lora.stem}_back.safetensors"
    assert aitk("convert", converted, "--to", "comfyui", "--arch", arch, "-o", back)[0] == 0
    original, again = load_file(str(lora)), load_file(str(back))
    assert again.keys() == original.keys() and all(torch.equal(v, original[k]) for k, v in again.items())
    return converted


def lora_info(path: Path) -> dict[str, Any]:
    """`aitk lora info --json` of `path` (it must succeed)."""
    from test_tools import aitk

    code, out, err = aitk("lora", "info", path, "--json")
    assert code == 0, (out, err)
    return json.loads(out)


def check_lora_info(trainer: Any, lora: Path, arch: str, folder: Path) -> dict[str, Any]:
    """`aitk lora info` names the trained file's architecture, network type and module count;
    returns the info of a copy without a header (headerless_info) for the family to check."""
    info = lora_info(lora)
    assert info["architecture"] == arch and info["network_type"] == "lora", info
    assert info["modules"] == len(trainer.network.wrapped_module_names())
    return headerless_info(lora, folder)


def headerless_info(lora: Path, folder: Path) -> dict[str, Any]:
    """`aitk lora info` of a copy of `lora` without its header (`folder`/no_header.safetensors): the
    architecture guessed from the key names."""
    from safetensors.torch import load_file, save_file

    bare = folder / "no_header.safetensors"
    save_file(load_file(str(lora)), str(bare))
    return lora_info(bare)


def merged_diff(adapter: Any, model: Path, lora: Path, arch: str, folder: Path, transformer_cls: type,
                batch: Any, cond: Any, **load: Any) -> float:
    """`aitk merge` of `lora` into `model` (fp32, `folder`/merged); max |the adapter's prediction
    with the merged transformer (from_pretrained with `load`) - with its live network|."""
    from test_tools import aitk

    code, _, err = aitk("merge", "--model", model, "--lora", lora, "--arch", arch, "-o", folder / "merged",
                        "--dtype", "float32")
    assert code == 0, err
    merged = transformer_cls.from_pretrained(folder / "merged", subfolder="transformer", **load).eval()
    with torch.no_grad():
        live = adapter.predict(batch, cond)
        adapter.transformer, plain = merged, adapter.transformer
        try:
            out = adapter.predict(batch, cond)
        finally:
            adapter.transformer = plain
    return float((out - live).abs().max())


def check_preset_validates_clean(preset: str, folder: Path, capsys: Any) -> tuple[dict[str, Any], Path]:
    """The UI preset `preset`, its dataset in `folder`, passes `aitk validate` without a warning;
    returns the job and the file it was written to."""
    import yaml

    from aitk.config.validate import validate_command
    from aitk.ui.presets import PRESETS

    job = PRESETS[preset]["job"]
    job["config"]["process"][0]["datasets"][0]["folder_path"] = str(folder)
    path = folder / f"{preset}.yaml"
    path.write_text(yaml.safe_dump(job))
    assert validate_command([str(path)]) == 0
    printed = capsys.readouterr()
    assert "warning" not in printed.out + printed.err, (preset, printed)
    return job, path


def check_quantized_base(trainer: Any, every: bool = True) -> None:
    """Every Linear the network wraps (`every` False: one at least) sits on a torchao-quantized
    (qint8) weight."""
    layers = [m for m in trainer.network.lora_layers().values() if isinstance(m.base_layer, torch.nn.Linear)]
    assert layers and (all if every else any)("torchao" in type(m.base_layer.weight).__module__ for m in layers)


def finite_run(result: Any, name: str) -> None:
    """Run `name` completed with a finite loss at every step."""
    import math

    assert result.state == "completed" and all(math.isfinite(x) for x in losses(result, name))


def check_folded_lora_file(trainer: Any, lora: Path, architecture: str, base_version: str, *, prefix: str,
                           weight_names: tuple[str, str], alpha: float = 16.0,
                           stem_for: Callable[[str], str] | None = None) -> dict[str, torch.Tensor]:
    """tests/family_checks.check_lora_file for the families that fold alpha into the weights: the
    file holds `<prefix><module>.<down / up>.weight` (or `<stem_for(module)>...`) of every wrapped
    module and no `.alpha`, the header records the trained `alpha` and names the family; returns
    its tensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from aitk.networks.folded_alpha import ALPHA_RECORD_KEY

    tensors = load_file(str(lora))
    wrapped = trainer.network.wrapped_module_names()
    stems = [stem_for(m) if stem_for else prefix + m for m in wrapped]
    assert set(tensors) == {f"{stem}.{name}.weight" for stem in stems for name in weight_names}
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta[ALPHA_RECORD_KEY]) == {"alpha": alpha, "modules": {}}
    assert meta["modelspec.architecture"] == architecture and meta["ss_base_model_version"] == base_version
    return tensors


def red_circle_inputs(adapter: Any, seed: int, encoder: Any = None) -> tuple[Any, Any]:
    """(batch, cond): the adapter's noisy batch of `pixels(seed)` (noise seed `seed - 1`) and "a red
    circle" twice, encoded by `encoder` (default: the adapter)."""
    from aitk.config.schema import TrainConfig
    from aitk.models.base import PromptEmbeds

    batch = adapter.make_noisy_batch(adapter.encode_images(pixels(seed)), TrainConfig(),
                                     torch.Generator().manual_seed(seed - 1))
    return batch, PromptEmbeds.cat([(encoder or adapter).encode_prompts(["a red circle"])] * 2)


def file_layout(lora: Path) -> str:
    """"diffusers" for a file of `transformer.` keys, else "comfyui"."""
    from safetensors.torch import load_file

    return "diffusers" if next(iter(load_file(str(lora)))).startswith("transformer.") else "comfyui"


def check_round_trip(arch: str, adapter: Any, fresh: Any, lora: Path, kind: str, *, batch: Any = None,
                     cond: Any = None, layout: str | None = None, **network: Any) -> float:
    """loader_round_trip_diff of a `kind` network (default inputs: red_circle_inputs(adapter, 3)
    encoded by `fresh`) is below 1e-5; recorded for `arch` under `layout` (default: the file's)."""
    from interop_results import record

    if batch is None:
        batch, cond = red_circle_inputs(adapter, 3, fresh)
    diff = loader_round_trip_diff(adapter, fresh, lora, batch, cond, network_type=kind, **network)
    record(arch, kind, "aitk loader (round trip)", diff < 1e-5, diff, layout=layout or file_layout(lora))
    assert diff < 1e-5, (kind, diff)
    return diff


def check_merge(arch: str, adapter: Any, model: Path, lora: Path, folder: Path, transformer_cls: type,
                batch: Any = None, cond: Any = None, **load: Any) -> float:
    """merged_diff of `lora` (`aitk merge --arch arch`; default inputs: red_circle_inputs(adapter, 2))
    is below 1e-4; recorded for `arch`."""
    from interop_results import record

    if batch is None:
        batch, cond = red_circle_inputs(adapter, 2)
    diff = merged_diff(adapter, model, lora, arch, folder, transformer_cls, batch, cond, **load)
    record(arch, "lora", "aitk merge", diff < 1e-4, diff)
    assert diff < 1e-4
    return diff


def check_parts_from_extras(reference: Any, model: Path, make_adapter: Callable[..., Any], folder: Path,
                            check: Callable[[Any], None] | None = None, file_refused: bool = True) -> None:
    """A folder with only `model`'s transformer is refused without model.extras_name_or_path and,
    with it (the folder or its transformer/ subfolder), loads `reference`'s transformer (and passes
    `check`); a missing path and (`file_refused`: models without single-file transformers) a file
    are refused by name."""
    import shutil

    import pytest

    from aitk.models.base import ModelLoadError

    only = folder / "finetune"
    shutil.copytree(model / "transformer", only / "transformer")
    with pytest.raises(ModelLoadError, match="extras_name_or_path"):
        make_adapter(only)
    want = reference.transformer.state_dict()
    for source in (only, only / "transformer"):
        adapter = make_adapter(source, extras_name_or_path=str(model))
        got = adapter.transformer.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), source
        if check is not None:
            check(adapter)
    with pytest.raises(ModelLoadError, match="model.name_or_path.*neither"):
        make_adapter(folder / "missing")
    if not file_refused:
        return
    (folder / "file.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        make_adapter(folder / "file.safetensors")


#: the network sections of the short DoRA and LoKr runs the family tests make
DORA_NETWORK = {"dora": True, "linear": 4, "linear_alpha": 8}
LOKR_NETWORK = {"type": "lokr", "linear": 2, "linear_alpha": 4, "lokr_factor": -1}


def check_dora_loads_in_diffusers(arch: str, trainer: Any, result: Any, name: str,
                                  diffusers_diff: Callable[[Any, Path], tuple[float, float]]) -> None:
    """Run `name` (a DoRA saved in the diffusers layout) is finite, its file holds magnitudes under
    `transformer.` keys, and `diffusers_diff(adapter, file)` (ours vs diffusers with it, ours vs the
    plain model) shows an exact load with an effect; recorded for `arch`."""
    from safetensors.torch import load_file

    from interop_results import record

    finite_run(result, name)
    tensors = load_file(str(result.final_lora))
    assert any(k.endswith("lora_magnitude_vector") for k in tensors) and all(k.startswith("transformer.") for k in tensors)
    diff, effect = diffusers_diff(trainer.adapter, result.final_lora)
    record(arch, "dora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="diffusers")
    assert effect > 1e-3 and diff < 1e-4, (diff, effect)


def check_cached_text_lokr_run(trainer: Any, result: Any, name: str, steps: int, prefix: str,
                               encoder: str = "text_encoder") -> dict[str, torch.Tensor]:
    """Run `name` (a LoKr of `steps` steps with cached text embeddings, previews at 0 and the end)
    is finite with the adapter's `encoder` released, and its file holds LoKr tensors under `prefix`;
    returns them."""
    from safetensors.torch import load_file

    finite_run(result, name)
    assert getattr(trainer.adapter, encoder) is None
    assert sorted(p.name for p in (result.output_dir / "samples").iterdir()) == ["000000000_0.jpg", f"{steps:09d}_0.jpg"]
    tensors = load_file(str(result.final_lora))
    assert tensors and all(k.startswith(prefix) for k in tensors)
    assert any(k.endswith(".lokr_w1") for k in tensors)
    return tensors


def converted_file(lora: Path, to: str, arch: str, out: Path) -> Path:
    """`aitk convert` of `lora` to layout `to` (it must succeed); returns `out`."""
    from test_tools import aitk

    code, _, err = aitk("convert", lora, "--to", to, "--arch", arch, "-o", out)
    assert code == 0, err
    return out


def check_lora_changes_pipeline(pipe: Any, lora: Path, render: Callable[[Any], torch.Tensor]) -> None:
    """`pipe`'s load_lora_weights(`lora`) changes its `render`."""
    before = render(pipe)
    pipe.load_lora_weights(str(lora))
    assert (render(pipe) - before).abs().max() > 1e-4


def alpha_folded(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same LoRA without `.alpha` keys (ai-toolkit's own files of the alpha-folding families):
    alpha / rank folded into lora_B."""
    out = {k: v.clone() for k, v in tensors.items() if not k.endswith(".alpha")}
    for key, alpha in tensors.items():
        if key.endswith(".alpha"):
            stem = key.removesuffix(".alpha")
            out[f"{stem}.lora_B.weight"] *= float(alpha) / out[f"{stem}.lora_A.weight"].shape[0]
    return out


def check_diffusers_layout_run(arch: str, kind: str, result: Any, run_losses: list[float],
                               diffusers_diff: Callable[[Path], tuple[float, float]]) -> None:
    """A finite `kind` run ("lora" / "dora") saved in the diffusers layout: `transformer.` keys, no
    `.alpha`, magnitudes only for DoRA; `diffusers_diff(file)` shows an exact load with an effect;
    recorded for `arch`."""
    import math

    from safetensors.torch import load_file

    from interop_results import record

    assert all(math.isfinite(x) for x in run_losses)
    tensors = load_file(str(result.final_lora))
    assert all(k.startswith("transformer.") and not k.endswith(".alpha") for k in tensors)
    assert any("lora_magnitude_vector" in k for k in tensors) == (kind == "dora")
    diff, effect = diffusers_diff(result.final_lora)
    record(arch, kind, "diffusers load_lora_weights", diff < 1e-4, diff, layout="diffusers")
    assert effect > 1e-4 and diff < 1e-4, (diff, effect)


def check_conversion_loads_in_diffusers(arch: str, lora: Path, folder: Path,
                                        diffusers_diff: Callable[[Path], tuple[float, float]]) -> None:
    """aitk.tools.convert turns the comfyui-layout `lora` into the diffusers layout (`transformer.`
    keys, no `.alpha`), which `diffusers_diff` shows loads exactly (recorded for `arch`), and back
    bit for bit."""
    from safetensors.torch import load_file

    from aitk.tools.convert import convert_file
    from interop_results import record

    converted, _ = convert_file(lora, "diffusers", arch, folder / "diffusers.safetensors")
    assert all(k.startswith("transformer.") and ".alpha" not in k for k in load_file(str(converted)))
    diff, effect = diffusers_diff(converted)
    record(arch, "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="diffusers")
    assert effect > 1e-3 and diff < 1e-4, (diff, effect)
    back, _ = convert_file(converted, "comfyui", arch, folder / "back.safetensors")
    original, again = load_file(str(lora)), load_file(str(back))
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)


def check_merged_folder_renders_alike(arch: str, trainer: Any, model: Path, lora: Path, folder: Path,
                                      pipeline_cls: type, render: Callable[[Any], torch.Tensor]) -> None:
    """aitk.tools.merge bakes `lora` (every wrapped module) into `folder`/merged, which
    `pipeline_cls` renders as the adapter's previews with the live network; recorded for `arch`."""
    from aitk.tools.merge import merge_model
    from interop_results import record

    merged = merge_model(str(model), [str(lora)], arch=arch, output=folder / "merged")
    assert len(merged.merged["main"]) == len(trainer.network.wrapped_module_names())
    ours = render(trainer.adapter.sample_pipeline())
    baked = render(pipeline_cls.from_pretrained(folder / "merged"))
    diff = float((ours - baked).abs().max())
    record(arch, "lora", "aitk merge", diff < 1e-4, diff)
    assert diff < 1e-4
#: the job sections of those short runs: a DoRA saved for diffusers, a LoKr on cached text embeddings
#: (previews from the cache at 0 and 6), a LoRA on a qint8 base
DORA_RUN = {"train": {"steps": 6}, "network": DORA_NETWORK, "save": {"save_format": "diffusers"},
            "sample": {"sample_every": 1000}}
CACHED_TEXT_LOKR_RUN = {"train": {"steps": 6, "cache_text_embeddings": True}, "sample": {"sample_every": 6},
                        "network": LOKR_NETWORK}
QUANTIZED_RUN = {"train": {"steps": 6}, "sample": {"sample_every": 1000}, "model": {"quantize": True, "qtype": "qint8"}}


def check_weighted_loss_and_min_snr_refused(adapter: Any, latents: torch.Tensor, seed: int) -> None:
    """timestep_type "weighted" gives a loss weight per sample (noise seed `seed`); train.min_snr_gamma
    (a DDPM weighting) is refused by name."""
    import pytest

    from aitk.config.schema import TrainConfig
    from aitk.models.flow_matching import FlowMatchingConfigError

    weighted = adapter.make_noisy_batch(latents, TrainConfig(timestep_type="weighted"), torch.Generator().manual_seed(seed))
    assert weighted.loss_weights is not None and weighted.loss_weights.shape == (latents.shape[0],)
    with pytest.raises(FlowMatchingConfigError, match="train.min_snr_gamma"):
        adapter.make_noisy_batch(latents, TrainConfig(min_snr_gamma=5.0), None)


def check_original_names(key_stem: Callable[[str], str], module_for_stem: Callable[[str], str | None],
                         transformer: torch.nn.Module, expected: dict[str, str], unnamed: str) -> None:
    """`key_stem` names each module of `expected` as given, every Linear of `transformer` maps to a
    stem and back (`module_for_stem`), and `unnamed` (no original layer) is refused by name."""
    import pytest

    assert {module: key_stem(module) for module in expected} == expected
    linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    assert all(module_for_stem(key_stem(n)) == n for n in linears)  # every Linear, both ways
    with pytest.raises(ValueError, match="original checkpoint"):
        key_stem(unnamed)
