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
    assert np.mean(run[-window:]) < 0.9 * np.mean(run[:window]), run
    samples = sorted(p.name for p in (result.output_dir / "samples").iterdir())
    assert samples == [f"{step:09d}_0.jpg" for step in previews]


def diffusers_lora_diff(
    adapter: Any, pipeline_cls: type, model: Path, lora: Path, render: Callable[[Any], torch.Tensor]
) -> tuple[float, float]:
    """(max |ours - diffusers with the file|, max |ours - the plain model|): `render` (latents of
    a seeded preview) through the adapter's own preview pipeline, against a fresh `pipeline_cls`
    of `model` before and after its load_lora_weights(`lora`)."""
    adapter.denoiser().eval()
    with adapter.preview_context():
        ours = render(adapter.sample_pipeline())
    fresh = pipeline_cls.from_pretrained(model)
    base = render(fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on DoRA
        fresh.load_lora_weights(str(lora))
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
    loader into a new network of `network`'s configuration|: another seed and alpha 1, so the
    file's weights and alphas must win."""
    from aitk.networks.build import build_network
    from aitk.networks.export import load_network_file

    handle = build_network(fresh.transformer, linear_alpha=1.0, seed=9, candidates=fresh.network_candidates(False),
                           **network)
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
    returns the info of a copy without a header (`folder`/no_header.safetensors, its
    architecture guessed from the key names) for the family to check."""
    from safetensors.torch import load_file, save_file

    info = lora_info(lora)
    assert info["architecture"] == arch and info["network_type"] == "lora", info
    assert info["modules"] == len(trainer.network.wrapped_module_names())
    bare = folder / "no_header.safetensors"
    save_file(load_file(str(lora)), str(bare))
    return lora_info(bare)


def merged_diff(adapter: Any, model: Path, lora: Path, arch: str, folder: Path, transformer_cls: type,
                batch: Any, cond: Any) -> float:
    """`aitk merge` of `lora` into `model` (fp32, `folder`/merged); max |the adapter's prediction
    with the merged transformer - with its live network|."""
    from test_tools import aitk

    code, _, err = aitk("merge", "--model", model, "--lora", lora, "--arch", arch, "-o", folder / "merged",
                        "--dtype", "float32")
    assert code == 0, err
    merged = transformer_cls.from_pretrained(folder / "merged", subfolder="transformer").eval()
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


def check_quantized_base(trainer: Any) -> None:
    """Every Linear the network wraps sits on a torchao-quantized (qint8) weight."""
    layers = [m for m in trainer.network.lora_layers().values() if isinstance(m.base_layer, torch.nn.Linear)]
    assert layers and all("torchao" in type(m.base_layer.weight).__module__ for m in layers)


def finite_run(result: Any, name: str) -> None:
    """Run `name` completed with a finite loss at every step."""
    import math

    assert result.state == "completed" and all(math.isfinite(x) for x in losses(result, name))


def check_folded_lora_file(trainer: Any, lora: Path, architecture: str, base_version: str, *, prefix: str,
                           weight_names: tuple[str, str], alpha: float = 16.0) -> dict[str, torch.Tensor]:
    """tests/family_checks.check_lora_file for the families that fold alpha into the weights: the
    file holds `<prefix><module>.<down / up>.weight` of every wrapped module and no `.alpha`, the
    header records the trained `alpha` and names the family; returns its tensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from aitk.networks.folded_alpha import ALPHA_RECORD_KEY

    tensors = load_file(str(lora))
    wrapped = trainer.network.wrapped_module_names()
    assert set(tensors) == {f"{prefix}{m}.{name}.weight" for m in wrapped for name in weight_names}
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta[ALPHA_RECORD_KEY]) == {"alpha": alpha, "modules": {}}
    assert meta["modelspec.architecture"] == architecture and meta["ss_base_model_version"] == base_version
    return tensors
