"""train.unload_text_encoder (ai-toolkit's low-memory mode): the trigger word, the blank prompt and
the preview prompts are encoded once, the text encoders are released, every training sample is
conditioned on the trigger word (regularisation samples on the blank prompt), previews keep their
own prompts, a stopped run resumes exactly, and with cache_text_embeddings the cached captions win."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import base_process, build_tiny_model, deep_update, write_job  # noqa: E402

VARIANTS = {"sd1": "sd15", "flux": "dev"}
TRIGGER = "shp"
CORPUS_FILE = Path(__file__).resolve().parent / "data" / "upstream_corpus" / "wan21_14b_24gb.yaml"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unload-models")
    return {arch: build_tiny_model(variant, root) for arch, variant in VARIANTS.items()}


@pytest.fixture(scope="module")
def folders(shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(training images, regularisation images): copies, so no cache of another test is shared."""
    root = tmp_path_factory.mktemp("unload-data")
    train = root / "train"
    shutil.copytree(shapes_dataset, train, ignore=shutil.ignore_patterns("_*"))
    reg = root / "reg"
    reg.mkdir()
    for image in sorted(train.glob("*.png"))[:4]:
        shutil.copy(image, reg / image.name)
        (reg / f"{image.stem}.txt").write_text(f"a plain {image.stem.replace('_', ' ')}")
    return train, reg


def process_for(arch: str, models: dict[str, Path], folders: tuple[Path, Path], out: Path, **changes: Any) -> dict:
    train, reg = folders
    process = deep_update(base_process(models[arch], train, out), {
        "model": {"arch": arch},
        "train": {"steps": 3, "unload_text_encoder": True},
    })
    process["datasets"].append({"folder_path": str(reg), "resolution": [64], "cache_latents": True, "is_reg": True})
    return deep_update(process, changes)


def trainer_for(tmp_path: Path, name: str, process: dict, **kwargs: Any):
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    loaded = load_job_file(write_job(tmp_path / f"{name}.yaml", name, process))
    return Trainer(loaded.job, loaded.job.config.process[0], **kwargs)


def encode(trainer, prompts: list[str]) -> dict[str, Any]:
    """Each prompt encoded alone, while the text encoders are still there (the reference)."""
    with trainer.placement.using(*trainer.adapter.text_encoders()), torch.no_grad():
        return {p: trainer.adapter.encode_prompts([p]) for p in prompts}


def assert_same(cond, row: int, reference) -> None:
    assert torch.equal(cond.hidden_states[row], reference.hidden_states[0])
    assert cond.extra.keys() == reference.extra.keys()
    for key, value in reference.extra.items():
        assert torch.equal(cond.extra[key][row], value[0]), key


# --- what a step is conditioned on ------------------------------------------------------------
@pytest.mark.parametrize("arch", list(VARIANTS))
def test_steps_train_on_the_trigger_word_and_reg_samples_on_the_blank_prompt(arch, models, folders, tmp_path):
    trainer = trainer_for(tmp_path, f"cond_{arch}", process_for(arch, models, folders, tmp_path / "out"))
    trainer._setup()
    try:
        reference = encode(trainer, [TRIGGER, ""])
        assert not torch.equal(reference[TRIGGER].hidden_states, reference[""].hidden_states)  # the check can fail
        trainer._cache_text_embeddings()
        # the text encoders are gone: from the adapter and from the placement
        assert trainer.text_encoders_released and trainer.conditioner.encoders_released
        assert trainer.adapter.text_encoders() == {}
        assert all(getattr(trainer.adapter, n, None) is None for n in trainer.adapter.text_encoder_names)
        assert not set(trainer.adapter.text_encoder_names) & set(trainer.placement.parts)

        batches, conds = [], []
        next_batch, predict = trainer.data.next_batch, trainer.adapter.predict
        trainer.data.next_batch = lambda: batches.append(next_batch()) or batches[-1]
        trainer.adapter.predict = lambda noisy, cond: conds.append(cond) or predict(noisy, cond)
        for _ in range(6):
            loss, _count = trainer._micro_step(1.0)  # the loop's own step
            assert np.isfinite(loss)
        seen = {False: 0, True: 0}
        for batch, cond in zip(batches, conds, strict=True):
            for row, (caption, reg) in enumerate(zip(batch.captions, batch.is_reg.tolist())):
                assert caption not in (TRIGGER, "")  # the captions were real; they are not used
                assert_same(cond, row, reference["" if reg else TRIGGER])
                seen[reg] += 1
        assert seen[False] and seen[True], seen
    finally:
        trainer.data.close()
        trainer.log.close()
    log = trainer.paths.log.read_text()
    assert (f"unload_text_encoder: every training sample is conditioned on the trigger word '{TRIGGER}' in place "
            "of its caption (regularisation samples: the blank prompt); text encoders released (") in log


def test_without_a_trigger_word_every_sample_is_conditioned_on_the_blank_prompt(models, folders, tmp_path):
    trainer = trainer_for(tmp_path, "blank", process_for("sd1", models, folders, tmp_path / "out", trigger_word=None))
    trainer._setup()
    try:
        blank = encode(trainer, [""])[""]
        trainer._cache_text_embeddings()
        batch = trainer.data.next_batch()
        cond = trainer.conditioner.for_batch(batch.captions, batch.is_reg)
        for row in range(len(batch)):
            assert_same(cond, row, blank)
    finally:
        trainer.data.close()
        trainer.log.close()
    log = trainer.paths.log.read_text()
    assert "conditioned on the blank prompt in place of its caption; text encoders released" in log


