"""TrainingData: batches, captions, determinism, resume, sharding, repeats, flips, failures."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aitk.config.schema import DatasetConfig
from aitk.data import Batch, DatasetError, TrainingData

SIZES = [(96, 64), (64, 96), (80, 80), (100, 70), (64, 64), (150, 60), (70, 100), (90, 90), (40, 40), (128, 96)]


def save_image(path: Path, w: int, h: int, seed: int = 0) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for i, (w, h) in enumerate(SIZES):
        save_image(d / f"img{i:02d}.png", w, h, seed=i)
        if i % 2 == 0:
            (d / f"img{i:02d}.txt").write_text(f"caption {i}", encoding="utf-8")
    return d


def make(folder, *, batch_size=2, seed=0, rank=0, world_size=1, trigger=None, **ds):
    ds.setdefault("resolution", 64)
    logs: list[str] = []
    td = TrainingData([DatasetConfig(folder_path=str(folder), **ds)], trigger_word=trigger, divisibility=16,
                      batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, log=logs.append)
    return td, logs


def sig(b: Batch):
    t = b.pixels if b.pixels is not None else b.latents
    return (tuple(b.keys), tuple(b.captions), tuple(t.shape), float(t.double().sum()), tuple(b.loss_multiplier.tolist()))


def test_batch_contents(folder):
    td, logs = make(folder, batch_size=3, trigger="sks", default_caption="a photo", loss_multiplier=0.5)
    assert td.summary_lines[0] == f"dataset {folder}: 10 images used, 0 skipped"
    assert not td.needs_latent_cache
    seen = set()
    for _ in range(td.batches_per_epoch()):
        b = td.next_batch()
        assert b.latents is None and b.pixels.dtype == torch.float32 and b.pixels.dim() == 4
        assert b.pixels.shape[0] == len(b.keys) == len(b.captions) <= 3
        assert -1.0 <= b.pixels.min() and b.pixels.max() <= 1.0
        assert b.loss_multiplier.tolist() == [0.5] * len(b.keys)
        for k, c in zip(b.keys, b.captions):
            i = int(k.split("img")[1][:2])
            assert k == f"0:img{i:02d}.png"
            assert c == (f"sks, caption {i}" if i % 2 == 0 else "sks, a photo")
            w, h = SIZES[i]
            assert b.pixels.shape[3] <= w and b.pixels.shape[2] <= h  # never upscaled
            seen.add(k)
    assert len(seen) == 10 and td.epoch == 1


def test_batch_pixels_match_image(tmp_path):
    # a 64x64 image at resolution 64: no resize, no crop -> exact pixels
    arr = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    td, _ = make(tmp_path, batch_size=1)
    px = td.next_batch().pixels[0]
    expected = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(px, expected, atol=1e-6)


def test_batches_from_one_bucket_multires(folder):
    td, _ = make(folder, batch_size=4, resolution=[64, 128])
    assert td.num_samples == 20  # once per resolution
    shapes = []
    for _ in range(td.batches_per_epoch() * 2):
        b = td.next_batch()
        shapes.append(tuple(b.pixels.shape[2:]))
        assert len(b.keys) == len(set(b.keys))  # one bucket, one resolution: no duplicate
    assert any(h * w > 64 * 64 for h, w in shapes)  # 128 buckets used (128x96 image)


def test_determinism_and_resume(folder):
    kw = dict(batch_size=2, seed=11, flip_x=True, flip_y=True, random_crop=True, caption_dropout_rate=0.3,
              num_repeats=2)
    a, _ = make(folder, **kw)
    b, _ = make(folder, **kw)
    n = a.batches_per_epoch() * 2 + 3
    ref = [sig(a.next_batch()) for _ in range(n)]
    assert ref == [sig(b.next_batch()) for _ in range(n)]
    c, _ = make(folder, **{**kw, "seed": 12})
    assert ref != [sig(c.next_batch()) for _ in range(n)]
    for k in (1, a.batches_per_epoch(), a.batches_per_epoch() + 2):
        first, _ = make(folder, **kw)
        got = [sig(first.next_batch()) for _ in range(k)]
        state = first.state_dict()
        resumed, _ = make(folder, **kw)
        resumed.load_state_dict(state)
        assert resumed.epoch == first.epoch
        got += [sig(resumed.next_batch()) for _ in range(n - k)]
        assert got == ref


def test_flips_dropout_repeats(tmp_path):
    save_image(tmp_path / "a.png", 64, 64)
    (tmp_path / "a.txt").write_text("cap")
    td, _ = make(tmp_path, batch_size=1, flip_x=True, num_repeats=40, caption_dropout_rate=0.5)
    assert td.batches_per_epoch() == 40
    batches = [td.next_batch() for _ in range(40)]
    base = batches[0].pixels[0]
    flipped = torch.flip(base, dims=[2])
    kinds = {("same" if torch.equal(b.pixels[0], base) else "flip" if torch.equal(b.pixels[0], flipped) else "?")
             for b in batches}
    assert kinds == {"same", "flip"}
    caps = [b.captions[0] for b in batches]
    assert set(caps) == {"", "cap"}
    td1, _ = make(tmp_path, batch_size=1, caption_dropout_rate=1.0)
    assert td1.next_batch().captions == [""]


def test_no_buckets_square_and_random_crop(folder):
    td, _ = make(folder, batch_size=1, buckets=False, random_crop=True)
    for _ in range(td.batches_per_epoch()):
        b = td.next_batch()
        assert b.pixels.shape[2] == b.pixels.shape[3]


def test_sharding_world_size_2(folder):
    r0, _ = make(folder, batch_size=2, seed=4, rank=0, world_size=2, num_repeats=1)
    r1, _ = make(folder, batch_size=2, seed=4, rank=1, world_size=2, num_repeats=1)
    assert r0.batches_per_epoch() == r1.batches_per_epoch() > 0
    for _epoch in range(2):
        k0 = [k for _ in range(r0.batches_per_epoch()) for k in r0.next_batch().keys]
        k1 = [k for _ in range(r1.batches_per_epoch()) for k in r1.next_batch().keys]
        assert not set(k0) & set(k1)


def test_too_few_batches_for_world_size(tmp_path):
    save_image(tmp_path / "a.png", 64, 64)
    with pytest.raises(DatasetError, match="processes"):
        make(tmp_path, batch_size=1, world_size=2)


def test_two_datasets_keys_and_triggers(folder, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    save_image(other / "z.png", 64, 64)
    td = TrainingData(
        [DatasetConfig(folder_path=str(folder), resolution=64),
         DatasetConfig(folder_path=str(other), resolution=64, trigger_word="ohwx", loss_multiplier=2.0)],
        trigger_word="sks", divisibility=16, batch_size=1, seed=0, log=lambda m: None)
    found = {}
    for _ in range(td.batches_per_epoch()):
        b = td.next_batch()
        found[b.keys[0]] = (b.captions[0], b.loss_multiplier.item())
    assert found["1:z.png"] == ("ohwx", 2.0)
    assert found["0:img00.png"] == ("sks, caption 0", 1.0)


def test_file_broken_after_scan_is_replaced(tmp_path):
    for i in range(6):
        save_image(tmp_path / f"img{i:02d}.png", 64 + 8 * i, 70, seed=i)
    save_image(tmp_path / "other.png", 64, 128, seed=9)  # another bucket (64x128)
    td, logs = make(tmp_path, batch_size=4, buckets=True, num_repeats=2)
    reference, _ = make(tmp_path, batch_size=4, buckets=True, num_repeats=2)
    refs = [reference.next_batch() for _ in range(td.batches_per_epoch() * 2)]  # before the file breaks
    (tmp_path / "img03.png").write_bytes(b"gone bad")
    filled = 0
    for ref in refs:
        b = td.next_batch()
        assert len(b.keys) == len(ref.keys)  # the batch keeps its size ...
        assert b.pixels.shape == ref.pixels.shape  # ... and its bucket
        assert "0:img03.png" not in b.keys
        if "0:img03.png" in ref.keys:  # filled with another sample of the same batch
            assert set(b.keys) == set(ref.keys) - {"0:img03.png"}
            filled += ref.keys.count("0:img03.png")
        else:
            assert b.keys == ref.keys
    assert filled == 4  # 2 repeats x 2 epochs
    assert sum("img03.png" in m for m in logs) == 1
    assert any("img03.png" in m and "using another sample" in m for m in logs)


def test_threaded_loading_and_jpeg_same_result(tmp_path):
    for i in range(4):
        arr = np.random.default_rng(i).integers(0, 256, size=(300 + 10 * i, 400, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"j{i}.jpg", quality=90)
    a, _ = make(tmp_path, batch_size=2, seed=3, flip_x=True)
    b, _ = make(tmp_path, batch_size=2, seed=3, flip_x=True, num_workers=2)
    try:
        for _ in range(4):
            x, y = a.next_batch(), b.next_batch()
            assert x.keys == y.keys and torch.equal(x.pixels, y.pixels)
            assert tuple(x.pixels.shape[2:]) in {(48, 80), (64, 64)}  # landscape photos at 64, divisibility 16
    finally:
        b.close()
