"""FSDP2 full fine-tunes with two CPU processes (gloo), launched as users launch them.

tests/fsdp_worker.py pins the global batch (data and noise), so 2 processes x batch 1 must train
exactly like 1 process x batch 2: what differs is only what FSDP does (sharded weights and
optimizer state, reduce-scattered gradients, gathered saves).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_process, write_job

REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / "tests" / "fsdp_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
STEPS = 6
STOP_ASKED_AT = 2  # with several processes a stop lands at the next step's all-reduce: step 3

# what `accelerate config` writes for FSDP2 (use_cpu: this machine has no GPU)
ACCELERATE_FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: 'no'
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_reshard_after_forward: true
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_cpu_ram_efficient_loading: false
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    return env | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _launch(command: list[str]) -> str:
    proc = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _job(model: Path, data: Path, root: Path, name: str, batch: int, **train) -> Path:
    process = base_process(model, data, root / "out")
    del process["network"]  # a full fine-tune
    process["train"].update({
        "steps": STEPS, "batch_size": batch, "lr": 1e-4, "lr_scheduler": "constant", "max_grad_norm": 1.0,
        "gradient_accumulation": 2, "ema_config": {"use_ema": True, "ema_decay": 0.9}, **train,
    })
    process["save"].update({"save_every": 4, "single_file": True})
    process["sample"] = {"sample_every": 3, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 1.0,
                         "prompts": ["a red square"]}
    return write_job(root / f"{name}.yaml", name, process)


def _run_dir(root: Path, name: str) -> Path:
    return root / "out" / name


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / f"metrics_{run_dir.name}.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / f"{run_dir.name}.safetensors"))  # the final model, EMA weights


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def straight_runs(tiny_sd15: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process x batch 2, and two FSDP processes x batch 1 launched by `accelerate launch`
    with an FSDP config file (the job file does not mention FSDP)."""
    root = tmp_path_factory.mktemp("fsdp")
    _launch([sys.executable, WORKER, str(_job(tiny_sd15, shapes_dataset, root, "single", 2)), str(root / "single")])
    config = root / "accelerate_fsdp.yaml"
    config.write_text(ACCELERATE_FSDP_CONFIG)
    job = _job(tiny_sd15, shapes_dataset, root, "fsdp", 1)
    _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), WORKER, str(job),
             str(root / "fsdp")])
    return root