def test_with_cache_text_embeddings_the_cached_captions_win(models, folders, tmp_path):
    process = process_for("sd1", models, folders, tmp_path / "out", train={"cache_text_embeddings": True})
    trainer = trainer_for(tmp_path, "cached", process)
    trainer._setup()
    try:
        captions = trainer.data.all_captions()
        reference = encode(trainer, captions)
        trainer._cache_text_embeddings()
        assert trainer.text_encoders_released
        batch = trainer.data.next_batch()
        cond = trainer.conditioner.for_batch(batch.captions, batch.is_reg)
        for row, caption in enumerate(batch.captions):
            assert caption != TRIGGER
            assert_same(cond, row, reference[caption])
    finally:
        trainer.data.close()
        trainer.log.close()
    log = trainer.paths.log.read_text()
    assert "steps use the cached caption embeddings, not the trigger word" in log
    assert "text encoders released after caching" in log


# --- whole runs -------------------------------------------------------------------------------
PREVIEW = {"sample_every": 1000, "prompts": ["a red square [trigger]"], "neg": "blurry",
           "sample_steps": 2, "width": 64, "height": 64}


def first_sample(output_dir: Path) -> np.ndarray:
    sample = sorted((output_dir / "samples").glob("*.jpg"))[0]
    return np.asarray(Image.open(sample), dtype=np.float32)


@pytest.mark.parametrize("arch", list(VARIANTS))
def test_three_steps_run_and_previews_keep_their_prompts(arch, models, folders, tmp_path):
    unloaded = trainer_for(tmp_path, f"unloaded_{arch}",
                           process_for(arch, models, folders, tmp_path / "out", sample=PREVIEW))
    result = unloaded.run()
    assert result.state == "completed" and result.step == 3 and result.final_lora.is_file()
    assert unloaded.text_encoders_released and unloaded.adapter.text_encoders() == {}
    assert "warning: samples" not in (result.output_dir / "log.txt").read_text()

    plain = process_for(arch, models, folders, tmp_path / "out", sample=PREVIEW, train={"unload_text_encoder": False})
    kept = trainer_for(tmp_path, f"kept_{arch}", plain).run()
    # the first preview comes before any step, from the same weights: encoded at set-up and handed to
    # the pipeline as embeddings, its prompt gives the picture the live text encoders give
    diff = np.abs(first_sample(result.output_dir) - first_sample(kept.output_dir)).max()
    assert diff <= 2.0, diff


def test_a_stopped_run_resumes_exactly(models, folders, tmp_path):
    process = process_for("sd1", models, folders, tmp_path / "out", train={"steps": 4}, save={"save_every": 2})
    straight = trainer_for(tmp_path, "straight", process).run()

    def stop_at_2(trainer, step: int) -> None:
        if step == 2:
            trainer.stop.request("test")

    stopped = trainer_for(tmp_path, "resumed", process, on_step_end=stop_at_2).run()
    assert stopped.state == "stopped" and stopped.step == 2
    resuming = trainer_for(tmp_path, "resumed", process)
    finished = resuming.run()
    assert finished.state == "completed" and finished.step == 4 and resuming.text_encoders_released
    a = load_file(str(straight.final_lora))
    b = load_file(str(finished.final_lora))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- the job file -----------------------------------------------------------------------------
def test_the_upstream_example_validates_without_an_unload_warning(capsys):
    from aitk.config.validate import validate_command

    assert "unload_text_encoder: true" in CORPUS_FILE.read_text()
    assert validate_command([str(CORPUS_FILE)]) == 0
    printed = capsys.readouterr()
    assert "unload_text_encoder" not in printed.out + printed.err


def test_validate_warns_when_there_is_no_trigger_word(models, folders, tmp_path, capsys):
    from aitk.config.validate import validate_command

    job = write_job(tmp_path / "no_trigger.yaml", "no_trigger",
                    process_for("sd1", models, folders, tmp_path / "out", trigger_word=None))
    assert validate_command([str(job)]) == 0
    printed = capsys.readouterr()
    printed = printed.out + printed.err
    assert "train.unload_text_encoder: there is no trigger_word, so every sample trains on the blank prompt" in printed
    with_trigger = write_job(tmp_path / "trigger.yaml", "trigger",
                             process_for("sd1", models, folders, tmp_path / "out"))
    assert validate_command([str(with_trigger)]) == 0
    printed = capsys.readouterr()
    assert "unload_text_encoder" not in printed.out + printed.err


def test_the_memory_plan_counts_the_text_encoders_released(models, folders, tmp_path):
    from aitk.config.loader import load_job_file
    from aitk.plan.settings import settings_from_process

    def settings(unload: bool):
        process = process_for("sd1", models, folders, tmp_path / "out", train={"unload_text_encoder": unload})
        loaded = load_job_file(write_job(tmp_path / f"plan_{unload}.yaml", "plan", process))
        return settings_from_process(loaded.job.config.process[0])

    assert settings(True).cache_text_embeddings and not settings(False).cache_text_embeddings
