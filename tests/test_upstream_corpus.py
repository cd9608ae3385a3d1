"""Issue #12's acceptance corpus: job files written the way ostris/ai-toolkit's users write them
(tests/data/upstream_corpus: its example folder, README, web UI and pull requests, plus the
variants users commonly write) validate without ignoring any key the issue covers, and each trains
3 steps on the tiny model of its family and writes its LoRA. The families we do not train
(tests/data/upstream_corpus/unsupported) fail validation saying so. Our own upstream-shaped
examples (config/examples) validate with no warning at all, download nothing, and train too."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import build_tiny_model
from upstream_jobs import extras_on_path  # noqa: F401 - autouse fixture: torchao and bitsandbytes
from upstream_jobs import (
    CORPUS,
    TinyData,
    copy_folder,
    is_video_dataset,
    localise,
    make_tiny_data,
    read_job,
    run_job,
    tiny_assistant_lora,
    tiny_recovery_adapter,
    tiny_variant,
    write_job,
)

CORPUS_FILES = sorted(CORPUS.glob("*.yaml"))
UNSUPPORTED_FILES = sorted((CORPUS / "unsupported").glob("*.yaml"))
EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "config" / "examples").glob("*.yaml"))
UPSTREAM_SHAPED_EXAMPLES = [p for p in EXAMPLES if p.name.startswith("train_lora_")]
STEPS = 3
#: keys issue #12 covers: none of them may be ignored, unknown or "not supported" in these files
COVERED_KEYS = frozenset({
    "attention_backend", "xformers",  # attention backends
    "timestep_type", "linear_timesteps", "content_or_style", "noise_scheduler",  # timesteps
    "sample_start_step", "bypass_guidance_embedding",
    "train_text_encoder", "text_encoder_lr",  # text-encoder LoRA
    "use_wandb", "log_every", "verbose", "project_name", "run_name", "performance_log_every",  # logging
    "dtype",  # fp16 training
    "only_if_contains", "ignore_if_contains",  # layer filters
})
IGNORING = ("ignored", "not supported", "unknown key")
INLINE_FLAG = re.compile(r"\s--[a-z]")
WARNING_KEY = re.compile(r"^\s*(?:warning|error): (\S+?): ")


def names(path: Path) -> str:
    return f"examples/{path.stem}" if path.parent.name == "examples" else path.stem


def warned_keys(text: str) -> list[tuple[str, str]]:
    """(last key of the path, line) of each warning that says a key is ignored or unknown."""
    out = []
    for line in text.splitlines():
        match = WARNING_KEY.match(line)
        if match and any(word in line for word in IGNORING):
            out.append((re.sub(r"\[\d+\]", "", match.group(1)).rsplit(".", 1)[-1], line.strip()))
    return out


def test_the_corpus_has_every_supported_family():
    assert len(CORPUS_FILES) >= 30
    from aitk.models.archs import ADAPTERS
    from conftest import TINY_VARIANT_OF_ARCH

    variants = {tiny_variant(read_job(p)) for p in CORPUS_FILES}
    # families upstream publishes no job file for (no example, no UI entry)
    no_upstream_job = {"cogview4", "ltx2"}  # LTX-2: our own example in config/examples
    also = {"sd3": {"sd3_large"}}  # upstream's SD 3.5 example is the large model
    missing = {arch for arch in ADAPTERS if arch not in no_upstream_job
               and not ({TINY_VARIANT_OF_ARCH[arch]} | also.get(arch, set())) & variants}
    assert missing == set()
    assert "schnell" in variants
    for path in CORPUS_FILES + UNSUPPORTED_FILES:
        assert path.read_text().startswith(("# Source: ", "# Variant users write: ")), path.name


def test_warned_keys_finds_the_key_of_an_ignoring_warning():
    text = ("  warning: config.process[0].train.xformers: xformers (an ai-toolkit option) is not supported yet; "
            "it is ignored\n  warning: config.process[0].sample.sample_start_step: unknown key; did you mean "
            "'sample_steps'?\n  note: config.process[0].datasets[0].folder_path: folder does not exist here")
    assert [key for key, _ in warned_keys(text)] == ["xformers", "sample_start_step"]


@pytest.mark.parametrize("path", CORPUS_FILES, ids=names)
def test_validates_without_ignoring_a_covered_key(path: Path, capsys: pytest.CaptureFixture[str]):
    from aitk.config.validate import validate_command

    code = validate_command([str(path)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    ignored = [line for key, line in warned_keys(printed.out + printed.err) if key in COVERED_KEYS]
    assert not ignored, "\n".join(ignored)


@pytest.mark.parametrize("path", UNSUPPORTED_FILES, ids=names)
def test_an_unsupported_family_fails_validation_saying_so(path: Path, capsys: pytest.CaptureFixture[str]):
    from aitk.config.validate import validate_command

    assert validate_command([str(path)]) == 1
    err = capsys.readouterr().err
    model = read_job(path)["config"]["process"][0]["model"]
    named = str(model.get("arch") or ("sd3" if model.get("is_v3") else ""))
    assert "is not supported yet; the run fails at start" in err and named in err, err


@pytest.mark.parametrize("path", [p for p in CORPUS_FILES if INLINE_FLAG.search(p.read_text())], ids=names)
def test_preview_prompt_flags_are_read(path: Path):
    """Inline flags (upstream's Kontext and I2V examples give each preview its control image with
    `--ctrl_img path`) become preview settings: none is left in the prompt text."""
    from aitk.config.loader import load_job_file
    from aitk.trainer.sampling import preview_requests

    process = load_job_file(path).job.config.process[0]
    requests = preview_requests(process.sample, process.trigger_word)
    unread = [r.prompt for r in requests if re.search(r"(^|\s)--\w", r.prompt)]
    assert requests and not unread, unread
    if "--ctrl_img" in path.read_text():
        assert all(r.ctrl_img for r in requests)


def test_upstream_shaped_examples_are_shipped():
    shipped = {p.stem for p in UPSTREAM_SHAPED_EXAMPLES}
    variants = {tiny_variant(read_job(p)) for p in UPSTREAM_SHAPED_EXAMPLES}
    assert {"train_lora_flux_24gb", "train_lora_flux_schnell_24gb", "train_lora_flux_kontext_24gb",
            "train_lora_wan21_14b_24gb", "train_lora_wan22_14b_24gb", "train_lora_wan21_i2v_14b_24gb"} <= shipped
    assert any(read_job(p)["config"]["process"][0]["network"].get("alpha_schedule") and tiny_variant(read_job(p))
               in ("t2v", "i2v", "22_t2v", "22_i2v") for p in UPSTREAM_SHAPED_EXAMPLES)  # a video alpha schedule
    assert {"dev", "schnell", "kontext", "t2v", "i2v", "22_t2v", "22_i2v"} <= variants


@pytest.mark.parametrize("path", EXAMPLES, ids=names)
def test_shipped_example_validates_clean_without_downloading(path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub

    from aitk.config.validate import validate_command

    def no_download(*args, **kwargs):
        raise AssertionError(f"aitk validate downloaded {args or kwargs}")

    for name in ("hf_hub_download", "snapshot_download", "model_info", "list_repo_files"):
        monkeypatch.setattr(huggingface_hub, name, no_download)
    assert validate_command([str(path)]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith(f"OK {path}\n") and "warning" not in printed.out + printed.err, printed


# --- 3-step runs on the tiny models ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpus_models")


@pytest.fixture(scope="module")
def tiny_model(tiny_root: Path) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in built:
            built[variant] = build_tiny_model(variant, tiny_root)
        return built[variant]

    return get


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory, shapes_dataset: Path) -> TinyData:
    return make_tiny_data(tmp_path_factory.mktemp("corpus_data"), shapes_dataset)


def wrapped(trainer) -> list[str]:
    """Module names the denoiser networks wrap, without the expert prefix of WAN 2.2."""
    return [name.split("/", 1)[-1] for name in trainer.network.wrapped_module_names()]


def _only(prefixes: tuple[str, ...]) -> Callable:
    def check(trainer, result, tensors) -> None:
        names = wrapped(trainer)
        assert names and all(n.startswith(prefixes) for n in names), names
    return check


def _none_of(prefix: str) -> Callable:
    def check(trainer, result, tensors) -> None:
        names = wrapped(trainer)
        assert names and not [n for n in names if n.startswith(prefix)], names
    return check


def _text_encoder_keys(trainer, result, tensors) -> None:
    assert any("text_encoder" in k or k.startswith("lora_te") for k in tensors), sorted(tensors)[:5]


def _lokr_keys(trainer, result, tensors) -> None:
    assert any("lokr_w1" in k for k in tensors), sorted(tensors)[:5]


def _offline_wandb_run(trainer, result, tensors) -> None:
    assert list(result.output_dir.rglob("*.wandb")), "no offline W&B run in the output folder"


#: what a file asks for beyond training, checked on the run's real outputs
CHECKS: dict[str, Callable] = {
    # block numbers become 0 on the tiny models (upstream_jobs.localise)
    "readme_only_if_contains_two_layers": _only(("single_transformer_blocks.0.proj_out",)),
    "readme_only_single_blocks": _only(("single_transformer_blocks.",)),
    "readme_ignore_single_blocks": _none_of("single_transformer_blocks."),
    "readme_lokr": _lokr_keys,
    "variant_sd15_kohya_layer_filters": _only(("up_blocks.1.attentions", "mid_block.attentions")),
    "variant_sd15_train_text_encoder": _text_encoder_keys,
    "variant_sdxl_train_text_encoder": _text_encoder_keys,
    "variant_flux_wandb": _offline_wandb_run,
}


def test_every_check_names_a_corpus_file():
    assert set(CHECKS) <= {p.stem for p in CORPUS_FILES}


@pytest.mark.parametrize("path", CORPUS_FILES + UPSTREAM_SHAPED_EXAMPLES, ids=names)
def test_trains_three_steps_on_the_tiny_model(path: Path, tmp_path: Path, tiny_model, tiny_data: TinyData,
                                              tiny_root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # logging.use_wandb: nothing leaves the machine
    monkeypatch.setenv("WANDB_SILENT", "true")
    job = read_job(path)
    variant = tiny_variant(job)
    model = tiny_model(variant)
    process = job["config"]["process"][0]
    kontext = variant in ("kontext", "qwen_image_edit", "qwen_image_edit_plus")  # trained on image pairs
    video = any(is_video_dataset(d) for d in process["datasets"])
    source = tiny_data.clips if video else tiny_data.pairs if kontext else tiny_data.images
    qtype = str(process["model"].get("qtype") or "")
    local = localise(
        job, out=tmp_path / "out", model=model, data=copy_folder(source, tmp_path / "data"),
        controls=copy_folder(tiny_data.controls, tmp_path / "controls") if kontext else None,
        ctrl_img=next(tiny_data.controls.iterdir()) if kontext else tiny_data.still,
        steps=STEPS, keep_prompts=2,
        assistant_lora=tiny_assistant_lora(model, tiny_root / "assistant.safetensors")
        if process["model"].get("assistant_lora_path") else None,
        recovery_adapter=tiny_recovery_adapter(variant, model, tiny_root / f"ara_{variant}.safetensors")
        if "|" in qtype else None,
    )
    loaded, trainer, result = run_job(write_job(local, tmp_path / path.name))

    assert result.state == "completed" and result.step == STEPS
    metrics = result.output_dir / f"metrics_{loaded.job.config.name}.jsonl"
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    assert result.final_loras and all(p.exists() for p in result.final_loras)
    # a full fine-tune (no network:) saves each denoiser as a diffusers folder
    files = [f for p in result.final_loras for f in (sorted(p.glob("*.safetensors")) if p.is_dir() else [p])]
    tensors = {k: v for p in files for k, v in load_file(p).items()}
    assert tensors and all(v.isfinite().all() for v in tensors.values())
    log = (result.output_dir / "log.txt").read_text()
    assert not [line for line in log.splitlines() if "samples for step" in line and "failed" in line]
    if path.stem in CHECKS:
        CHECKS[path.stem](trainer, result, tensors)
