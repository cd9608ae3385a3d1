"""Accuracy-recovery adapters (model.qtype "uint4|<LoRA file>"): quantized around, frozen, active in
training and previews, never saved; a wrong reference stops the run before training.

The adapter files are built here for the tiny models: random lora_A / lora_B for chosen Linear
layers, written in the key layouts LoRA files use (kohya / ComfyUI stems, diffusers prefixes)."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from aitk.extras import extras_dir

RANK = 4


@pytest.fixture(autouse=True)
def _extras(monkeypatch):
    if extras_dir().is_dir():  # torchao lives there
        monkeypatch.syspath_prepend(str(extras_dir()))


# ------------------------------------------------------------------------------ adapter files
def recovery_names(module: nn.Module, skip: tuple[str, ...] = ("ff.net.2",)) -> list[str]:
    """Every Linear of `module` except names containing `skip` (left for the uncovered qtype).
    In the tiny UNet this includes time_embedding and resnet time_emb_proj layers, which the
    trained LoRA never wraps."""
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and not any(s in n for s in skip)]


def write_recovery_file(
    module: nn.Module,
    path: Path,
    names: list[str],
    *,
    stem: Callable[[str], str],
    weights: tuple[str, str] = ("lora_down", "lora_up"),
    alpha: float | None = None,
    seed: int = 0,
    scale: float = 0.3,
) -> dict[str, torch.Tensor]:
    """A LoRA file covering `names` of `module`, keys `stem(name).<down|up>.weight` (+ `.alpha`)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        out_f, in_f = module.get_submodule(name).weight.shape
        tensors[f"{stem(name)}.{weights[0]}.weight"] = torch.randn(RANK, in_f, generator=g) * scale
        tensors[f"{stem(name)}.{weights[1]}.weight"] = torch.randn(out_f, RANK, generator=g) * scale
        if alpha is not None:
            tensors[f"{stem(name)}.alpha"] = torch.tensor(float(alpha))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return tensors


def kohya_stem(name: str) -> str:
    from aitk.networks.export import kohya_module_key

    return kohya_module_key("lora_unet", name)


def tiny_unet(tiny_sd15: Path) -> nn.Module:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd15), subfolder="unet")
    unet.requires_grad_(False)
    return unet.eval()


def unet_output(unet: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=text).sample


