"""Resuming: state_dict after k batches -> new TrainingData -> load_state_dict gives the same batches."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aitk.config.schema import DatasetConfig
from aitk.data import Batch, TrainingData


def save_image(path: Path, w: int, h: int, seed: int) -> None:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    main, reg = root / "main", root / "reg"
    main.mkdir()
    reg.mkdir()
    sizes = [(96, 64), (64, 96), (80, 80), (100, 70), (64, 64), (72, 90), (90, 72), (128, 80)]
    for i, (w, h) in enumerate(sizes):
        save_image(main / f"m{i}.png", w, h, seed=i)
        (main / f"m{i}.txt").write_text(f"person{i}, red, green, blue, tall, short")
    for i in range(5):
        save_image(reg / f"r{i}.png", 80 + 8 * i, 80, seed=100 + i)
        (reg / f"r{i}.txt").write_text("a person, standing, photo")
    return main, reg


def make(folders, rank=0, world_size=1):
    main, reg = folders
    common = dict(resolution=64, flip_x=True, flip_y=True, random_crop=True, caption_dropout_rate=0.2,
                  shuffle_tokens=True, keep_tokens=1, token_dropout_rate=0.2)
    cfgs = [DatasetConfig(folder_path=str(main), num_repeats=2, **common),
            DatasetConfig(folder_path=str(reg), is_reg=True, **common)]
    return TrainingData(cfgs, trigger_word="sks", divisibility=16, batch_size=3, seed=21, rank=rank,
                        world_size=world_size, log=lambda m: None)


def record(b: Batch):
    return (tuple(b.keys), tuple(b.captions), b.pixels.clone(), tuple(b.is_reg.tolist()))


def same(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and a[3] == b[3]


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_gives_the_uninterrupted_batches(folders, world_size):
    for rank in range(world_size):
        ref_td = make(folders, rank, world_size)
        per_epoch = ref_td.batches_per_epoch(0)
        n = per_epoch * 2 + 3
        ref = [record(ref_td.next_batch()) for _ in range(n)]
        assert any(any(r[3]) for r in ref) and any("" in r[1] for r in ref)
        for k in (1, per_epoch - 1, per_epoch, per_epoch + 2):
            first = make(folders, rank, world_size)
            got = [record(first.next_batch()) for _ in range(k)]
            state = first.state_dict()
            resumed = make(folders, rank, world_size)
            resumed.load_state_dict(dict(state))
            assert resumed.epoch == first.epoch
            got += [record(resumed.next_batch()) for _ in range(n - k)]
            assert all(same(a, b) for a, b in zip(got, ref)), (rank, k)


def test_ranks_agree_on_epoch_lengths_with_reg(folders):
    r0, r1 = make(folders, 0, 2), make(folders, 1, 2)
    for epoch in range(3):
        assert r0.batches_per_epoch(epoch) == r1.batches_per_epoch(epoch)
        k0 = [k for _ in range(r0.batches_per_epoch(epoch)) for k in r0.next_batch().keys if k.startswith("0:")]
        k1 = [k for _ in range(r1.batches_per_epoch(epoch)) for k in r1.next_batch().keys if k.startswith("0:")]
        # every training image is used num_repeats times overall (minus a truncated batch at most)
        assert len(k0) + len(k1) >= 16 - 3
        assert r0.epoch == r1.epoch == epoch + 1


def test_loading_ahead_changes_no_batch_and_saves_the_consumed_state(folders):
    """The batch loaded in the background while a step runs: the same batches as loading on
    demand, state_dict as of the batches handed out (not the one loaded ahead), and a rewind of
    the same object (load_state_dict, epoch =) drops the batch loaded ahead."""
    main, reg = folders
    cfgs = [DatasetConfig(folder_path=str(main), resolution=64, flip_x=True, random_crop=True),
            DatasetConfig(folder_path=str(reg), is_reg=True, resolution=64)]
    ahead = TrainingData(cfgs, trigger_word=None, divisibility=16, batch_size=3, seed=5, log=lambda m: None)
    plain = TrainingData(cfgs, trigger_word=None, divisibility=16, batch_size=3, seed=5, log=lambda m: None,
                         prefetch=False)
    assert ahead._ahead is not None and plain._ahead is None
    states = []
    for _ in range(7):
        assert same(record(ahead.next_batch()), record(plain.next_batch()))
        assert ahead.state_dict() == plain.state_dict()
        states.append(ahead.state_dict())
    assert ahead._sampler.state_dict() != ahead.state_dict()  # the sampler really is a batch ahead
    ahead.load_state_dict(dict(states[2]))  # back to after batch 3, on the same object
    plain.load_state_dict(dict(states[2]))
    for _ in range(3):
        assert same(record(ahead.next_batch()), record(plain.next_batch()))
    ahead.epoch = plain.epoch = 4
    assert ahead.state_dict() == plain.state_dict()
    assert same(record(ahead.next_batch()), record(plain.next_batch()))
    ahead.close()


def test_batches_of_latents_in_memory_load_on_demand_and_files_load_ahead(folders, tmp_path):
    """A loader thread only where a batch reads files or is pinned for the GPU: on the CPU, latents
    kept in memory are stacked on the step's thread; latents kept on disk only and images load ahead."""
    main, _ = folders
    common = dict(trigger_word=None, divisibility=16, batch_size=2, seed=5, log=lambda m: None)
    in_memory = TrainingData([DatasetConfig(folder_path=str(main), resolution=64, cache_latents=True)], **common)
    on_disk = TrainingData([DatasetConfig(folder_path=str(main), resolution=64, cache_latents_to_disk=True)], **common)
    images = TrainingData([DatasetConfig(folder_path=str(main), resolution=64)], **common)
    for_gpu = TrainingData([DatasetConfig(folder_path=str(main), resolution=64, cache_latents=True)], **common,
                           pin_memory=True)  # the copy into pinned memory overlaps the step
    assert in_memory._ahead is None and not in_memory.reads_files_per_batch
    assert on_disk._ahead is not None and images._ahead is not None and for_gpu._ahead is not None
    for data in (on_disk, images, for_gpu):
        data.close()
