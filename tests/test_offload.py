"""Layer offloading and low_vram change nothing but memory.

Every offloaded (or parked) weight is replaced by NaNs while it is off the device, so a block that
ran without being brought back would turn the loss into NaN: identical losses and LoRA files
prove each block was on the device whenever it ran, forward and backward. Hooks count how many
blocks are on the device at every block's forward.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import base_process, deep_update, write_job  # noqa: E402

from aitk.models.offload import WINDOW, BlockOffloader, offloaded_indices, repeated_blocks
from aitk.models.placement import Placement


def poisoned(host: torch.Tensor) -> torch.Tensor:
    if host.is_floating_point() and type(host) is torch.Tensor:
        return torch.full_like(host, float("nan"))
    return host


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off-device weights read as NaN (the real host copies stay untouched)."""
    monkeypatch.setattr(BlockOffloader, "_parked", staticmethod(poisoned))
    monkeypatch.setattr(Placement, "_parked", staticmethod(poisoned))


def is_parked(block: nn.Module) -> bool:
    weights = [p for p in block.parameters()
               if not p.requires_grad and p.is_floating_point() and type(p.data) is torch.Tensor]
    return bool(weights) and bool(torch.isnan(weights[0]).all())


# --- the mechanism on a toy model ------------------------------------------------------------
class ToyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.lora = nn.Linear(16, 16, bias=False)  # trainable, like a LoRA inside the block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.down(torch.relu(self.up(h))) + self.lora(h)


class Toy(nn.Module):
    def __init__(self, checkpointing: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ToyBlock() for _ in range(6))
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
        return x


def toy_step(share: float | None, checkpointing: bool) -> tuple[torch.Tensor, torch.Tensor, BlockOffloader | None, int]:
    torch.manual_seed(0)
    model = Toy(checkpointing)
    model.requires_grad_(False)
    for block in model.blocks:
        block.lora.requires_grad_(True)
    offloader = None
    if share is not None:
        offloader = BlockOffloader(model, list(model.blocks), share, torch.device("cpu"))
    most = 0

    def count(_m: nn.Module, _a: object) -> None:
        nonlocal most
        most = max(most, sum(not is_parked(b) for b in model.blocks if id(b) in offloaded_ids))

    offloaded_ids = {id(model.blocks[i]) for i in offloaded_indices(6, share or 0.0)}
    for block in model.blocks:
        block.register_forward_pre_hook(count)
    loss = model(torch.randn(4, 16, generator=torch.Generator().manual_seed(1))).square().mean()
    loss.backward()
    grads = torch.cat([b.lora.weight.grad.flatten() for b in model.blocks])
    return loss.detach(), grads, offloader, most


@pytest.mark.parametrize("checkpointing", [False, True])
def test_toy_offloading_is_exact_and_keeps_the_window(poison, checkpointing):
    loss0, grads0, _, _ = toy_step(None, checkpointing)
    for share in (0.0, 0.5, 1.0):
        loss, grads, offloader, most = toy_step(share, checkpointing)
        assert torch.equal(loss, loss0) and torch.equal(grads, grads0), share
        assert offloader.offloaded_count == round(share * 6)
        assert most <= WINDOW and offloader.max_resident <= WINDOW
        if share:
            # backward brought blocks back (saved weights were not kept on the device)
            assert offloader.fetches > offloader.offloaded_count


def test_offloaded_blocks_are_spread_and_named_by_the_libraries():
    assert offloaded_indices(8, 0.5) == [1, 3, 5, 7]
    assert offloaded_indices(8, 1.0) == list(range(8)) and offloaded_indices(8, 0.0) == []
    from diffusers import FluxTransformer2DModel

    tiny = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    )
    blocks = repeated_blocks(tiny)
    assert [type(b).__name__ for b in blocks] == ["FluxTransformerBlock"] * 2 + ["FluxSingleTransformerBlock"] * 3


# --- real training runs ----------------------------------------------------------------------
CASES = {"sd15": 3e-3, "flux": 5e-3, "wan22_14b": 1e-2}


@pytest.fixture(scope="module")
def offload_models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("offload_models")


def model_dir(case: str, root: Path, tiny_sd15: Path) -> Path:
    if case == "sd15":
        return tiny_sd15
    if case == "flux":
        from aitk.models.flux import build_tiny_flux

        path = root / "flux"
        return path if path.exists() else build_tiny_flux(path, "dev")
    from aitk.models.wan import build_tiny_wan

    path = root / "wan22"
    return path if path.exists() else build_tiny_wan(path, "22_t2v")


