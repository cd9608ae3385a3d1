"""`aitk merge`, `aitk convert` and `aitk lora info` on files that carry text-encoder LoRA
(train.train_text_encoder), made by a short training run on tiny SD 1.5 and SDXL:

- merge: the merged model's text encoders and UNet (diffusers folder, and single-file checkpoint)
  give what diffusers' load_lora_weights of the file gives on the base model, for the comfyui and
  the diffusers layout, at a strength other than 1;
- convert: comfyui -> diffusers -> comfyui gives back the trainer's tensors, the trainer's diffusers
  file converts to its comfyui file, and diffusers loads each converted file with the original's
  outputs;
- lora info: modules, ranks, alphas and CLIP layers per part (te / te1 / te2).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
# models: that module's tiny SD 1.5 / SDXL fixture, shared rather than rebuilt
from test_text_encoder_lora import CLIP_MODULES, TINY_CLIP_LAYERS, models, run, te_process  # noqa: E402,F401
from test_tools import aitk as run_aitk  # noqa: E402

from interop_results import record  # noqa: E402

RANK, ALPHA, TE_LR = 4, 2, 2e-2  # alpha != rank: a merge that ignored alpha would be off
STRENGTH = 0.7
TOLERANCE = 1e-4
TE_PARTS = {"sd1": {"lora_te": "te"}, "sdxl": {"lora_te1": "te1", "lora_te2": "te2"}}
PEFT_PARTS = {"sd1": {"text_encoder": "te"}, "sdxl": {"text_encoder": "te1", "text_encoder_2": "te2"}}
CLIP_TARGETS = {m.removeprefix("self_attn_").removeprefix("mlp_") for m in CLIP_MODULES}


@dataclass
class TrainedFiles:
    arch: str
    model: Path
    comfyui: Path  # what the run saved (save_format comfyui, float32)
    diffusers: Path  # the same networks in the diffusers layout (save_format diffusers)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def trained(request, models, shapes_dataset, tmp_path_factory) -> TrainedFiles:
    from aitk.networks.export import save_lora
    from aitk.networks.text_encoders import text_encoder_namings

    arch = request.param
    tmp = tmp_path_factory.mktemp(f"te-tools-{arch}")
    process = te_process(models[arch], shapes_dataset, tmp / "out", arch,
                         network={"linear": RANK, "linear_alpha": ALPHA}, train={"text_encoder_lr": TE_LR})
    trainer, result = run(tmp, f"te_tools_{arch}", process)
    assert result.state == "completed"
    namings = text_encoder_namings(trainer.adapter)
    peft = save_lora(
        tmp / "peft.safetensors", trainer.network.first, save_format="diffusers", dtype=torch.float32,
        text_encoders=[(h, namings[n]) for n, h in trainer.network.text_encoders.items()],
    )
    return TrainedFiles(arch, models[arch], result.final_lora, peft)


# --- diffusers as the reference -------------------------------------------------------------------
def _pipeline(folder: Path, lora: Path | None = None, strength: float = 1.0):
    import warnings

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    if lora is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.load_lora_weights(str(lora), adapter_name="file")
        pipe.set_adapters(["file"], adapter_weights=[strength])  # scales the UNet's and the encoders' LoRA
    return pipe


def _token_ids(model: Path) -> torch.Tensor:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(model), subfolder="tokenizer")
    return tokenizer(["a red square shp"], padding="max_length", max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def _encoder_outputs(arch: str, ids: torch.Tensor, text_encoder, text_encoder_2=None) -> list[torch.Tensor]:
    """SD 1.5: CLIP's last hidden state; SDXL: both encoders' last and penultimate hidden states
    (the UNet reads the penultimate) and the pooled projection."""
    with torch.no_grad():
        first = text_encoder(ids, output_hidden_states=True)
        if arch == "sd1":
            return [first.last_hidden_state]
        second = text_encoder_2(ids, output_hidden_states=True)
    return [first.last_hidden_state, first.hidden_states[-2], second.hidden_states[-2], second.text_embeds]


def _unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    kw = {}
    if cfg.addition_embed_type == "text_time":
        width = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, width, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    latents = torch.randn(1, 4, 8, 8, generator=g)
    hidden = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet.eval()(latents, torch.tensor([500]), encoder_hidden_states=hidden, **kw).sample


def _outputs(trained: TrainedFiles, parts) -> list[torch.Tensor]:
    """Encoder outputs + the UNet's, of a pipeline or a loaded aitk adapter."""
    ids = _token_ids(trained.model)
    return [*_encoder_outputs(trained.arch, ids, parts.text_encoder, getattr(parts, "text_encoder_2", None)),
            _unet_output(parts.unet)]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def reference(trained: TrainedFiles) -> dict[str, list[torch.Tensor]]:
    """diffusers' outputs: the base model, and the base with the trained file at STRENGTH."""
    base = _outputs(trained, _pipeline(trained.model))
    lora = _outputs(trained, _pipeline(trained.model, trained.comfyui, STRENGTH))
    # the text-encoder LoRA moves every encoder output: the comparisons below can fail
    n = len(base) - 1
    assert all(float((a - b).abs().max()) > 1e-3 for a, b in zip(base[:n], lora[:n]))
    return {"base": base, "lora": lora}


