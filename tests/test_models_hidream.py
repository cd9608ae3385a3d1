"""HiDream-I1 on the tiny random-init model of the real classes: the pipeline's four-encoder text
encoding (T5, every Llama layer's hidden states, both CLIPs pooled), the transformer's velocity in
eval and training mode (the MoE's differentiable routing returns the patches unfolded), the
flow-matching objective with ai-toolkit's fixed shift, where the Llama comes from, and runs whose
files load in diffusers exactly (LoRA, DoRA), LoKr, a quantized base, and the tools.

Everything runs offline on CPU in fp32 with 64 px images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from aitk.config.schema import ModelConfig, TrainConfig
from aitk.models.base import ModelLoadError, NoisyBatch, PromptEmbeds
from aitk.models.flow_matching import FlowMatchingConfigError, time_shift
from aitk.models.hidream import TRAIN_SHIFT, HiDreamAdapter, HiDreamInputError, build_tiny_hidream
import family_checks as family
from interop_results import record
from upstream_jobs import extras_on_path  # noqa: F401 - autouse fixture: torchao for model.quantize

CPU = torch.device("cpu")
#: upstream's example and UI preset: no LoRA on the routed experts or the gate
UPSTREAM_IGNORE = ["ff_i.experts", "ff_i.gate"]


@pytest.fixture(scope="session")
def hidream_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hidream(tmp_path_factory.mktemp("hidream-model") / "tiny-hidream")


def make_adapter(folder: Path | str, **model_fields: Any) -> HiDreamAdapter:
    adapter = HiDreamAdapter(ModelConfig(name_or_path=str(folder), arch="hidream", **model_fields), CPU, torch.float32)
    adapter.load()
    return adapter


@pytest.fixture(scope="session")
def hidream(hidream_model: Path) -> HiDreamAdapter:
    return make_adapter(hidream_model)


# --- the model ---------------------------------------------------------------------------------


def test_tiny_model_loads_as_the_real_pipeline(hidream_model: Path) -> None:
    from diffusers import HiDreamImagePipeline

    size = sum(p.stat().st_size for p in hidream_model.rglob("*") if p.is_file())
    assert size < 10 * 2**20, size
    pipe = HiDreamImagePipeline.from_pretrained(hidream_model)
    assert type(pipe.text_encoder_4).__name__ == "LlamaForCausalLM"
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler" and pipe.scheduler.config.use_flow_sigmas
    assert build_tiny_hidream(hidream_model) == hidream_model  # kept, not rebuilt


def test_load_facts(hidream: HiDreamAdapter) -> None:
    for module in (hidream.transformer, hidream.vae, *hidream.text_encoders().values()):
        assert not any(p.requires_grad for p in module.parameters())
    assert len(hidream.text_encoders()) == 4 and hidream.max_sequence_length == 32  # the tiny tokenizers' cap
    assert HiDreamAdapter.bucket_divisibility == 16 and hidream.max_seq == 16
    names = hidream.network_candidates(False)
    t = hidream.transformer
    assert names and all(n.startswith(("double_stream_blocks.", "single_stream_blocks.")) for n in names)
    assert "double_stream_blocks.0.block.ff_i.experts.3.w2" in names  # upstream's default: every block Linear
    assert "double_stream_blocks.0.block.attn1.to_q_t" in names and "caption_projection.0.linear" not in names
    assert hidream.offload_blocks(t) == [b.block for b in (*t.double_stream_blocks, *t.single_stream_blocks)]


def test_lora_key_names_are_comfyuis(hidream: HiDreamAdapter) -> None:
    """ComfyUI's HiDream module paths are diffusers' (single-file checkpoints load unrenamed), and
    its loader maps `diffusion_model.<path>` for every weight."""
    names = hidream.network_candidates(False)
    assert [hidream.lora_key_stem(n) for n in names] == [f"diffusion_model.{n}" for n in names]


def test_encode_prompts_is_the_pipeline_encoding(hidream: HiDreamAdapter, hidream_model: Path) -> None:
    from diffusers import HiDreamImagePipeline

    cond = PromptEmbeds.cat([hidream.encode_prompts(["a red circle"]), hidream.encode_prompts(["a blue square"])])
    assert cond.hidden_states.shape == (2, 32, 40)  # T5
    assert cond.extra["llama"].shape == (2, 2, 32, 24)  # every Llama layer's hidden states
    assert cond.extra["pooled"].shape == (2, 32 + 48)  # CLIP-L and CLIP-G pooled, joined
    pipe = HiDreamImagePipeline.from_pretrained(hidream_model)
    t5, _, llama, _, pooled, _ = pipe.encode_prompt(
        "a blue square", do_classifier_free_guidance=False, max_sequence_length=32)
    torch.testing.assert_close(cond.hidden_states[1], t5[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(cond.extra["pooled"][1], pooled[0]) and torch.equal(cond.extra["llama"][1], llama[:, 0])
    ids = pipe.tokenizer_4(["a blue square"], padding="max_length", max_length=32, return_tensors="pt")
    states = pipe.text_encoder_4(**ids, output_hidden_states=True).hidden_states
    assert len(states) == 3 and torch.equal(cond.extra["llama"][1, 1], states[2][0])  # embeddings left out


# --- the objective -----------------------------------------------------------------------------


def test_noisy_batch_is_rectified_flow_with_the_fixed_shift(hidream: HiDreamAdapter) -> None:
    latents = hidream.encode_images(family.pixels(1))
    assert latents.shape == (2, 16, 8, 8)
    a = hidream.make_noisy_batch(latents, TrainConfig(timestep_type="shift"), torch.Generator().manual_seed(5))
    s = (a.timesteps / 1000).view(-1, 1, 1, 1)
    noise = (a.noisy_latents - (1 - s) * latents) / s
    torch.testing.assert_close(a.target, noise - latents, rtol=1e-4, atol=1e-4)
    u = torch.rand(2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(a.timesteps / 1000, time_shift(u, math.log(TRAIN_SHIFT)).float())
    with pytest.raises(FlowMatchingConfigError, match="train.min_snr_gamma"):
        hidream.make_noisy_batch(latents, TrainConfig(min_snr_gamma=5.0), None)
    with pytest.raises(HiDreamInputError, match="bypass_guidance_embedding"):
        hidream.make_noisy_batch(latents, TrainConfig(bypass_guidance_embedding=True), None)
    with pytest.raises(HiDreamInputError, match="divisible"):
        hidream.make_noisy_batch(torch.zeros(1, 16, 7, 8), TrainConfig(), None)
    with pytest.raises(HiDreamInputError, match="at most 16 patches"):  # 10x8 latents: 20 patches
        hidream.make_noisy_batch(torch.zeros(1, 16, 10, 8), TrainConfig(), None)


def test_predict_is_the_velocity_the_pipeline_steps_with(hidream: HiDreamAdapter) -> None:
    seen: dict[str, Any] = {}

    def hook(_module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        seen.update(kwargs, out=output[0])

    handle = hidream.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe = hidream.sample_pipeline()
        pipe.set_progress_bar_config(disable=True)
        pipe(prompt="a red circle", height=64, width=64, num_inference_steps=1, guidance_scale=1.0,
             max_sequence_length=32, output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    cond = hidream.encode_prompts(["a red circle"])
    assert torch.equal(seen["encoder_hidden_states_llama3"], cond.extra["llama"].transpose(0, 1))
    x = seen["hidden_states"]
    assert x.shape == (1, 16, 8, 8)  # the preview area is the transformer's max_resolution: 64 px here
    batch = NoisyBatch(x, seen["timesteps"].float(), torch.zeros_like(x))
    with torch.no_grad():
        pred = hidream.predict(batch, cond)
    torch.testing.assert_close(pred, -seen["out"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(64, 64), (48, 64)])
def test_training_mode_predicts_as_eval_mode(hidream: HiDreamAdapter, size: tuple[int, int]) -> None:
    """In training mode diffusers routes the MoE differentiably and returns (B, C, tokens, 4),
    padded to max_seq for non-square latents; `predict` folds it back to the same latents."""
    latents = hidream.encode_images(family.pixels(2, h=size[0], w=size[1]))
    batch = hidream.make_noisy_batch(latents, TrainConfig(), torch.Generator().manual_seed(1))
    cond = PromptEmbeds.cat([hidream.encode_prompts(["a red circle"])] * 2)
    with torch.no_grad():
        evaluated = hidream.predict(batch, cond)
        hidream.transformer.train()
        try:
            raw = hidream.transformer(hidden_states=batch.noisy_latents, timesteps=batch.timesteps,
                                      encoder_hidden_states_t5=cond.hidden_states,
                                      encoder_hidden_states_llama3=cond.extra["llama"].transpose(0, 1),
                                      pooled_embeds=cond.extra["pooled"], return_dict=False)[0]
            trained = hidream.predict(batch, cond)
        finally:
            hidream.transformer.eval()
    assert raw.shape[-1] == 4 and evaluated.shape == latents.shape
    torch.testing.assert_close(trained, evaluated, rtol=1e-5, atol=1e-5)


def test_load_errors_name_the_key(tmp_path: Path, hidream_model: Path) -> None:
    with pytest.raises(ModelLoadError, match="model.name_or_path.*neither"):
        make_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="extras_name_or_path"):
        make_adapter(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="llama_model_path"):
        make_adapter(hidream_model, model_kwargs={"llama_model_path": str(tmp_path / "no-llama")})


def test_llama_from_its_own_folder_and_transformer_only_source(hidream_model: Path, tmp_path: Path) -> None:
    """ai-toolkit's layout: the transformer alone, the other parts from extras_name_or_path and the
    Llama from model_kwargs.llama_model_path (a plain Llama folder, as unsloth's repo)."""
    import shutil

    shutil.copytree(hidream_model / "transformer", tmp_path / "only" / "transformer")
    llama = tmp_path / "llama"
    shutil.copytree(hidream_model / "text_encoder_4", llama)
    for f in (hidream_model / "tokenizer_4").iterdir():
        shutil.copy(f, llama / f.name)
    adapter = make_adapter(tmp_path / "only", extras_name_or_path=str(hidream_model),
                           model_kwargs={"llama_model_path": str(llama)})
    want = make_adapter(hidream_model).encode_prompts(["a red circle"])
    got = adapter.encode_prompts(["a red circle"])
    assert torch.equal(got.extra["llama"], want.extra["llama"]) and str(llama) in adapter.text_encoder_id()


# --- end to end --------------------------------------------------------------------------------


def _job(tmp_path: Path, name: str, model_dir: Path, data: Path, **changes: Any) -> Path:
    return family.write_job(tmp_path, name, model_dir, data, {
        "model": {"arch": "hidream"},
        "train": {"steps": 30, "batch_size": 2, "lr": 5e-3, "timestep_type": "shift", "lr_scheduler": "constant"},
        "network": {"type": "lora", "linear": 8, "linear_alpha": 8,
                    "network_kwargs": {"ignore_if_contains": UPSTREAM_IGNORE}},
        "save": {"save_every": 1000},
        "sample": {"sample_every": 15, "width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 1.0,
                   "prompts": ["a red circle, [trigger] style"], "seed": 5},
    }, changes)


def _render(pipe: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a red circle, shp style", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                max_sequence_length=32, generator=torch.Generator().manual_seed(3), output_type="latent").images


def _tiny_area(pipe: Any) -> None:
    pipe.default_sample_size = 8  # the tiny model's area (the stock pipeline: 1024 px)


def _diffusers_diff(adapter: HiDreamAdapter, model: Path, lora: Path | dict) -> tuple[float, float]:
    from diffusers import HiDreamImagePipeline

    return family.diffusers_lora_diff(adapter, HiDreamImagePipeline, model, lora, _render, _tiny_area)


@pytest.fixture(scope="module")
def lora_run(hidream_model: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("hidream-lora")
    return (*family.train(_job(tmp, "hlora", hidream_model, shapes_dataset)), tmp)


def test_lora_trains_with_falling_loss_previews_and_comfyui_names(lora_run: tuple) -> None:
    trainer, result, _ = lora_run
    family.check_falling_loss_and_previews(result, "hlora")
    wrapped = trainer.network.wrapped_module_names()
    candidates = trainer.adapter.network_candidates(False)
    assert wrapped == [n for n in candidates if ".ff_i.experts." not in n]  # upstream's ignore list
    assert any(".ff_i.shared_experts." in n for n in wrapped)
    family.check_folded_lora_file(trainer, result.final_lora, "hidream-i1/lora", "hidream_i1",
                                  prefix="diffusion_model.", weight_names=("lora_A", "lora_B"), alpha=8.0)


def test_lora_loads_exactly_in_diffusers(lora_run: tuple, hidream_model: Path) -> None:
    """The diffusers layout loads exactly; the ComfyUI layout does without its `.alpha` keys (alpha =
    rank, ai-toolkit's HiDream files) - diffusers' HiDream loader refuses keys without "lora"."""
    from test_tools import aitk

    trainer, result, tmp = lora_run
    converted = family.diffusers_layout_round_trip(result.final_lora, "hidream", tmp)
    original = load_file(str(result.final_lora))
    no_alpha = {k: v for k, v in original.items() if not k.endswith(".alpha")}
    for layout, lora in (("diffusers", converted), ("comfyui", no_alpha)):
        diff, effect = _diffusers_diff(trainer.adapter, hidream_model, lora)
        record("hidream", "lora", "diffusers load_lora_weights", diff < 1e-4, diff, layout=layout,
               note="" if layout == "diffusers" else "without .alpha keys (alpha = rank)")
        assert effect > 1e-3 and diff < 1e-4, (layout, diff, effect)
    assert no_alpha.keys() == original.keys()  # the default file itself: alpha folded into lora_B


def test_merge_round_trip_and_lora_info_know_hidream(lora_run: tuple, hidream_model: Path) -> None:
    from diffusers import HiDreamImageTransformer2DModel

    trainer, result, tmp = lora_run
    assert family.check_lora_info(trainer, result.final_lora, "hidream", tmp)["architecture"] == "hidream"
    adapter = trainer.adapter
    adapter.transformer.eval()
    batch, cond = family.red_circle_inputs(adapter, 2)
    family.check_merge("hidream", adapter, hidream_model, result.final_lora, tmp, HiDreamImageTransformer2DModel,
                       batch, cond)
    family.check_round_trip("hidream", adapter, make_adapter(hidream_model), result.final_lora, "lora", batch=batch,
                            cond=cond, layout="comfyui", linear_rank=8,
                            candidates=trainer.network.wrapped_module_names())


def test_dora_saved_for_diffusers_loads_exactly(hidream_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, "hdora", hidream_model, shapes_dataset, train={"steps": 6},
               network={"dora": True, "linear": 4, "linear_alpha": 8}, save={"save_format": "diffusers"},
               sample={"sample_every": 1000})
    trainer, result = family.train(job)
    family.finite_run(result, "hdora")
    tensors = load_file(str(result.final_lora))
    assert any(k.endswith("lora_magnitude_vector") for k in tensors)
    assert all(k.startswith("transformer.") for k in tensors)
    diff, effect = _diffusers_diff(trainer.adapter, hidream_model, result.final_lora)
    record("hidream", "dora", "diffusers load_lora_weights", diff < 1e-4, diff, layout="diffusers")
    assert effect > 1e-3 and diff < 1e-4, (diff, effect)


def test_lokr_with_cached_text_trains_and_loads_back(hidream_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    """LoKr, the text embeddings cached and the four encoders released: previews render from the
    cached embeddings, and aitk's loader reads the file back exactly."""
    job = _job(tmp_path, "hlokr", hidream_model, shapes_dataset, train={"steps": 6, "cache_text_embeddings": True},
               sample={"sample_every": 6}, network={"type": "lokr", "linear": 2, "linear_alpha": 4, "lokr_factor": -1})
    trainer, result = family.train(job)
    family.finite_run(result, "hlokr")
    assert trainer.adapter.text_encoder_4 is None
    assert sorted(p.name for p in (result.output_dir / "samples").iterdir()) == ["000000000_0.jpg", "000000006_0.jpg"]
    tensors = load_file(str(result.final_lora))
    assert any(k.endswith(".lokr_w1") for k in tensors) and all(k.startswith("diffusion_model.") for k in tensors)
    fresh = make_adapter(hidream_model)
    trainer.adapter.transformer.eval()
    batch, cond = family.red_circle_inputs(fresh, 3)
    family.check_round_trip("hidream", trainer.adapter, fresh, result.final_lora, "lokr", batch=batch, cond=cond,
                            linear_rank=2, candidates=trainer.network.wrapped_module_names())


def test_quantized_base_trains(hidream_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    """Upstream's example quantizes the transformer and the text encoders: qint8 base, a
    full-precision LoRA on top that changes the plain model's output in diffusers."""
    from diffusers import HiDreamImagePipeline

    job = _job(tmp_path, "hq", hidream_model, shapes_dataset, train={"steps": 6}, sample={"sample_every": 1000},
               model={"quantize": True, "qtype": "qint8", "quantize_te": True, "qtype_te": "qint8"},
               save={"save_format": "diffusers"})
    trainer, result = family.train(job)
    family.finite_run(result, "hq")
    layers = [m for m in trainer.network.lora_layers().values() if isinstance(m.base_layer, torch.nn.Linear)]
    assert layers and all("torchao" in type(m.base_layer.weight).__module__ for m in layers)
    plain = HiDreamImagePipeline.from_pretrained(hidream_model)
    _tiny_area(plain)
    before = _render(plain)
    plain.load_lora_weights(str(result.final_lora))
    assert (_render(plain) - before).abs().max() > 1e-4


def test_hidream_e1_is_refused_by_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """diffusers 0.42 has no HiDream-E1 pipeline: `hidream_e1` stops validation, named."""
    import yaml

    from aitk.config.validate import validate_command

    corpus = Path(__file__).parent / "data" / "upstream_corpus" / "hidream_48gb.yaml"
    job = yaml.safe_load(corpus.read_text())
    job["config"]["process"][0]["model"].update(arch="hidream_e1", name_or_path="HiDream-ai/HiDream-E1-1")
    path = tmp_path / "e1.yaml"
    path.write_text(yaml.safe_dump(job))
    assert validate_command([str(path)]) == 1
    err = capsys.readouterr().err
    assert "'hidream_e1' is not supported yet" in err, err


def test_preset_validates_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job, _ = family.check_preset_validates_clean("hidream", tmp_path, capsys)
    assert job["config"]["process"][0]["network"]["network_kwargs"]["ignore_if_contains"] == UPSTREAM_IGNORE
