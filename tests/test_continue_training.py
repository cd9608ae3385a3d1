"""network.pretrained_lora_path: continue training from an existing LoRA file, including one in
another tool's layout (a hand-built kohya file with text-encoder keys it does not train)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from aitk.config.loader import load_job_file
from aitk.trainer.loop import Trainer, TrainingAborted


def build(job):
    loaded = load_job_file(job)
    return Trainer(loaded.job, loaded.job.config.process[0])


def kohya_file_for(trainer, path, alpha: float):
    """A kohya-style file written by hand (not by our exporter): lora_down / lora_up / alpha per
    module with kohya's name flattening, random weights, plus a text-encoder module."""
    g = torch.Generator().manual_seed(11)
    tensors = {}
    for name, layer in trainer.network.first.lora_layers().items():
        stem = "lora_unet_" + name.replace(".", "_")
        a = layer.lora_A["default"].weight
        b = layer.lora_B["default"].weight
        tensors[f"{stem}.lora_down.weight"] = torch.randn(a.shape, generator=g) * 0.1
        tensors[f"{stem}.lora_up.weight"] = torch.randn(b.shape, generator=g) * 0.1
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 32)
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(32, 4)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return tensors


def test_continue_from_a_kohya_file_starts_from_its_weights(make_job, tmp_path):
    probe = build(make_job("probe", train={"steps": 1}))
    probe._setup()
    foreign = tmp_path / "from_kohya.safetensors"
    tensors = kohya_file_for(probe, foreign, alpha=2.0)

    trainer = build(make_job("cont", train={"steps": 1}, network={"pretrained_lora_path": str(foreign)}))
    trainer._setup()
    handle = trainer.network.first
    for name, layer in handle.lora_layers().items():
        stem = "lora_unet_" + name.replace(".", "_")
        assert torch.equal(layer.lora_A["default"].weight, tensors[f"{stem}.lora_down.weight"])
        assert torch.equal(layer.lora_B["default"].weight, tensors[f"{stem}.lora_up.weight"])
        assert handle.module_alpha(name) == 2.0  # the file's alpha is in effect
    log = (trainer.paths.root / "log.txt").read_text()
    assert "starting from" in log and "text-encoder tensors are not used" in log


def test_continue_from_our_own_file_then_train(make_job, tmp_path):
    first = build(make_job("first", train={"steps": 5, "lr": 5e-3}))
    result = first.run()
    trained = first.network.network_state_dict()
    second = build(make_job("second", train={"steps": 3}, network={"pretrained_lora_path": str(result.final_lora)}))
    second._setup()
    loaded = second.network.network_state_dict()
    # the file is float32 here (save.dtype float32): exactly the trained weights
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)


@pytest.mark.parametrize("problem", ["missing", "wrong_rank"])
def test_a_file_that_does_not_fit_is_a_clear_error(make_job, tmp_path, problem):
    path = tmp_path / "x.safetensors"
    if problem == "wrong_rank":
        probe = build(make_job("p2", train={"steps": 1}, network={"linear": 8, "linear_alpha": 8}))
        probe._setup()
        kohya_file_for(probe, path, alpha=8.0)
    trainer = build(make_job("bad", network={"pretrained_lora_path": str(path)}))
    with pytest.raises(TrainingAborted, match="network.pretrained_lora_path"):
        trainer._setup()