def run(case: str, name: str, root: Path, tiny_sd15: Path, data: Path, tmp_path: Path, model: dict, train: dict,
        **process_changes: dict):
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    changes = {
        "model": {"arch": case if case != "sd15" else "sd1", **model},
        "train": {"steps": 6, "lr": CASES[case], "lr_scheduler": "constant", "switch_boundary_every": 2, **train},
        "network": {"linear": 4, "linear_alpha": 4},
        **process_changes,
    }
    process = deep_update(base_process(model_dir(case, root, tiny_sd15), data, tmp_path / "out"), changes)
    job = write_job(tmp_path / f"{name}.yaml", name, process)
    loaded = load_job_file(job)
    trainer = Trainer(loaded.job, loaded.job.config.process[0])
    counts: list[int] = []
    original_setup = trainer._setup_optimizer

    def watch_blocks() -> None:  # after placement and network: count residency at each block
        original_setup()
        for part in trainer.placement.parts.values():
            if part.offloader is None:
                continue
            blocks = trainer.adapter.offload_blocks(part.module)
            offloaded = [blocks[b.index] for b in part.offloader.blocks]

            def count(_m, _a, offloaded=offloaded) -> None:
                counts.append(sum(not is_parked(b) for b in offloaded))

            for block in blocks:
                block.register_forward_pre_hook(count)

    trainer._setup_optimizer = watch_blocks
    result = trainer.run()
    assert result.state == "completed", result
    losses = [json.loads(line)["loss"] for line in (result.output_dir / f"metrics_{name}.jsonl").read_text().splitlines()]
    # a weight used while off the device reads NaN: the loss says so (written as null)
    assert all(isinstance(loss, float) and math.isfinite(loss) for loss in losses), (name, losses)
    files = [load_file(p) for p in result.final_loras]
    return trainer, losses, files, counts