# --- merge ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["comfyui", "diffusers"])
def test_merge_bakes_the_text_encoder_lora_into_the_saved_encoders(trained, reference, layout, tmp_path):
    file = trained.comfyui if layout == "comfyui" else trained.diffusers
    out = tmp_path / "merged"
    code, stdout, err = run_aitk("merge", "--model", trained.model, "--lora", file, "--arch", trained.arch,
                                 "--strength", STRENGTH, "-o", out)
    assert code == 0, err
    encoders = list(PEFT_PARTS[trained.arch])
    for name in encoders:
        assert f"merged {TINY_CLIP_LAYERS * len(CLIP_MODULES)} text-encoder modules into {name}" in stdout

    merged = _outputs(trained, _pipeline(out))
    diff = _max_diff(merged, reference["lora"])
    record(trained.arch, "lora", "aitk merge", diff < TOLERANCE, diff, layout=layout, note="with text encoders")
    assert diff < TOLERANCE, diff
    # untouched parts are copied byte for byte; the merge record counts the encoders' modules
    rewritten = ("unet", *encoders)
    copied = [f for f in trained.model.rglob("*")
              if f.is_file() and f.relative_to(trained.model).parts[0] not in rewritten]
    assert copied and all((out / f.relative_to(trained.model)).read_bytes() == f.read_bytes() for f in copied)
    merge_record = json.loads((out / "aitk_merge.json").read_text())
    per_encoder = TINY_CLIP_LAYERS * len(CLIP_MODULES)
    assert merge_record["loras"][0]["text_encoder_modules"] == {n: per_encoder for n in encoders}
    with safe_open(str(out / "text_encoder" / "model.safetensors"), "pt") as f:  # the base's precision
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def _single_file(arch: str, folder: Path, out: Path) -> Path:
    if arch == "sd1":
        from ldm_convert import write_ldm_checkpoint

        return write_ldm_checkpoint(folder, out)
    from test_models_sdxl import make_adapter, write_sgm_checkpoint

    return write_sgm_checkpoint(make_adapter(folder), out)


def test_merge_into_a_single_file_writes_the_encoders_under_their_checkpoint_keys(trained, reference, tmp_path):
    """SD 1.5's CLIP under transformers' names, SDXL's OpenCLIP with q / k / v stacked in in_proj_weight."""
    from aitk.config.schema import ModelConfig
    from aitk.models.registry import adapter_class

    base = _single_file(trained.arch, trained.model, tmp_path / "base.safetensors")
    out = tmp_path / "merged.safetensors"
    code, _, err = run_aitk("merge", "--model", base, "--lora", trained.comfyui, "--arch", trained.arch,
                            "--config", trained.model, "--strength", STRENGTH, "-o", out)
    assert code == 0, err
    cfg = ModelConfig(name_or_path=str(out), arch=trained.arch, model_kwargs={"config": str(trained.model)})
    adapter = adapter_class(trained.arch)(cfg, torch.device("cpu"), torch.float32)
    adapter.load()
    diff = _max_diff(_outputs(trained, adapter), reference["lora"])
    record(trained.arch, "lora", "aitk merge", diff < TOLERANCE, diff, note="single file, with text encoders")
    assert diff < TOLERANCE, diff
    before, after = load_file(str(base)), load_file(str(out))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    merged_parts = ("model.diffusion_model.", "cond_stage_model.", "conditioner.")
    assert changed and all(k.startswith(merged_parts) for k in changed)
    if trained.arch == "sdxl":
        assert any(k.startswith("conditioner.embedders.1.model.") and k.endswith("in_proj_weight") for k in changed)


