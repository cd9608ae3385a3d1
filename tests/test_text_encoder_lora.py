"""train.train_text_encoder: a LoRA on SD 1.5's CLIP and SDXL's two CLIPs, trained at
train.text_encoder_lr, saved with kohya's lora_te_ / lora_te1_ / lora_te2_ names beside the UNet's,
loaded by diffusers exactly, resumed exactly, refused by `aitk validate` where it cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import base_process, build_tiny_model, deep_update, write_job  # noqa: E402
from interop_results import record

LR, TE_LR = 1e-3, 5e-3
VARIANTS = {"sd1": "sd15", "sdxl": "sdxl"}
CLIP_MODULES = ("self_attn_k_proj", "self_attn_v_proj", "self_attn_q_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
TINY_CLIP_LAYERS = 2


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("te-models")
    return {arch: build_tiny_model(variant, root) for arch, variant in VARIANTS.items()}


def te_process(model: Path, data: Path, out: Path, arch: str, **changes) -> dict:
    process = deep_update(base_process(model, data, out), {
        "model": {"arch": arch},
        "train": {"steps": 4, "lr": LR, "train_text_encoder": True, "text_encoder_lr": TE_LR},
    })
    return deep_update(process, changes)


def run(tmp_path: Path, name: str, process: dict, **kwargs):
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    loaded = load_job_file(write_job(tmp_path / f"{name}.yaml", name, process))
    trainer = Trainer(loaded.job, loaded.job.config.process[0], **kwargs)
    return trainer, trainer.run()


@pytest.fixture(scope="module", params=list(VARIANTS))
def trained(request, models, shapes_dataset, tmp_path_factory):
    """(arch, model folder, trainer, result) of 4 steps with the text encoders training."""
    arch = request.param
    tmp = tmp_path_factory.mktemp(f"te-{arch}")
    process = te_process(models[arch], shapes_dataset, tmp / "out", arch, sample={
        "sample_every": 1000, "prompts": ["a red square [trigger]"], "sample_steps": 2, "width": 64, "height": 64,
    })
    trainer, result = run(tmp, f"te_{arch}", process)
    assert result.state == "completed" and result.step == 4
    return arch, models[arch], trainer, result


def lora_up_is_zero(handle) -> dict[str, bool]:
    return {n: bool(torch.all(p == 0)) for n, p in handle.named_trainable_parameters().items() if "lora_B" in n}


# --- training ---------------------------------------------------------------------------------
def test_text_encoder_loras_train_at_text_encoder_lr(trained):
    arch, _, trainer, result = trained
    network = trainer.network
    assert list(network.text_encoders) == (["text_encoder"] if arch == "sd1" else ["text_encoder", "text_encoder_2"])
    # their own param group, at train.text_encoder_lr; the UNet's at train.lr
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2 and groups[0]["lr"] == LR and groups[1]["lr"] == TE_LR
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in network.text_encoder_parameters()}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in network.trainable_parameters("main")}
    metrics = [json.loads(line) for line in (result.output_dir / f"metrics_te_{arch}.jsonl").read_text().splitlines()]
    assert [m["lr_1"] for m in metrics] == [TE_LR] * 4 and [m["lr_0"] for m in metrics] == [LR] * 4
    for name, handle in network.text_encoders.items():
        zero = lora_up_is_zero(handle)
        assert len(zero) == TINY_CLIP_LAYERS * len(CLIP_MODULES)
        # SDXL conditions on text_encoder's penultimate layer: its last layer gets no gradient
        dead = {n for n in zero if arch == "sdxl" and name == "text_encoder" and f"layers.{TINY_CLIP_LAYERS - 1}." in n}
        assert {n for n, z in zero.items() if z} == dead, name
    # trained encoders are in eval mode outside a training step (previews), and the previews'
    # pipeline runs the very encoders that train
    pipe = trainer.adapter.sample_pipeline()
    for name in network.text_encoders:
        encoder = trainer.adapter.text_encoders()[name]
        assert not encoder.training and getattr(pipe, name) is encoder
    assert trainer.conditioner(["a red square shp"]).hidden_states.requires_grad
    assert (result.output_dir / "samples").is_dir()


# --- the saved file ---------------------------------------------------------------------------
def expected_text_encoder_stems(arch: str) -> set[str]:
    prefixes = ["lora_te"] if arch == "sd1" else ["lora_te1", "lora_te2"]
    return {
        f"{prefix}_text_model_encoder_layers_{i}_{module}"
        for prefix in prefixes for i in range(TINY_CLIP_LAYERS) for module in CLIP_MODULES
    }


def test_saved_file_has_kohya_text_encoder_keys_beside_the_unet(trained):
    arch, _, trainer, result = trained
    tensors = load_file(str(result.final_lora))
    stems: dict[str, set[str]] = {}
    for key in tensors:
        stem, _, suffix = key.partition(".")
        stems.setdefault(stem, set()).add(suffix)
    te_stems = {s for s in stems if s.startswith("lora_te")}
    assert te_stems == expected_text_encoder_stems(arch)
    assert all(stems[s] == {"lora_down.weight", "lora_up.weight", "alpha"} for s in stems)
    assert len(stems) - len(te_stems) == len(trainer.network.first.wrapped_module_names())  # lora_unet_*
    assert all(float(tensors[f"{s}.alpha"]) == 4.0 for s in te_stems)
    with safe_open(str(result.final_lora), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert float(meta["ss_text_encoder_lr"]) == TE_LR and meta["ss_network_train_unet_only"] == "False"


@pytest.mark.parametrize("layout", ["comfyui", "diffusers"])
def test_diffusers_loads_the_file_and_matches_the_trainer(trained, layout, tmp_path):
    """diffusers' load_lora_weights, then its text encoders' outputs and its UNet's noise
    prediction for a fixed input equal the trainer's with the LoRA applied."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from aitk.networks.export import save_lora
    from aitk.networks.text_encoders import text_encoder_namings

    arch, model, trainer, result = trained
    path = result.final_lora
    if layout == "diffusers":
        namings = text_encoder_namings(trainer.adapter)
        path = save_lora(
            tmp_path / "peft.safetensors", trainer.network.first, save_format="diffusers", dtype=torch.float32,
            text_encoders=[(h, namings[n]) for n, h in trainer.network.text_encoders.items()],
        )
        assert any(k.startswith("text_encoder.") for k in load_file(str(path)))
    pipe = (StableDiffusionPipeline if arch == "sd1" else StableDiffusionXLPipeline).from_pretrained(str(model))
    ids = pipe.tokenizer(["a red square shp"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    adapter = trainer.adapter
    generator = torch.Generator().manual_seed(0)
    latents, timesteps = torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([500])
    hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    extra = {}
    if arch == "sdxl":
        pooled = pipe.unet.config.projection_class_embeddings_input_dim - 6 * pipe.unet.config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    adapter.unet.eval()
    try:
        with torch.no_grad():
            base = pipe.text_encoder(ids)[0]
            pipe.load_lora_weights(str(path))
            ours = [adapter.text_encoder(ids)[0], adapter.unet(latents, timesteps, encoder_hidden_states=hidden, **extra).sample]
            theirs = [pipe.text_encoder(ids)[0], pipe.unet(latents, timesteps, encoder_hidden_states=hidden, **extra).sample]
            if arch == "sdxl":
                mine, other = adapter.text_encoder_2(ids, output_hidden_states=True), pipe.text_encoder_2(ids, output_hidden_states=True)
                ours += [mine.hidden_states[-2], mine.text_embeds]
                theirs += [other.hidden_states[-2], other.text_embeds]
    finally:
        adapter.unet.train()
    assert (ours[0] - base).abs().max() > 1e-3  # the text-encoder LoRA changes the output: the check can fail
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
    record(arch, "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout=layout, note="with text encoders")
    assert diff < 1e-4


# --- resume and continuing ----------------------------------------------------------------------
def test_resume_continues_with_the_same_text_encoder_weights(models, shapes_dataset, tmp_path):
    process = te_process(models["sd1"], shapes_dataset, tmp_path / "out", "sd1", train={"steps": 6}, save={"save_every": 3})
    _, straight = run(tmp_path, "straight", process)

    def stop_at_3(trainer, step: int) -> None:
        if step == 3:
            trainer.stop.request("test")

    first, stopped = run(tmp_path, "resumed", process, on_step_end=stop_at_3)
    assert stopped.state == "stopped" and stopped.step == 3
    at_stop = {k: v.clone() for k, v in first.network.network_state_dict().items() if k.startswith("text_encoder/")}
    checkpoint = stopped.output_dir / "checkpoints" / "000000003"
    saved = load_file(str(checkpoint / "network.safetensors"))
    assert at_stop and all(torch.equal(saved[k], v) for k, v in at_stop.items())
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    assert [g["lr"] for g in optimizer_state["param_groups"]] == [LR, TE_LR]
    assert len(optimizer_state["state"]) == len(first.params)  # Adam moments of the text encoder's LoRA too

    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    loaded = load_job_file(tmp_path / "resumed.yaml")
    resuming = Trainer(loaded.job, loaded.job.config.process[0])
    resuming._setup()
    try:
        assert resuming._resume() and resuming.state.step == 3
        state = resuming.network.network_state_dict()
        assert all(torch.equal(state[k], v) for k, v in at_stop.items())
    finally:
        resuming.data.close()
        resuming.log.close()

    _, finished = run(tmp_path, "resumed", process)
    assert finished.state == "completed" and finished.step == 6
    a = load_file(str(straight.output_dir / "checkpoints" / "000000006" / "network.safetensors"))
    b = load_file(str(finished.output_dir / "checkpoints" / "000000006" / "network.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("text_encoder/") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_pretrained_lora_starts_the_text_encoder_networks(trained, tmp_path, shapes_dataset):
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    arch, model, trainer, result = trained
    process = te_process(model, shapes_dataset, tmp_path / "out", arch,
                         network={"pretrained_lora_path": str(result.final_lora)})
    loaded = load_job_file(write_job(tmp_path / "cont.yaml", "cont", process))
    fresh = Trainer(loaded.job, loaded.job.config.process[0])
    fresh._setup()
    try:
        before = trainer.network.network_state_dict()
        after = fresh.network.network_state_dict()
        assert before.keys() == after.keys() and any(k.startswith("text_encoder") for k in after)
        for key in before:
            assert torch.equal(before[key], after[key]), key
    finally:
        fresh.data.close()
        fresh.log.close()


# --- what cannot train a text encoder -----------------------------------------------------------
@pytest.mark.parametrize("case, changes, says", [
    ("cache", {"train": {"cache_text_embeddings": True}}, "cache_text_embeddings"),
    ("dataset_cache", {"datasets": [{"cache_text_embeddings": True}]}, "cache_text_embeddings"),
    ("unload", {"train": {"unload_text_encoder": True}}, "unload_text_encoder"),
    ("flux", {"model": {"arch": "flux"}}, "this model family"),
    ("wan", {"model": {"arch": "wan21"}}, "this model family"),
    ("lokr", {"network": {"type": "lokr"}}, "no LoRA"),
    ("full", {"network": None}, "no LoRA"),
])
def test_validate_refuses_what_cannot_train_the_text_encoder(case, changes, says, tmp_path, capsys):
    from aitk.config.validate import validate_command

    process = te_process(tmp_path / "model", tmp_path / "data", tmp_path / "out", "sd1")
    if "datasets" in changes:
        process["datasets"][0].update(changes["datasets"][0])
    elif "network" in changes and changes["network"] is None:
        del process["network"]
    else:
        process = deep_update(process, changes)
    assert validate_command([str(write_job(tmp_path / f"{case}.yaml", case, process))]) == 1
    err = capsys.readouterr().err
    assert "train.train_text_encoder:" in err and says in err and "fails at start" in err, err


def test_validate_accepts_sd_and_sdxl_text_encoder_training(tmp_path, capsys):
    from aitk.config.validate import validate_command

    for arch in ("sd1", "sdxl"):
        process = te_process(tmp_path / "model", tmp_path / "data", tmp_path / "out", arch, network={"type": "locon"})
        assert validate_command([str(write_job(tmp_path / f"{arch}.yaml", arch, process))]) == 0
        out = capsys.readouterr()
        assert "train_text_encoder" not in out.out + out.err


def test_support_table_names_the_adapters_that_train_text_encoders():
    from aitk.config.support import TEXT_ENCODER_LORA_ARCHS, TEXT_ENCODER_NETWORK_TYPES
    from aitk.models.archs import ADAPTERS
    from aitk.models.registry import adapter_class
    from aitk.networks import text_encoders

    assert TEXT_ENCODER_NETWORK_TYPES == text_encoders.TEXT_ENCODER_NETWORK_TYPES
    assert {arch for arch in ADAPTERS if adapter_class(arch).text_encoder_lora_prefixes} == TEXT_ENCODER_LORA_ARCHS


# --- network settings on the text encoders ------------------------------------------------------
@pytest.fixture
def sd_adapter(models):
    from aitk.config.schema import ModelConfig
    from aitk.models.registry import create_adapter

    adapter = create_adapter(ModelConfig(name_or_path=str(models["sd1"])), torch.device("cpu"), torch.float32)
    adapter.load()
    return adapter


def te_modules(adapter, **network) -> tuple[str, list[str]]:
    from aitk.config.schema import NetworkConfig
    from aitk.networks.text_encoders import build_text_encoder_networks

    net_cfg = NetworkConfig(**{"type": "lora", "linear": 4, "linear_alpha": 2, **network})
    (handle,) = build_text_encoder_networks(adapter, net_cfg, seed=0).values()
    assert all(a == 2.0 for a in handle.module_alphas().values()) and handle.linear_rank == 4
    return handle.algo, handle.wrapped_module_names()


def test_network_kwargs_filters_apply_to_text_encoder_names(sd_adapter):
    _, names = te_modules(sd_adapter, network_kwargs={"only_if_contains": ["attn"]})
    assert len(names) == TINY_CLIP_LAYERS * 4 and all(".self_attn." in n for n in names)


def test_kohya_names_in_ignore_if_contains_drop_text_encoder_modules(sd_adapter):
    _, names = te_modules(sd_adapter, network_kwargs={"ignore_if_contains": ["lora_te_text_model_encoder_layers_1_"]})
    layer0 = ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]
    assert names == [f"encoder.layers.0.{m}" for m in layer0]


def test_filters_that_leave_no_text_encoder_module_stop_with_the_keys(sd_adapter):
    with pytest.raises(ValueError, match="train_text_encoder.*only_if_contains"):
        te_modules(sd_adapter, network_kwargs={"only_if_contains": ["to_q"]})


def test_dora_text_encoder_network(sd_adapter):
    algo, names = te_modules(sd_adapter, type="dora")
    assert algo == "dora" and len(names) == TINY_CLIP_LAYERS * len(CLIP_MODULES)


def test_alpha_schedule_leaves_the_text_encoder_alpha(models, shapes_dataset, tmp_path):
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    process = te_process(models["sd1"], shapes_dataset, tmp_path / "out", "sd1", network={
        "alpha_schedule": {"enabled": True, "alpha_phases": {"low": {"alpha": 2, "min_steps": 10}, "full": {"alpha": 4}}},
    })
    loaded = load_job_file(write_job(tmp_path / "alpha.yaml", "alpha", process))
    trainer = Trainer(loaded.job, loaded.job.config.process[0])
    trainer._setup()
    try:
        assert set(trainer.network.first.module_alphas().values()) == {2.0}
        assert set(trainer.network.text_encoders["text_encoder"].module_alphas().values()) == {4.0}
    finally:
        trainer.data.close()
        trainer.log.close()
