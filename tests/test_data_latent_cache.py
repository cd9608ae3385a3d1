"""Latent cache: memory and disk reuse, invalidation, flip variants, robustness."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from aitk.config.schema import DatasetConfig
from aitk.data import LatentCache, TrainingData, latent_key
from aitk.data.latent_cache import CACHE_DIR_NAME


def save_image(path: Path, w: int, h: int, seed: int = 0) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


class FakeEncoder:
    """avg-pool by 8 to 4 channels; counts the images it encodes."""

    def __init__(self):
        self.images = 0
        self.calls = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and x.dim() == 4 and x.shape[1] == 3
        assert x.min() >= -1 and x.max() <= 1
        self.images += x.shape[0]
        self.calls.append(tuple(x.shape))
        p = F.avg_pool2d(x, 8)
        return torch.cat([p, p.mean(1, keepdim=True)], dim=1)


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for i, (w, h) in enumerate([(64, 64), (80, 64), (64, 96), (72, 72), (128, 64)]):
        save_image(d / f"p{i}.png", w, h, seed=i)
    return d


def make(folder, **ds):
    ds.setdefault("resolution", 64)
    logs: list[str] = []
    td = TrainingData([DatasetConfig(folder_path=str(folder), **ds)], trigger_word=None, divisibility=16,
                      batch_size=2, seed=0, log=logs.append)
    return td, logs


def test_memory_cache_batches_are_latents(folder):
    td, logs = make(folder, cache_latents=True)
    assert td.needs_latent_cache
    enc = FakeEncoder()
    td.cache_latents(enc, "fake-vae")
    assert enc.images == 5
    assert all(c[0] <= 2 for c in enc.calls)  # batched by bucket, batch_size at most
    assert not (folder / CACHE_DIR_NAME).exists()
    for _ in range(td.batches_per_epoch()):
        b = td.next_batch()
        assert b.pixels is None and b.latents is not None
        assert b.latents.shape[1] == 4 and b.latents.shape[0] == len(b.keys)
    # latents equal encoding the (uncached) pixels with the same fixed crop
    plain, _ = make(folder)
    pix = {}
    for _ in range(plain.batches_per_epoch()):
        b = plain.next_batch()
        pix.update(zip(b.keys, b.pixels))
    b = td.next_batch()
    for k, lat in zip(b.keys, b.latents):
        assert torch.allclose(lat, FakeEncoder()(pix[k][None])[0], atol=1e-5)
    # calling again encodes nothing
    enc2 = FakeEncoder()
    td.cache_latents(enc2, "fake-vae")
    assert enc2.images == 0
    assert any("0 latents encoded, 5 reused" in m for m in logs)


def test_flip_variants_cached(folder):
    td, _ = make(folder, cache_latents=True, flip_x=True, flip_y=True, random_crop=True)
    enc = FakeEncoder()
    td.cache_latents(enc, "fake-vae")
    assert enc.images == 5 * 4
    sums = set()
    for _ in range(td.batches_per_epoch() * 6):
        b = td.next_batch()
        sums.update(float(x.sum()) for x in b.latents)
    assert len(sums) > 5  # several flip variants drawn


def test_random_crop_warning_once(folder):
    _, logs = make(folder, cache_latents=True, random_crop=True)
    assert sum("random_crop" in m for m in logs) == 1


def test_disk_cache_reuse_and_invalidation(folder):
    td, _ = make(folder, cache_latents_to_disk=True)
    enc = FakeEncoder()
    td.cache_latents(enc, "fake-vae")
    assert enc.images == 5
    cache_dir = folder / CACHE_DIR_NAME
    files = sorted(p.name for p in cache_dir.iterdir())
    assert len(files) == 5 and all(f.endswith(".safetensors") and not f.startswith(".") for f in files)
    first = [td.next_batch() for _ in range(td.batches_per_epoch())]

    # a new run finds everything on disk (the cache folder is not scanned as images)
    td2, _ = make(folder, cache_latents_to_disk=True)
    enc2 = FakeEncoder()
    td2.cache_latents(enc2, "fake-vae")
    assert enc2.images == 0
    second = [td2.next_batch() for _ in range(td2.batches_per_epoch())]
    for a, b in zip(first, second):
        assert a.keys == b.keys and torch.equal(a.latents, b.latents)

    # a changed file gets a new key: only that file is re-encoded
    save_image(folder / "p1.png", 80, 64, seed=99)
    td3, _ = make(folder, cache_latents_to_disk=True, cache_latents=True)
    enc3 = FakeEncoder()
    td3.cache_latents(enc3, "fake-vae")
    assert enc3.images == 1
    # a different latent space (VAE) re-encodes everything
    enc4 = FakeEncoder()
    td3.cache_latents(enc4, "other-vae")
    assert enc4.images == 5
    # a different bucket setting too
    td5, _ = make(folder, cache_latents_to_disk=True, buckets=False)
    enc5 = FakeEncoder()
    td5.cache_latents(enc5, "fake-vae")
    assert enc5.images == 2  # p2 (64x96) and p4 (128x64) change bucket; the others keep their geometry


def test_corrupt_disk_entry_recomputed(folder):
    td, logs = make(folder, cache_latents_to_disk=True)
    td.cache_latents(FakeEncoder(), "v")
    victim = next((folder / CACHE_DIR_NAME).iterdir())
    victim.write_bytes(b"\x00" * 10)
    td2, logs2 = make(folder, cache_latents_to_disk=True, cache_latents=True)
    enc = FakeEncoder()
    td2.cache_latents(enc, "v")
    assert enc.images == 1
    assert any("unreadable" in m for m in logs2)


def test_latent_cache_unit(tmp_path):
    k1 = latent_key("h", (64, 64), (64, 64), (0, 0, 64, 64), False, False, "vae")
    k2 = latent_key("h", (64, 64), (64, 64), (0, 0, 64, 64), True, False, "vae")
    k3 = latent_key("h2", (64, 64), (64, 64), (0, 0, 64, 64), False, False, "vae")
    assert len({k1, k2, k3}) == 3
    mem = LatentCache(memory=True, disk_dir=None)
    assert mem.get(k1) is None and not mem.ensure(k1)
    mem.put(k1, torch.ones(4, 2, 2))
    assert mem.ensure(k1) and torch.equal(mem.get(k1), torch.ones(4, 2, 2))
    disk = LatentCache(memory=False, disk_dir=tmp_path / "c")
    disk.put(k1, torch.full((4, 2, 2), 3.0))
    assert len(disk) == 0 and (tmp_path / "c" / f"{k1}.safetensors").is_file()
    assert torch.equal(LatentCache(memory=False, disk_dir=tmp_path / "c").get(k1), torch.full((4, 2, 2), 3.0))
    assert [p.name for p in (tmp_path / "c").iterdir()] == [f"{k1}.safetensors"]  # no temp files left


def test_uncached_fallback_when_cache_not_built(folder):
    td, logs = make(folder, cache_latents=True)
    b = td.next_batch()
    assert b.pixels is not None and b.latents is None
    assert sum("cache_latents() was not called" in m for m in logs) == 1


def test_disk_cache_invalidation_counts(tmp_path):
    """Changed file -> that one re-encoded; flip_x on -> only the new variants; resolution -> all."""
    d = tmp_path / "big"
    d.mkdir()
    for i, (w, h) in enumerate([(160, 160), (200, 150), (150, 210), (180, 180)]):
        save_image(d / f"q{i}.png", w, h, seed=i)

    def run(**ds):
        ds.setdefault("resolution", 64)
        td, logs = make(d, cache_latents_to_disk=True, **ds)
        enc = FakeEncoder()
        td.cache_latents(enc, "fake-vae")
        return enc.images, logs

    assert run()[0] == 4
    assert run()[0] == 0
    save_image(d / "q2.png", 150, 210, seed=77)  # same size, new content
    n, logs = run()
    assert n == 1 and any("1 latents encoded, 3 reused" in m for m in logs)
    assert run(flip_x=True)[0] == 4  # the mirrored variant of each image; the plain ones are reused
    assert run(flip_x=True)[0] == 0
    assert run(resolution=96)[0] == 4  # every bucket / resize changes
    assert run(resolution=96, flip_x=True)[0] == 4
