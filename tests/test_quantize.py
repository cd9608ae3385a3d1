"""model.quantize: the frozen base is stored in int8 / float8 (torchao) while the LoRA trains in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aitk.config.loader import load_job_file
from aitk.extras import extras_dir
from aitk.trainer.loop import Trainer, TrainingAborted


@pytest.fixture(autouse=True)
def _extras(monkeypatch):
    # `make install` keeps torchao in .venv/extras (diffusers imports it at start-up when installed)
    if extras_dir().is_dir():
        monkeypatch.syspath_prepend(str(extras_dir()))


def run(make_job, name: str, **model):
    job = make_job(
        name,
        model=model,
        train={"steps": 40, "lr": 2e-3, "lr_scheduler": "constant"},
        sample={"sample_every": 1000, "prompts": ["a red square"], "sample_steps": 2},
    )
    loaded = load_job_file(job)
    trainer = Trainer(loaded.job, loaded.job.config.process[0])
    return trainer, trainer.run()


@pytest.mark.parametrize("qtype", ["qint8", "qfloat8", "uint4"])
def test_quantized_base_trains_a_full_precision_lora(make_job, qtype):
    trainer, result = run(make_job, f"q_{qtype}", quantize=True, qtype=qtype)
    assert result.state == "completed"
    unet = trainer.adapter.denoiser()
    linears = [l for l in trainer.network.lora_layers().values() if isinstance(l.base_layer, torch.nn.Linear)]
    assert linears and all("torchao" in type(l.base_layer.weight).__module__ for l in linears)  # stored quantized
    params = trainer.network.trainable_parameters()
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    lora_b = [p for k, p in trainer.network.named_trainable_parameters().items() if "lora_B" in k]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the network learned
    log = (result.output_dir / "log.txt").read_text()
    assert f"to {qtype}" in log and "quantized" in log
    assert list((result.output_dir / "samples").glob("*.jpg"))  # previews use the quantized base
    losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in trainer.paths.metrics.read_text().splitlines()]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_quantize_te_stores_the_text_encoder_in_8_bits(make_job):
    trainer, result = run(make_job, "q_te", quantize_te=True, qtype_te="qint8")
    assert result.state == "completed"
    encoder = trainer.adapter.text_encoder
    linears = [m for m in encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all("torchao" in type(m.weight).__module__ for m in linears)
    unet_linears = [m for m in trainer.adapter.denoiser().modules() if type(m) is torch.nn.Linear]
    assert unet_linears and all(type(m.weight) is torch.nn.Parameter for m in unet_linears)  # quantize: false
    assert "of text_encoder to qint8" in (result.output_dir / "log.txt").read_text()


def test_unknown_qtype_stops_before_training(make_job):
    with pytest.raises(TrainingAborted, match="model.qtype: 'int3' is not supported"):
        run(make_job, "q_bad", quantize=True, qtype="int3")


def test_quantized_flux_trains_and_its_lora_loads_into_the_unquantized_base(tmp_path, shapes_dataset):
    from diffusers import FluxPipeline

    from aitk.models.flux import build_tiny_flux
    from conftest import base_process, deep_update, write_job

    model = build_tiny_flux(tmp_path / "flux", "dev")
    process = deep_update(base_process(model, shapes_dataset, tmp_path / "out"), {
        "model": {"arch": "flux", "quantize": True, "qtype": "qint8"},
        "train": {"steps": 30, "lr": 5e-3, "lr_scheduler": "constant"},
        "network": {"linear": 8, "linear_alpha": 8},
    })
    loaded = load_job_file(write_job(tmp_path / "qflux.yaml", "qflux", process))
    trainer = Trainer(loaded.job, loaded.job.config.process[0])
    result = trainer.run()
    losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in trainer.paths.metrics.read_text().splitlines()]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses
    linears = [l for l in trainer.network.lora_layers().values() if isinstance(l.base_layer, torch.nn.Linear)]
    assert all("torchao" in type(l.base_layer.weight).__module__ for l in linears)

    def render(pipe) -> torch.Tensor:
        return pipe(prompt="a red circle", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    plain = FluxPipeline.from_pretrained(model)
    plain.set_progress_bar_config(disable=True)
    before = render(plain)
    plain.load_lora_weights(str(result.final_lora))
    loaded_modules = {n for n, m in plain.transformer.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert len(loaded_modules) == len(trainer.network.wrapped_module_names())
    after = render(plain)
    assert (after - before).abs().max() > 1e-3  # the LoRA trained on the int8 base acts on the fp32 one
