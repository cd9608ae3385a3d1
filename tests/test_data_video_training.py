"""Video datasets in TrainingData: per-clip frame counts, frame-count buckets, order, i2v first
frames, latent caching of clips, bad clips skipped; and masked loss."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from aitk.config.schema import DatasetConfig
from aitk.data import DatasetError, TrainingData
from aitk.trainer.loss import diffusion_loss, latent_mask

av = pytest.importorskip("av")

from test_data_video import h264_or_mpeg4  # noqa: E402
from test_data_video import write_clip as write_colour_clip  # noqa: E402

RULE = "4k+1"


def index_of(frame: torch.Tensor) -> int:
    """Source frame index encoded in a (3, H, W) tensor in [-1, 1] (see `colour`)."""
    rgb = (frame.mean(dim=(1, 2)) + 1.0) * 127.5
    return int(round((float(rgb[0]) - 16) / 32)) + 8 * int(round((float(rgb[1]) - 16) / 32))


def write_clip(path: Path, n: int, w: int, h: int, fps: int = 24) -> Path:
    """A clip of `n` frames, w x h, frame i the colour `colour(i)` (see test_data_video)."""
    return write_colour_clip(path, h264_or_mpeg4(), n=n, fps=fps, size=(w, h))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clips")
    write_clip(d / "long_wide.mp4", 40, 64, 32, fps=30)  # 9 frames spread over 40
    write_clip(d / "long_tall.mp4", 30, 32, 64, fps=24)
    write_clip(d / "medium.mp4", 7, 64, 48, fps=12)  # 7 -> 5 frames (4k+1)
    write_clip(d / "other_medium.mp4", 6, 64, 48, fps=12)
    Image.new("RGB", (64, 32), (200, 10, 10)).save(d / "still.png")  # a one-frame clip
    (d / "empty.mp4").write_bytes(b"")
    (d / "garbage.webm").write_bytes(b"\x1aE\xdf\xa3" + b"not really a webm" * 20)
    for name in ("long_wide", "long_tall", "medium", "other_medium", "still"):
        (d / f"{name}.txt").write_text(f"a clip called {name}")
    return d


def video_cfg(folder: Path, **kw) -> DatasetConfig:
    kw.setdefault("resolution", 64)
    kw.setdefault("max_pixels_per_frame", 48 * 48)
    kw.setdefault("num_frames", 9)
    return DatasetConfig(folder_path=str(folder), **kw)


def make(cfgs, *, batch_size=2, seed=0, frame_rule=RULE) -> tuple[TrainingData, list[str]]:
    logs: list[str] = []
    td = TrainingData(cfgs, trigger_word=None, divisibility=16, batch_size=batch_size, seed=seed,
                      log=logs.append, frame_rule=frame_rule)
    return td, logs


def epoch(td: TrainingData) -> list:
    return [td.next_batch() for _ in range(td.batches_per_epoch())]


def test_clips_of_different_lengths_and_shapes_batch_by_frames_and_bucket(clip_folder):
    td, logs = make([video_cfg(clip_folder)])
    report = td.reports[0]
    assert report.frame_counts == Counter({9: 2, 5: 2, 1: 1})
    reasons = {s.path.name: s.reason for s in report.skipped_files}
    assert set(reasons) == {"empty.mp4", "garbage.webm"}
    assert all(r.startswith("video ") for r in reasons.values()), reasons
    assert any("frame counts: 1 frames: 1, 5 frames: 2, 9 frames: 2" in line for line in td.summary_lines)
    shapes = Counter()
    for _ in range(3):
        for batch in epoch(td):
            assert batch.pixels is not None and batch.pixels.ndim == 5  # (B, 3, F, H, W)
            shapes[tuple(batch.pixels.shape[2:])] += len(batch)
            for key, clip in zip(batch.keys, batch.pixels):
                picked = [index_of(clip[:, f]) for f in range(clip.shape[1])]
                if "still" not in key:
                    assert picked == sorted(picked) and len(set(picked)) == len(picked), (key, picked)
    # frames x (height, width): within the per-frame budget (48*48) and the clip's own size
    assert set(shapes) == {(9, 32, 64), (9, 64, 32), (5, 48, 48), (1, 32, 64)}, shapes


def test_spread_takes_frames_over_the_whole_clip(clip_folder):
    td, _ = make([video_cfg(clip_folder)], batch_size=1)
    seen = {}
    for batch in epoch(td):
        seen[batch.keys[0].split(":", 1)[1]] = [index_of(batch.pixels[0, :, f]) for f in range(batch.pixels.shape[2])]
    assert seen["long_wide.mp4"][0] == 0 and seen["long_wide.mp4"][-1] == 39
    assert seen["medium.mp4"][0] == 0 and seen["medium.mp4"][-1] == 6


def test_fps_without_shrink_skips_short_clips_with_the_reason(clip_folder):
    td, logs = make([video_cfg(clip_folder, fps=12, shrink_video_to_frames=False)])
    reasons = {s.path.name: s.reason for s in td.reports[0].skipped_files}
    assert reasons["medium.mp4"] == "shorter than num_frames"
    assert any("medium.mp4" in line and "shrink_video_to_frames: true" in line for line in logs)
    assert td.reports[0].frame_counts[9] == 2  # the long clips, resampled to 12 fps


def test_jitter_and_start_are_seeded_and_keep_order(clip_folder):
    a, _ = make([video_cfg(clip_folder, fps=12, temporal_jitter=1)], seed=3)
    b, _ = make([video_cfg(clip_folder, fps=12, temporal_jitter=1)], seed=3)
    for x, y in zip(epoch(a), epoch(b)):
        assert x.keys == y.keys and torch.equal(x.pixels, y.pixels)


def test_num_frames_on_an_image_model_is_a_clear_error(clip_folder):
    with pytest.raises(DatasetError, match="num_frames 9 asks for video training"):
        make([video_cfg(clip_folder)], frame_rule=None)


def test_clips_in_an_image_dataset_are_skipped_with_a_hint(clip_folder):
    td, _ = make([DatasetConfig(folder_path=str(clip_folder), resolution=64)], frame_rule=None)
    reasons = Counter(s.reason for s in td.reports[0].skipped_files)
    assert reasons["a video clip"] == 6 and td.reports[0].used == 1


def test_i2v_first_frames_with_and_without_cached_latents(clip_folder, tmp_path):
    td, _ = make([video_cfg(clip_folder, do_i2v=True)])
    for batch in epoch(td):
        assert batch.first_frames is not None
        assert torch.equal(batch.first_frames, batch.pixels[:, :, 0])

    calls: list[tuple[int, ...]] = []

    def encode(pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, F, H, W) -> (B, 4, F', H/8, W/8)
        calls.append(tuple(pixels.shape))
        b, _, f, h, w = pixels.shape
        pooled = torch.nn.functional.avg_pool3d(pixels, (1, 8, 8))
        return torch.cat([pooled, pooled[:, :1]], dim=1)[:, :, :: 4 if f > 1 else 1]

    cfg = video_cfg(clip_folder, do_i2v=True, cache_latents_to_disk=True, cache_latents=False)
    cached, logs = make([cfg])
    cached.cache_latents(encode, "test-space")
    assert len(calls) > 0 and all(len(s) == 5 for s in calls)
    for batch in epoch(cached):
        assert batch.pixels is None and batch.latents.ndim == 5
        assert batch.first_frames is not None and batch.first_frames.shape[1] == 3
    # a second run finds everything on disk
    calls.clear()
    again, logs = make([cfg])
    again.cache_latents(encode, "test-space")
    assert calls == [] and any("0 latents encoded, 5 reused" in line for line in logs)


def test_latent_mask_pools_to_the_target():
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, :16] = 1.0
    image_mask = latent_mask(masks, torch.zeros(2, 4, 4, 4))
    assert image_mask.shape == (2, 1, 4, 4) and image_mask[:, :, :2].eq(1).all() and image_mask[:, :, 2:].eq(0).all()
    video_mask = latent_mask(masks, torch.zeros(2, 4, 3, 4, 4))
    assert video_mask.shape == (2, 1, 1, 4, 4)
    pred, target = torch.randn(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    top_only = diffusion_loss(pred, target, mask=image_mask)
    assert torch.isclose(top_only, (pred[:, :, :2] ** 2).sum() / pred.numel())
    assert diffusion_loss(pred, target, mask=torch.zeros_like(image_mask)) == 0


def test_a_black_mask_gives_zero_loss_in_training(make_job, shapes_dataset, tmp_path):
    from aitk.config.loader import load_job_file
    from aitk.trainer.loop import Trainer

    masks = tmp_path / "masks"
    masks.mkdir()
    for image in shapes_dataset.iterdir():
        if image.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
            Image.new("L", Image.open(image).size, 0).save(masks / f"{image.stem}.png")
    job = make_job("masked", dataset={"mask_path": str(masks)}, train={"steps": 4})
    loaded = load_job_file(job)
    trainer = Trainer(loaded.job, loaded.job.config.process[0])
    trainer.run()
    losses = [float(line.split('"loss": ')[1].split(",")[0])
              for line in (trainer.paths.metrics).read_text().splitlines()]
    assert losses == [0.0] * 4
