"""network_kwargs filters as upstream's users write them: with the component prefix, without it,
or in kohya's form, they select the same modules; an only_if_contains entry that matches nothing
stops with the closest names, an ignore_if_contains entry that matches nothing warns."""

from __future__ import annotations

import pytest
import torch

from conftest import base_process, deep_update, write_job  # noqa: E402


@pytest.fixture(scope="module")
def sd_adapter(tiny_sd15):
    from aitk.config.schema import ModelConfig
    from aitk.models.registry import create_adapter

    def fresh():
        adapter = create_adapter(ModelConfig(name_or_path=str(tiny_sd15)), torch.device("cpu"), torch.float32)
        adapter.load()
        return adapter

    return fresh


def wrapped(adapter, **kwargs) -> list[str]:
    from aitk.config.schema import NetworkConfig
    from aitk.networks.build import build_expert_networks

    net_cfg = NetworkConfig(type="lora", linear=4, linear_alpha=4, network_kwargs=kwargs)
    warnings: list[str] = []
    networks = build_expert_networks(adapter, net_cfg, seed=0, warn=warnings.append)
    (handle,) = networks.values()
    return sorted(handle.wrapped_module_names()), warnings


def test_prefixed_unprefixed_and_kohya_filters_select_the_same_modules(sd_adapter):
    forms = [
        ["unet.down_blocks.0.attentions.0"],
        ["down_blocks.0.attentions.0"],
        ["lora_unet_down_blocks_0_attentions_0"],
    ]
    selections = [wrapped(sd_adapter(), only_if_contains=f)[0] for f in forms]
    assert selections[0] and all(s == selections[0] for s in selections)
    assert all(name.startswith("down_blocks.0.attentions.0.") for name in selections[0])
    everything = wrapped(sd_adapter())[0]
    ignored = [wrapped(sd_adapter(), ignore_if_contains=f)[0] for f in forms]
    assert all(s == sorted(set(everything) - set(selections[0])) for s in ignored)


def test_a_filter_matching_nothing_stops_with_the_closest_names(sd_adapter):
    with pytest.raises(ValueError) as info:
        wrapped(sd_adapter(), only_if_contains=["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn9"])
    message = str(info.value)
    assert "only_if_contains: no module matches" in message and "closest:" in message
    assert "transformer_blocks.0.attn1" in message or "transformer_blocks.0.attn2" in message


def test_an_ignore_matching_nothing_warns_and_ignores_nothing(sd_adapter):
    names, warnings = wrapped(sd_adapter(), ignore_if_contains=["unet.no_such_block"])
    assert names == wrapped(sd_adapter())[0]
    assert len(warnings) == 1 and "'unet.no_such_block' matches no module" in warnings[0]


def test_flux_filters_written_as_upstream_writes_them(tmp_path_factory):
    from aitk.config.schema import ModelConfig
    from aitk.models.registry import create_adapter
    from aitk.models.flux import build_tiny_flux

    folder = build_tiny_flux(tmp_path_factory.mktemp("flux") / "flux", "dev")

    def adapter():
        a = create_adapter(ModelConfig(name_or_path=str(folder), arch="flux"), torch.device("cpu"), torch.float32)
        a.load()
        return a

    upstream = wrapped(adapter(), only_if_contains=["transformer.single_transformer_blocks.0.proj_out"])[0]
    bare = wrapped(adapter(), only_if_contains=["single_transformer_blocks.0.proj_out"])[0]
    assert upstream == bare == ["single_transformer_blocks.0.proj_out"]


def test_a_run_whose_filter_matches_nothing_stops_before_training(tiny_sd15, shapes_dataset, tmp_path):
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer, TrainingAborted

    process = deep_update(base_process(tiny_sd15, shapes_dataset, tmp_path / "out"), {
        "network": {"network_kwargs": {"only_if_contains": ["unet.up_blocks.9"]}},
        "train": {"steps": 2},
    })
    job = write_job(tmp_path / "job.yaml", "job", process)
    loaded = load_job_file(job)
    trainer = Trainer(loaded.job, loaded.job.config.process[0])
    with pytest.raises(TrainingAborted, match="closest"):
        trainer.run()
    status = (trainer.paths.status).read_text()
    assert '"error"' in status and "unet.up_blocks.9" in status
    assert not trainer.paths.checkpoints.exists() or not any(trainer.paths.checkpoints.iterdir())