def same_files(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize("case", list(CASES))
def test_offloading_changes_nothing_but_memory(case, poison, offload_models, tiny_sd15, shapes_dataset, tmp_path):
    for checkpointing in (False, True):
        train = {"gradient_checkpointing": checkpointing}
        _, base_losses, base_files, _ = run(case, f"base{int(checkpointing)}", offload_models, tiny_sd15,
                                            shapes_dataset, tmp_path, {}, train)
        for share in (0.5, 1.0):
            name = f"off{int(share * 100)}_{int(checkpointing)}"
            model = {"layer_offloading": True, "layer_offloading_transformer_percent": share}
            trainer, losses, files, counts = run(case, name, offload_models, tiny_sd15, shapes_dataset, tmp_path,
                                                 model, train)
            assert losses == base_losses, (name, losses, base_losses)
            assert same_files(files, base_files), name
            offloaders = [p.offloader for p in trainer.placement.parts.values() if p.offloader is not None]
            denoisers = [p.offloader for n, p in trainer.placement.parts.items() if n.startswith("denoiser:")]
            assert denoisers and all(o.offloaded_count == round(share * o.block_count) > 0 for o in denoisers)
            # text encoders: layer_offloading_text_encoder_percent defaults to 1 (all their blocks)
            assert all(o.offloaded_count == o.block_count for o in offloaders if o not in denoisers)
            assert counts and max(counts) <= WINDOW, (name, max(counts))
            assert all(o.max_resident <= WINDOW for o in offloaders)


PREVIEWS = {"sample": {"sample_every": 3, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 1.0,
                       "num_frames": 5, "prompts": ["a red circle [trigger]"]}}


def test_wan22_low_vram_keeps_one_expert_on_the_device(poison, offload_models, tiny_sd15, shapes_dataset,
                                                       tmp_path, monkeypatch):
    import aitk.models.placement as placement_module

    on_device_at_forward: list[int] = []
    original_exclusive = placement_module.Placement.exclusive

    def exclusive(self, names):  # count the experts on the device each time one runs
        original_exclusive(self, names)
        for name in names:
            def count(_m, _a) -> None:
                experts = [self.parts[n].module for n in names]
                on_device_at_forward.append(sum(not is_parked(e) for e in experts))

            self.parts[name].module.register_forward_pre_hook(count)

    monkeypatch.setattr(placement_module.Placement, "exclusive", exclusive)
    both = run("wan22_14b", "both", offload_models, tiny_sd15, shapes_dataset, tmp_path, {}, {}, **PREVIEWS)
    trainer, losses, files, _ = run("wan22_14b", "lowvram", offload_models, tiny_sd15, shapes_dataset, tmp_path,
                                    {"low_vram": True}, {}, **PREVIEWS)
    assert losses == both[1]
    assert same_files(files, both[2])
    assert on_device_at_forward and set(on_device_at_forward) == {1}
    # switch_boundary_every 2 over 6 steps: high, low, high, plus previews: each swap is logged
    assert trainer.placement.swaps >= 3
    assert "expert swap:" in trainer.paths.log.read_text()
    previews = sorted(p.name for p in (trainer.paths.samples).iterdir())
    assert "000000006_0.mp4" in previews, previews


@pytest.mark.parametrize("case", ["sd15", "flux"])
def test_low_vram_parks_text_encoders_and_vae_and_trains_identically(case, poison, offload_models, tiny_sd15,
                                                                      shapes_dataset, tmp_path):
    base = run(case, "resident", offload_models, tiny_sd15, shapes_dataset, tmp_path, {}, {})
    trainer, losses, files, _ = run(case, "lowvram", offload_models, tiny_sd15, shapes_dataset, tmp_path,
                                    {"low_vram": True}, {})
    assert losses == base[1] and same_files(files, base[2])
    parked = {name for name, part in trainer.placement.parts.items() if not part.resident}
    assert parked == {*trainer.adapter.text_encoders(), "vae"}
    assert not any(trainer.placement.parts[name].on_device for name in parked)  # back on the host after use


def test_offloading_quantized_blocks_is_exact(poison, offload_models, tiny_sd15, shapes_dataset, tmp_path):
    quantized = {"quantize": True, "qtype": "qint8"}
    _, base_losses, base_files, _ = run("flux", "q", offload_models, tiny_sd15, shapes_dataset, tmp_path, quantized, {})
    trainer, losses, files, counts = run(
        "flux", "q_off", offload_models, tiny_sd15, shapes_dataset, tmp_path,
        {**quantized, "layer_offloading": True, "layer_offloading_transformer_percent": 1.0}, {},
    )
    assert losses == base_losses and same_files(files, base_files)
    offloader = trainer.placement.parts["denoiser:main"].offloader
    block = trainer.adapter.offload_blocks(trainer.adapter.transformer)[0]
    assert type(block.attn.to_q.base_layer.weight).__name__ == "Int8Tensor"  # quantized, then offloaded
    assert offloader.offloaded_count == offloader.block_count and max(counts) <= WINDOW


def test_validate_refuses_offloading_a_full_fine_tune(tiny_sd15, shapes_dataset, tmp_path):
    import subprocess
    import sys

    process = base_process(tiny_sd15, shapes_dataset, tmp_path / "out")
    del process["network"]
    process["model"].update(layer_offloading=True, layer_offloading_transformer_percent=0.5)
    job = write_job(tmp_path / "full.yaml", "full", process)
    done = subprocess.run([sys.executable, "-m", "aitk", "validate", str(job)], capture_output=True, text=True)
    assert done.returncode != 0
    said = done.stdout + done.stderr
    assert "config.process[0].model.layer_offloading" in said and "full fine-tune" in said
    assert "Traceback" not in said


def test_cached_text_embeddings_keep_text_encoders_off_the_device_between_uses(
    offload_models, tiny_sd15, shapes_dataset, tmp_path
):
    trainer, _, _, _ = run("flux", "cached", offload_models, tiny_sd15, shapes_dataset, tmp_path, {},
                           {"cache_text_embeddings": True})
    # text encoders were parked (never resident), brought in for caching and released after
    assert not set(trainer.adapter.text_encoder_names) & set(trainer.placement.parts)
    assert trainer.text_encoders_released
    ledger = trainer.device_ledger
    transformer = sum(p.numel() * p.element_size() for p in trainer.adapter.transformer.parameters()
                      if not p.requires_grad)
    # on the device now: the transformer only (latents cached, so the VAE is parked too)
    assert ledger.current == transformer, (ledger.current, transformer)


SETUP_CASES = {"sdxl": ("sdxl", "sdxl"), "flux": ("flux", "dev"), "wan22_14b": ("wan22", "22_t2v")}


@pytest.mark.parametrize("case", list(SETUP_CASES))
def test_setup_never_holds_more_than_training_plus_one_block(case, offload_models, shapes_dataset, tmp_path):
    """Bytes put on the device during set-up (quantizing on the way) never exceed the plan's
    training-time weights plus the largest single piece in full precision."""
    from aitk.config.loader import load_job_file
    from aitk.models.placement import pieces
    from aitk.models.registry import create_adapter
    from aitk.plan import plan_job
    from aitk.trainer.loop import Trainer

    if case == "sdxl":
        from aitk.models.sd import build_tiny_sdxl

        folder = offload_models / "sdxl"
        folder = folder if folder.exists() else build_tiny_sdxl(folder)
    else:
        folder = model_dir(case, offload_models, Path("unused"))
    process = deep_update(base_process(folder, shapes_dataset, tmp_path / "out"), {
        "model": {"arch": case, "quantize": True, "qtype": "qint8"},
        "train": {"steps": 1},
        "network": {"linear": 4, "linear_alpha": 4},
    })
    job = write_job(tmp_path / f"{case}.yaml", case, process)
    loaded = load_job_file(job)
    trainer = Trainer(loaded.job, loaded.job.config.process[0])
    setup_peak: list[int] = []
    original = trainer._setup

    def setup() -> None:
        original()
        setup_peak.append(trainer.device_ledger.peak)

    trainer._setup = setup
    assert trainer.run().state == "completed"

    # the largest piece set-up moves at once, in full precision, from a fresh unquantized load
    adapter = create_adapter(loaded.job.config.process[0].model, torch.device("cpu"), torch.float32)
    adapter.load()
    largest = max(
        sum(t.numel() * t.element_size() for t in piece.parameters()) + sum(b.numel() * b.element_size() for b in piece.buffers())
        for module in [*adapter.experts().values(), *adapter.text_encoders().values()]
        for _, piece in pieces(module, adapter.offload_blocks(module))
    )
    plan = plan_job(job)
    assert setup_peak[0] <= plan.step.weights + largest, (setup_peak[0], plan.step.weights, largest)
    # what set-up used to do: every part on the device in full precision, then quantize
    loaded = [*adapter.experts().values(), *adapter.text_encoders().values(), *adapter.auxiliary_modules().values()]
    everything = sum(t.numel() * t.element_size() for m in loaded for t in [*m.parameters(), *m.buffers()])
    assert setup_peak[0] < everything
    # and the plan's training-time weights are what set-up left on the device
    assert trainer.device_ledger.current == pytest.approx(plan.step.weights, rel=0.15)


def test_tied_weights_move_once_and_stay_tied():
    from aitk.models.offload import DeviceLedger

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Embedding(10, 8)
            self.inner = nn.Module()
            self.inner.embed = nn.Embedding(10, 8)
            self.inner.embed.weight = self.shared.weight  # as T5's shared / encoder.embed_tokens

    model = Tied().requires_grad_(False)
    ledger = DeviceLedger()
    placement = Placement(torch.device("cpu"), ledger)
    placement.add("te", model, resident=False)
    placement.bring("te")
    assert model.shared.weight.data_ptr() == model.inner.embed.weight.data_ptr()
    assert ledger.current == 10 * 8 * 4  # one copy
    placement.park("te")
    assert ledger.current == 0
    resident = Tied().requires_grad_(False)
    placement.add("resident", resident, resident=True)
    assert ledger.current == 10 * 8 * 4
    assert resident.shared.weight.data_ptr() == resident.inner.embed.weight.data_ptr()


def test_blockwise_quantization_keeps_one_full_precision_block_on_the_device():
    """Quantizing on the way: the device never holds more than the quantized model plus one block
    in full precision (quantizing the whole model after moving it would hold all of it)."""
    from aitk.models.offload import DeviceLedger
    from aitk.models.quantize import quantize_frozen

    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256)) for _ in range(8))
            self.head = nn.Linear(256, 8)

    model = Wide().requires_grad_(False)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    block_full = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    ledger = DeviceLedger()
    Placement(torch.device("cpu"), ledger).add(
        "denoiser", model, resident=True, blocks=list(model.blocks),
        quantize=lambda piece, _prefix: quantize_frozen(piece, "qint8"),
    )
    quantized = ledger.current
    assert type(model.blocks[0][0].weight).__name__ == "Int8Tensor"
    assert quantized < full / 3  # int8 weights and fp32 scales / biases
    assert ledger.peak <= quantized + block_full
    assert ledger.peak < full / 2
