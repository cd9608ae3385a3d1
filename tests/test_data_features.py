"""TrainingData features: caption tags / metadata, all_captions, is_reg, masks, control images."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from aitk.config.schema import DatasetConfig
from aitk.data import DatasetError, TrainingData


def save_image(path: Path, w: int, h: int, seed: int = 0) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def make(cfgs, *, batch_size=2, seed=0, trigger=None, rank=0, world_size=1):
    logs: list[str] = []
    td = TrainingData(cfgs, trigger_word=trigger, divisibility=16, batch_size=batch_size, seed=seed,
                      rank=rank, world_size=world_size, log=logs.append)
    return td, logs


def cfg(folder, **kw):
    kw.setdefault("resolution", 64)
    return DatasetConfig(folder_path=str(folder), **kw)


def epoch_batches(td):
    return [td.next_batch() for _ in range(td.batches_per_epoch())]


# ---------------------------------------------------------------- captions

def test_shuffle_and_token_dropout_in_batches(tmp_path):
    for i in range(4):
        save_image(tmp_path / f"i{i}.png", 64, 64, seed=i)
        (tmp_path / f"i{i}.txt").write_text(f"subject{i}, t1, t2, t3, t4, t5")
    kw = dict(shuffle_tokens=True, keep_tokens=1, token_dropout_rate=0.3, caption_dropout_rate=0.2, num_repeats=5)
    td, _ = make([cfg(tmp_path, **kw)], batch_size=1, trigger="sks", seed=3)
    seen: dict[str, set[str]] = {}
    for _ in range(td.batches_per_epoch() * 2):
        b = td.next_batch()
        key, cap = b.keys[0], b.captions[0]
        seen.setdefault(key, set()).add(cap)
        if cap == "":
            continue
        i = key.split(":i")[1][0]
        tags = cap.split(", ")
        assert tags[0] == "sks" and tags[1] == f"subject{i}"  # trigger in front, kept tag in place
        assert set(tags[2:]) <= {"t1", "t2", "t3", "t4", "t5"}
    assert all(len(v) > 3 for v in seen.values())  # different per draw
    assert any("" in v for v in seen.values())  # caption dropout gives the empty caption
    assert td.all_captions() is None  # unbounded: the trainer cannot pre-encode


def test_metadata_captions_in_training_data(tmp_path):
    save_image(tmp_path / "a.png", 64, 64)
    save_image(tmp_path / "b.png", 64, 64)
    save_image(tmp_path / "c.png", 64, 64)
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "meta a"}\n{"file_name": "b.png", "caption": "meta b"}\n')
    (tmp_path / "b.txt").write_text("txt b")
    td, _ = make([cfg(tmp_path, default_caption="dflt", caption_dropout_rate=0.1)], trigger="sks")
    caps = {r.rel: (r.caption, r.caption_source) for r in td.reports[0].records}
    assert caps == {"a.png": ("sks, meta a", "metadata"), "b.png": ("sks, txt b", "txt"),
                    "c.png": ("sks, dflt", "default")}
    assert td.all_captions() == ["", "sks, dflt", "sks, meta a", "sks, txt b"]
    td2, _ = make([cfg(tmp_path)])
    assert td2.all_captions() == ["", "meta a", "txt b"]  # "" is also c.png's own caption


# ---------------------------------------------------------------- is_reg

@pytest.fixture
def two_folders(tmp_path):
    main, reg = tmp_path / "main", tmp_path / "reg"
    main.mkdir()
    reg.mkdir()
    for i in range(6):
        save_image(main / f"m{i}.png", 64 + 16 * (i % 2), 64, seed=i)
    for i in range(3):
        save_image(reg / f"r{i}.png", 64 + 16 * (i % 2), 64, seed=10 + i)
    return main, reg


def test_reg_dataset_mixed_in_equal_numbers(two_folders, tmp_path):
    main, reg = two_folders
    td, _ = make([cfg(main), cfg(reg, is_reg=True)], batch_size=2)
    assert td.num_samples == 12
    used = Counter()
    for _epoch in range(4):
        reg_count = main_count = 0
        for b in epoch_batches(td):
            assert b.is_reg.dtype == torch.bool and b.is_reg.shape == (len(b.keys),)
            for k, r in zip(b.keys, b.is_reg.tolist()):
                assert r == k.startswith("1:")
                reg_count += r
                main_count += not r
                if r:
                    used[k] += 1
        assert main_count == 6 and reg_count == 6  # as many reg samples as the others
    assert set(used.values()) == {8}  # 3 reg images cycled evenly: 24 draws

    # more reg images than training images: subsampled, every reg image used over the epochs
    big = tmp_path / "bigreg"
    big.mkdir()
    for i in range(10):
        save_image(big / f"b{i}.png", 64, 64, seed=30 + i)
    td2, _ = make([cfg(main), cfg(big, is_reg=True)], batch_size=3)
    seen = Counter()
    for _epoch in range(5):
        n = 0
        for b in epoch_batches(td2):
            n += int(b.is_reg.sum())
            seen.update(k for k, r in zip(b.keys, b.is_reg.tolist()) if r)
        assert n == 6
    assert len(seen) == 10 and set(seen.values()) == {3}  # 30 draws, 10 images, each 3 times


def test_reg_batches_stay_in_one_bucket_and_are_deterministic(two_folders):
    main, reg = two_folders
    a, _ = make([cfg(main), cfg(reg, is_reg=True)], batch_size=4, seed=5)
    b, _ = make([cfg(main), cfg(reg, is_reg=True)], batch_size=4, seed=5)
    for _ in range(20):
        x, y = a.next_batch(), b.next_batch()
        assert x.keys == y.keys and torch.equal(x.pixels, y.pixels) and torch.equal(x.is_reg, y.is_reg)
        assert len(x.keys) == len(set(x.keys)) or x.is_reg.any()  # a small reg set may repeat in a batch


def test_only_reg_datasets_rejected(two_folders):
    _, reg = two_folders
    with pytest.raises(DatasetError, match="is_reg"):
        make([cfg(reg, is_reg=True)])


def test_batches_without_reg_have_false_is_reg(two_folders):
    main, _ = two_folders
    td, _ = make([cfg(main)])
    b = td.next_batch()
    assert b.is_reg.tolist() == [False] * len(b.keys)
    assert b.masks is None and b.controls is None


# ---------------------------------------------------------------- masks and control images

def _gradient(w: int, h: int) -> np.ndarray:
    """uint8 (h, w): value grows with x and y, so any crop / flip / resize shows."""
    x = np.linspace(0, 200, w)[None, :]
    y = np.linspace(0, 55, h)[:, None]
    return np.rint(x + y).astype(np.uint8)


def _image_from(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.stack([gray, 255 - gray, np.full_like(gray, 7)], axis=-1))


@pytest.fixture
def masked(tmp_path):
    imgs, masks, controls = tmp_path / "imgs", tmp_path / "masks", tmp_path / "ctrl"
    for d in (imgs, masks, controls):
        d.mkdir()
    sizes = {"a": (96, 64), "b": (80, 80), "c": (64, 96), "d": (120, 70)}
    for name, (w, h) in sizes.items():
        g = _gradient(w, h)
        _image_from(g).save(imgs / f"{name}.png")
        if name == "b":  # mask at half size, other extension: stretched to the image
            Image.fromarray(g).resize((w // 2, h // 2), Image.Resampling.LANCZOS).save(masks / f"{name}.bmp")
        elif name != "d":
            Image.fromarray(g).save(masks / f"{name}.png")
        if name != "c":
            Image.fromarray(np.stack([255 - g] * 3, axis=-1)).save(controls / f"{name}.webp", lossless=True)
    return imgs, masks, controls


def test_masks_follow_crop_and_flip(masked):
    imgs, masks, _ = masked
    td, logs = make([cfg(imgs, mask_path=str(masks), random_crop=True, flip_x=True, flip_y=True, buckets=False,
                         num_repeats=4)], batch_size=2, seed=1)
    assert sum("d.png" in m and "without a mask" in m for m in logs) == 1
    assert any("masks: 3 of 4 images" in line for line in td.summary_lines)
    flips = set()
    for b in epoch_batches(td):
        assert b.masks is not None and b.masks.shape == (len(b.keys), 1, *b.pixels.shape[2:])
        assert b.masks.dtype == torch.float32 and 0 <= b.masks.min() and b.masks.max() <= 1
        for k, px, m in zip(b.keys, b.pixels, b.masks):
            red = (px[0] + 1) * 127.5  # the image's red channel is the gradient
            if k.endswith("d.png"):
                assert torch.equal(m, torch.ones_like(m))  # no mask: every pixel counts
                continue
            tol = 6 if k.endswith("b.png") else 0.51
            assert (m[0] * 255 - red).abs().max() <= tol, k
            flips.add((bool(red[0, 0] > red[0, -1]), bool(red[0, 0] > red[-1, 0])))
    assert len(flips) == 4  # every flip combination was drawn


def test_controls_follow_crop_and_flip_and_missing_skipped(masked):
    imgs, masks, controls = masked
    td, logs = make([cfg(imgs, control_path=str(controls), mask_path=str(masks), random_crop=True,
                         flip_x=True, num_repeats=3)], batch_size=1, seed=2)
    assert sum("c.png" in m and "no control image" in m for m in logs) == 1
    assert td.reports[0].skipped["no control image"] == 1
    keys = set()
    for b in epoch_batches(td):
        assert b.controls is not None and b.controls.shape == b.pixels.shape
        red = (b.pixels[:, 0] + 1) * 127.5
        ctrl = (b.controls[:, 0] + 1) * 127.5
        assert (ctrl - (255 - red)).abs().max() <= 1.01  # the control is the inverted gradient, same crop/flip
        keys.update(b.keys)
    assert keys == {"0:a.png", "0:b.png", "0:d.png"}


def test_mixed_datasets_with_and_without_masks(masked, tmp_path):
    imgs, masks, _ = masked
    plain = tmp_path / "plain"
    plain.mkdir()
    save_image(plain / "p.png", 80, 80)
    td, _ = make([cfg(imgs, mask_path=str(masks), buckets=False), cfg(plain, buckets=False)], batch_size=5)
    b = td.next_batch()  # all in one 64x64 bucket
    assert len(b.keys) == 5 and b.masks is not None
    p = b.keys.index("1:p.png")
    assert torch.equal(b.masks[p], torch.ones(1, 64, 64))


class PoolEncoder:
    def __init__(self):
        self.images = 0

    def __call__(self, x):
        self.images += x.shape[0]
        return F.avg_pool2d(x, 8)


def test_masks_with_cached_latents_match_the_latent_variant(masked):
    imgs, masks, controls = masked
    td, _ = make([cfg(imgs, mask_path=str(masks), control_path=str(controls), cache_latents=True, flip_x=True,
                      flip_y=True, num_repeats=4)], batch_size=1, seed=4)
    enc = PoolEncoder()
    td.cache_latents(enc, "pool")
    assert enc.images == 3 * 4  # c has no control (skipped); 4 flip variants each
    for b in epoch_batches(td):
        assert b.pixels is None and b.latents is not None and b.masks is not None and b.controls is not None
        lat_red = (b.latents[0, 0] + 1) * 127.5
        mask_red = F.avg_pool2d(b.masks[0] * 255, 8)[0]
        ctrl_red = (F.avg_pool2d(b.controls[0:1], 8)[0, 0] + 1) * 127.5
        tol = 6 if b.keys[0].endswith("b.png") else 0.6
        if b.keys[0].endswith("d.png"):  # d has no mask
            assert torch.equal(b.masks, torch.ones_like(b.masks))
        else:
            assert (lat_red - mask_red).abs().max() <= tol
        assert (lat_red - (255 - ctrl_red)).abs().max() <= 1.01


def test_missing_mask_or_control_folder_is_an_error(masked, tmp_path):
    imgs, _, _ = masked
    with pytest.raises(DatasetError, match="mask_path"):
        make([cfg(imgs, mask_path=str(tmp_path / "nope"))])
    with pytest.raises(DatasetError, match="control_path"):
        make([cfg(imgs, control_path=str(tmp_path / "nope"))])


def test_broken_mask_trains_without_mask(masked):
    imgs, masks, _ = masked
    (masks / "a.png").write_bytes(b"broken")
    td, logs = make([cfg(imgs, mask_path=str(masks))])
    assert sum("a.png" in m and "without a mask" in m for m in logs) == 1
    assert len(td.reports[0].without_mask) == 2