@pytest.mark.slow
def test_two_fsdp_processes_train_like_one_process(straight_runs: Path, tiny_sd15: Path) -> None:
    root = straight_runs
    single, fsdp = _run_dir(root, "single"), _run_dir(root, "fsdp")
    assert "FSDP2 (accelerate config): sharded checkpoints" in (fsdp / "log.txt").read_text()
    assert "2 processes" in (fsdp / "log.txt").read_text()
    ranks = [json.loads((root / "fsdp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    total = ranks[0]["param_numel"]
    for rank in ranks:
        # each process holds half of the weights, and of the optimizer state (Adam: 2 per weight)
        assert rank["sharded"] and abs(rank["param_local_numel"] - total / 2) < 0.01 * total
        assert rank["optimizer_local_numel"] == 2 * rank["param_local_numel"]
    assert sum(r["param_local_numel"] for r in ranks) == total

    loss_single, loss_fsdp = _losses(single), _losses(fsdp)
    assert len(loss_single) == len(loss_fsdp) == STEPS
    assert max(abs(a - b) for a, b in zip(loss_single, loss_fsdp)) < 1e-5
    weights_single, weights_fsdp = _weights(single), _weights(fsdp)
    assert _max_diff(weights_single, weights_fsdp) < 1e-5
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").state_dict()
    assert _max_diff(base, weights_fsdp) > 1e-4  # it trained: the equality above is not trivial

    # the gathered model folder is the diffusers folder a one-process full fine-tune writes
    reloaded = UNet2DConditionModel.from_pretrained(fsdp / "fsdp").state_dict()
    assert all(torch.equal(reloaded[k], weights_fsdp[k]) for k in weights_fsdp)
    assert sorted(p.name for p in (fsdp / "samples").iterdir()) == sorted(p.name for p in (single / "samples").iterdir())
    assert not (fsdp / "checkpoints" / "000000004" / "network.safetensors").exists()  # sharded: nothing gathered
    assert (fsdp / "checkpoints" / "000000004" / "sharded" / ".metadata").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "sharded"])
def test_stopped_and_resumed_fsdp_run_equals_the_straight_run(
    kind: str, straight_runs: Path, tiny_sd15: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    from aitk.trainer.checkpoint import verify_checkpoint

    job = _job(tiny_sd15, shapes_dataset, tmp_path, f"resumed_{kind}", 1, fsdp=True, fsdp_state_dict_type=kind)
    _launch([*TORCHRUN, WORKER, str(job), str(tmp_path / "first"), str(STOP_ASKED_AT)])
    assert json.loads((tmp_path / "first" / "rank0.json").read_text())["state"] == "stopped"
    run_dir = _run_dir(tmp_path, f"resumed_{kind}")
    checkpoint = run_dir / "checkpoints" / "000000003"
    assert verify_checkpoint(checkpoint) is None  # manifest written last, every sha256 matches
    assert json.loads((checkpoint / "fsdp.json").read_text())["kind"] == kind
    if kind == "full":
        assert (checkpoint / "network.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    else:
        shards = sorted(p.name for p in (checkpoint / "sharded").iterdir())
        assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]

    _launch([*TORCHRUN, WORKER, str(job), str(tmp_path / "second")])
    assert "resuming from" in (run_dir / "log.txt").read_text()
    straight = _run_dir(straight_runs, "fsdp")
    assert _losses(run_dir) == _losses(straight)
    resumed, expected = _weights(run_dir), _weights(straight)
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_fsdp_refuses_what_it_cannot_shard(make_job, monkeypatch: pytest.MonkeyPatch) -> None:
    from aitk.config.loader import load_job_file
    from aitk.config.support import unsupported_failures
    from aitk.trainer.errors import TrainingAborted
    from aitk.trainer.loop import Trainer

    def start(job: Path) -> str:
        loaded = load_job_file(job)
        with pytest.raises(TrainingAborted) as caught:
            Trainer(loaded.job, loaded.job.config.process[0]).run()
        return str(caught.value)

    lora = make_job("fsdp_lora", train={"fsdp": True})
    failures = unsupported_failures(load_job_file(lora).job)
    assert any("train.fsdp: FSDP with a network: section" in f for f in failures)  # aitk validate says it
    assert "train.fsdp: FSDP with a network: section" in start(lora)  # and the run stops at start

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch with an FSDP config
    assert "FSDP shards full fine-tunes only" in start(make_job("fsdp_launched_lora"))
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert "set fsdp_version: 2" in start(make_job("fsdp_v1", network=None))
    monkeypatch.setenv("FSDP_VERSION", "2")
    message = start(make_job("fsdp_8bit", network=None, train={"optimizer": "adamw8bit"}))
    assert "train.optimizer: adamw8bit" in message and "adamw, adam, sgd" in message


def test_shard_units_are_the_adapters_blocks_or_the_named_classes() -> None:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from aitk.models.flux import FluxAdapter
    from aitk.models.sd import SD15Adapter
    from aitk.trainer.errors import TrainingAborted
    from aitk.trainer.fsdp import shard_units

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=2, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    sd = SD15Adapter.__new__(SD15Adapter)
    sd.unet = unet
    assert shard_units(unet, sd.offload_blocks(unet)) == [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    flux = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=3, attention_head_dim=4,
        num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8, axes_dims_rope=(2, 2, 0),
    )
    flux_blocks = FluxAdapter.__new__(FluxAdapter).offload_blocks(flux)
    assert shard_units(flux, flux_blocks) == [*flux.transformer_blocks, *flux.single_transformer_blocks]
    resnets = shard_units(unet, [], ("ResnetBlock2D",))  # accelerate's fsdp_transformer_layer_cls_to_wrap
    assert resnets and all(type(m).__name__ == "ResnetBlock2D" for m in resnets)
    with pytest.raises(TrainingAborted, match="NoSuchBlock is not a module class"):
        shard_units(unet, [], ("NoSuchBlock",))


@pytest.mark.slow
def test_fsdp_tiny_flux_two_processes_train_like_one_process(shapes_dataset: Path, tmp_path: Path) -> None:
    """FLUX: double and single transformer blocks are the units (torchrun, train.fsdp: true)."""
    from aitk.models.flux import build_tiny_flux

    model = build_tiny_flux(tmp_path / "tiny-flux", "dev")

    def job(name: str, batch: int, **train) -> Path:
        process = base_process(model, shapes_dataset, tmp_path / "out")
        del process["network"]
        process["model"]["arch"] = "flux"
        process["train"].update({"steps": 3, "batch_size": batch, "lr": 1e-4, "lr_scheduler": "constant", **train})
        process["save"].update({"save_every": 3, "single_file": True})
        return write_job(tmp_path / f"{name}.yaml", name, process)

    _launch([sys.executable, WORKER, str(job("flux_single", 2)), str(tmp_path / "single")])
    _launch([*TORCHRUN, WORKER, str(job("flux_fsdp", 1, fsdp=True)), str(tmp_path / "fsdp")])
    single, fsdp = _run_dir(tmp_path, "flux_single"), _run_dir(tmp_path, "flux_fsdp")
    assert "units main: 2 blocks + root" in (fsdp / "log.txt").read_text()
    assert max(abs(a - b) for a, b in zip(_losses(single), _losses(fsdp))) < 1e-5
    assert _max_diff(_weights(single), _weights(fsdp)) < 1e-5