# --- convert ----------------------------------------------------------------------------------------
def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_convert_round_trip_keeps_the_text_encoder_tensors_and_diffusers_outputs(trained, reference, tmp_path):
    peft, back = tmp_path / "peft.safetensors", tmp_path / "back.safetensors"
    code, stdout, err = run_aitk("convert", trained.comfyui, "--to", "diffusers", "--arch", trained.arch, "-o", peft)
    assert code == 0, err
    te_modules = TINY_CLIP_LAYERS * len(CLIP_MODULES) * len(PEFT_PARTS[trained.arch])
    assert f"+ {te_modules} text-encoder lora modules" in stdout
    keys = load_file(str(peft))
    for encoder in PEFT_PARTS[trained.arch]:  # diffusers' own naming: <encoder>.text_model.<path>
        assert sum(k.startswith(f"{encoder}.text_model.encoder.layers.") for k in keys) == 2 * te_modules // len(
            PEFT_PARTS[trained.arch])
    assert not any(k.startswith("lora_te") or k.endswith(".alpha") for k in keys)
    code, _, err = run_aitk("convert", peft, "--to", "kohya", "--arch", trained.arch, "-o", back)
    assert code == 0, err
    assert _same_tensors(load_file(str(back)), load_file(str(trained.comfyui)))

    loaded = _outputs(trained, _pipeline(trained.model, peft, STRENGTH))
    diff = _max_diff(loaded, reference["lora"])
    record(trained.arch, "lora", "diffusers load_lora_weights", diff < TOLERANCE, diff, layout="diffusers",
           note="aitk convert from comfyui, with text encoders")
    assert diff < TOLERANCE, diff


def test_the_trainers_diffusers_file_converts_to_its_comfyui_file(trained, reference, tmp_path):
    comfy = tmp_path / "comfy.safetensors"
    code, _, err = run_aitk("convert", trained.diffusers, "--to", "comfyui", "--arch", trained.arch, "-o", comfy)
    assert code == 0, err
    assert _same_tensors(load_file(str(comfy)), load_file(str(trained.comfyui)))
    diff = _max_diff(_outputs(trained, _pipeline(trained.model, comfy, STRENGTH)), reference["lora"])
    record(trained.arch, "lora", "diffusers load_lora_weights", diff < TOLERANCE, diff,
           note="aitk convert from diffusers, with text encoders")
    assert diff < TOLERANCE, diff


# --- lora info --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["comfyui", "diffusers"])
def test_lora_info_shows_each_text_encoders_modules_and_ranks(trained, layout):
    file = trained.comfyui if layout == "comfyui" else trained.diffusers
    code, out, err = run_aitk("lora", "info", file, "--json")
    assert code == 0, err
    info = json.loads(out)
    code, text, err = run_aitk("lora", "info", file)
    assert code == 0, err
    expected = TE_PARTS[trained.arch] if layout == "comfyui" else PEFT_PARTS[trained.arch]
    unet = "lora_unet" if layout == "comfyui" else "unet"
    assert list(info["parts"]) == [unet, *expected] and info["architecture"] == trained.arch
    per_encoder = TINY_CLIP_LAYERS * len(CLIP_MODULES)
    for component, part in expected.items():
        got = info["parts"][component]
        assert got["part"] == part and got["network_type"] == "lora" and got["modules"] == per_encoder
        assert got["ranks"] == {str(RANK): per_encoder} and got["alphas"] == {str(ALPHA): per_encoder}
        assert got["layers"] == TINY_CLIP_LAYERS and set(got["targets"]) == CLIP_TARGETS
        assert f"  {component} ({part}): {per_encoder} lora modules in {TINY_CLIP_LAYERS} CLIP layers (" in text
    assert info["parts"][unet]["part"] == "unet" and info["parts"][unet]["layers"] == 0
    assert info["modules"] == sum(p["modules"] for p in info["parts"].values())
    assert info["alphas"] == {str(ALPHA): info["modules"]}


# --- wrong --arch -----------------------------------------------------------------------------------
def test_text_encoder_keys_for_another_arch_are_one_clear_error(trained, tmp_path):
    other = "sdxl" if trained.arch == "sd1" else "sd1"
    for arch, says in ((other, "text encoders' modules"), ("flux", "no text-encoder LoRA for flux")):
        code, _, err = run_aitk("convert", trained.comfyui, "--to", "diffusers", "--arch", arch,
                                "-o", tmp_path / f"{arch}.safetensors")
        last = err.strip().splitlines()[-1]
        assert code == 1 and last.startswith("error: ") and says in last, err


def test_text_encoder_tensors_of_another_size_stop_the_merge_with_the_encoder_named(models, tmp_path):
    from safetensors.torch import save_file

    stem = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"  # tiny SDXL's OpenCLIP is 64 wide, not 32
    save_file({f"{stem}.lora_down.weight": torch.ones(RANK, 32), f"{stem}.lora_up.weight": torch.ones(64, RANK),
               f"{stem}.alpha": torch.tensor(float(ALPHA))}, str(tmp_path / "te2.safetensors"))
    out = tmp_path / "merged"
    code, _, err = run_aitk("merge", "--model", models["sdxl"], "--lora", tmp_path / "te2.safetensors",
                            "--arch", "sdxl", "-o", out)
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error: ") and "text_encoder_2 tensors do not fit" in last, err
    assert not out.exists()