# ------------------------------------------------------------------------- the pieces, no run
LAYOUTS = {
    "kohya": dict(stem=kohya_stem, weights=("lora_down", "lora_up"), alpha=RANK),
    "kohya_no_alpha": dict(stem=kohya_stem, weights=("lora_down", "lora_up"), alpha=None),
    "diffusers": dict(stem=lambda n: f"unet.{n}", weights=("lora_A", "lora_B"), alpha=None),
    "bare_half_alpha": dict(stem=lambda n: n, weights=("lora_A", "lora_B"), alpha=RANK / 2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_recovery_adapter_is_the_files_lora_on_the_quantized_base(tiny_sd15, tmp_path, layout):
    from aitk.models.quantize import quantize_with_report
    from aitk.models.recovery import (
        RECOVERY_ADAPTER, attach_recovery_adapter, read_recovery_file, recovery_targets,
    )

    unet = tiny_unet(tiny_sd15)
    names = recovery_names(unet)
    spec = LAYOUTS[layout]
    tensors = write_recovery_file(unet, tmp_path / "ara.safetensors", names, **spec)
    file = read_recovery_file(str(tmp_path / "ara.safetensors"))
    naming = {"key_for": kohya_stem, "diffusers_prefix": "unet"}
    targets = recovery_targets(unet, file, **naming)
    assert list(targets) == names and set(targets.values()) == {RANK}

    report = quantize_with_report(unet, "uint4", covered=set(targets))
    linears = {n: m for n, m in unet.named_modules() if isinstance(m, nn.Linear)}
    assert report.quantized == len(names) and report.uncovered == len(linears) - len(names) > 0
    for name, layer in linears.items():  # covered layers in 4 bits, the rest in 8
        assert layer.weight.target_dtype == (torch.int4 if name in targets else torch.int8), name
    plain = unet_output(unet)

    (handle,) = attach_recovery_adapter(unet, file, **naming)
    assert handle.adapter_name == RECOVERY_ADAPTER and handle.wrapped_module_names() == names
    assert not any(p.requires_grad for p in unet.parameters())  # frozen
    recovered = unet_output(unet)
    diff = (recovered - plain).abs().max().item()
    assert diff > 1e-2, diff  # the adapter changes the quantized base's output

    # exactly the file's LoRA: base(x) + (alpha / rank) * B A x on a covered layer
    name = names[3]
    layer = unet.get_submodule(name)
    stem = spec["stem"](name)
    down = tensors[f"{stem}.{spec['weights'][0]}.weight"]
    up = tensors[f"{stem}.{spec['weights'][1]}.weight"]
    scale = (spec["alpha"] or RANK) / RANK
    x = torch.randn(2, down.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + scale * x @ down.T @ up.T)


def test_a_file_for_another_model_is_one_clear_error(tiny_sd15, tmp_path):
    from aitk.models.recovery import RecoveryAdapterError, read_recovery_file, recovery_targets

    unet = tiny_unet(tiny_sd15)
    write_recovery_file(unet, tmp_path / "other.safetensors", recovery_names(unet)[:2],
                        stem=lambda n: "lora_transformer_single_blocks_" + n.replace(".", "_"))
    file = read_recovery_file(str(tmp_path / "other.safetensors"))
    with pytest.raises(RecoveryAdapterError, match=r"model.qtype: .*other.safetensors.*2 of its 2 layers are not in this model"):
        recovery_targets(unet, file, key_for=kohya_stem, diffusers_prefix="unet")


# -------------------------------------------------------------------------------- a real run
@contextmanager
def count_calls(layers: list[nn.Module]):
    """Counts forward calls of the given modules; `counts["preview"]` while in a preview."""
    counts = {"train": 0, "preview": 0}
    state = {"preview": False}

    def hook(module, args, output):
        counts["preview" if state["preview"] else "train"] += 1

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield counts, state
    finally:
        for h in handles:
            h.remove()


def test_training_with_a_recovery_adapter(make_job, tiny_sd15, tmp_path):
    from safetensors.torch import load_file

    from aitk.config.loader import load_job_file
    from aitk.models.recovery import RECOVERY_ADAPTER
    from aitk.trainer.loop import Trainer

    unet = tiny_unet(tiny_sd15)
    ara_path = tmp_path / "adapters" / "tiny_sd15_torchao_uint4.safetensors"
    ara = write_recovery_file(unet, ara_path, recovery_names(unet), stem=kohya_stem, alpha=RANK)
    job = make_job(
        "ara",
        model={"quantize": True, "qtype": f"uint4|{ara_path}"},
        train={"steps": 6, "lr": 2e-3, "lr_scheduler": "constant"},
        save={"save_every": 3},
        sample={"sample_every": 6, "prompts": ["a red square"], "sample_steps": 2},
    )
    loaded = load_job_file(job)
    trainer = Trainer(loaded.job, loaded.job.config.process[0])

    # watch the recovery adapter's own LoRA layers, in training steps and inside previews
    original_setup_network = trainer._setup_network
    watched: dict = {}

    def setup_network_and_watch() -> None:
        original_setup_network()
        denoiser = trainer.adapter.denoiser()
        layers = [m.lora_A[RECOVERY_ADAPTER] for m in denoiser.modules() if RECOVERY_ADAPTER in getattr(m, "lora_A", {})]
        watched["ctx"] = count_calls(layers)
        watched["counts"], watched["state"] = watched["ctx"].__enter__()
        original_preview = trainer.adapter.preview_context

        @contextmanager
        def preview_context():
            watched["state"]["preview"] = True
            try:
                with original_preview():
                    yield
            finally:
                watched["state"]["preview"] = False

        trainer.adapter.preview_context = preview_context

    trainer._setup_network = setup_network_and_watch
    try:
        result = trainer.run()
    finally:
        if "ctx" in watched:
            watched["ctx"].__exit__(None, None, None)
    assert result.state == "completed"
    counts = watched["counts"]
    assert counts["train"] > 0 and counts["preview"] > 0, counts  # on in training and in previews

    log = (result.output_dir / "log.txt").read_text()
    assert "accuracy recovery adapter" in log and "not supported" not in log
    assert f"{ara_path}" in log and "to uint4, 4 outside the recovery adapter to uint8" in log

    # the trained network is its own adapter: it trained, the recovery adapter did not change
    denoiser = trainer.adapter.denoiser()
    for name in recovery_names(unet)[:5]:
        layer = denoiser.get_submodule(name)
        torch.testing.assert_close(layer.lora_A[RECOVERY_ADAPTER].weight, ara[f"{kohya_stem(name)}.lora_down.weight"])
    trained = trainer.network.named_trainable_parameters()
    assert any(p.abs().sum() > 0 for k, p in trained.items() if "lora_B" in k)

    # the saved LoRA holds the trained network only: its modules, its values
    saved = load_file(str(result.final_lora))
    saved_modules = {k.rsplit(".", 2)[0] for k in saved if k.endswith(".weight")}
    wrapped = set(trainer.network.wrapped_module_names())
    assert saved_modules == {kohya_stem(n) for n in wrapped}
    assert not any("time_emb" in k for k in saved)  # covered by the recovery adapter, never trained
    name = next(iter(wrapped))
    torch.testing.assert_close(saved[f"{kohya_stem(name)}.lora_up.weight"], trained[f"{name}.lora_B.weight"])
    # ... and so do checkpoints
    checkpoints = sorted(result.output_dir.rglob("network.safetensors"))
    assert checkpoints
    state = load_file(str(checkpoints[-1]))
    assert set(state) == set(trained)
    for key, tensor in state.items():
        assert not torch.equal(tensor, ara.get(f"{kohya_stem(key.rsplit('.', 2)[0])}.lora_down.weight", torch.empty(0)))
    assert list((result.output_dir / "samples").glob("*.jpg"))


@pytest.mark.parametrize("reference, expected", [
    ("{tmp}/missing/ara.safetensors", r"model.qtype \(accuracy recovery adapter\): '.*missing/ara.safetensors' does not exist"),
    ("nobody/no-such-repo/ara.safetensors", r"nobody/no-such-repo/ara.safetensors.*HF_HUB_OFFLINE is set"),
])
def test_a_wrong_reference_stops_before_training(make_job, tmp_path, reference, expected):
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer, TrainingAborted

    job = make_job("bad_ara", model={"quantize": True, "qtype": "uint4|" + reference.format(tmp=tmp_path)})
    loaded = load_job_file(job)
    trainer = Trainer(loaded.job, loaded.job.config.process[0])
    with pytest.raises(TrainingAborted, match=expected) as caught:
        trainer.run()
    assert "\n" not in str(caught.value)
    assert trainer.state.step == 0
    status = json.loads(trainer.paths.status.read_text())
    assert status.get("step", 0) == 0
