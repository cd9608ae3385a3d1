"""Data-pipeline throughput against the training step rate (2,000 generated images, 50 clips).

Prints items/s for: scanning + bucket assignment, drawing batches from the on-disk latent cache,
drawing batches that decode images, and decoding video clips; then the tiny model's training rate
in samples/s, so it is plain whether data can keep up.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

N_IMAGES = 2000
N_CLIPS = 50
BATCH = 4


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = int(rng.integers(320, 1025)), int(rng.integers(320, 1025))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        Image.new("RGB", (w, h), colour).save(folder / f"img_{i:05d}.jpg", quality=90)
        (folder / f"img_{i:05d}.txt").write_text(f"a photo number {i}, colour {colour}")


def make_clips(folder: Path, count: int, seed: int = 0) -> list[Path]:
    import av

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"clip_{i:03d}.mp4"
        w, h = (int(rng.integers(10, 21)) * 16, int(rng.integers(8, 16)) * 16)
        frames = int(rng.integers(33, 97))
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4",
                                          rate=int(rng.choice([16, 24, 30])))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            for f in range(frames):
                array = np.full((h, w, 3), (f * 3) % 255, dtype=np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        paths.append(path)
    return paths


def dataset_cfg(folder: Path, **extra):
    from aitk.config.schema import DatasetConfig

    return DatasetConfig(folder_path=str(folder), resolution=[256], **extra)


def fake_encode(pixels: torch.Tensor) -> torch.Tensor:
    """A stand-in VAE (8x downscale, 4 channels): the benchmark measures data, not the model."""
    return torch.nn.functional.avg_pool2d(pixels, 8).repeat(1, 2, 1, 1)[:, :4]


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def bench_images(folder: Path) -> dict[str, float]:
    from aitk.data import TrainingData

    quiet = lambda _message: None  # noqa: E731
    started = time.perf_counter()
    data = TrainingData([dataset_cfg(folder)], trigger_word=None, divisibility=64, batch_size=BATCH,
                        seed=0, log=quiet)
    scan = rate(N_IMAGES, time.perf_counter() - started)

    started = time.perf_counter()
    batches = 50
    for _ in range(batches):
        data.next_batch()
    decode = rate(batches * BATCH, time.perf_counter() - started)

    cached = TrainingData([dataset_cfg(folder, cache_latents_to_disk=True)], trigger_word=None, divisibility=64,
                          batch_size=BATCH, seed=0, log=quiet)
    cached.cache_latents(fake_encode, "bench")
    reloaded = TrainingData([dataset_cfg(folder, cache_latents_to_disk=True)], trigger_word=None,
                            divisibility=64, batch_size=BATCH, seed=0, log=quiet)
    reloaded.cache_latents(fake_encode, "bench")  # all entries found on disk: nothing encoded
    started = time.perf_counter()
    batches = 200
    for _ in range(batches):
        reloaded.next_batch()
    latent = rate(batches * BATCH, time.perf_counter() - started)
    return {"scan": scan, "decode": decode, "latent": latent}


def bench_video(folder: Path) -> dict[str, float]:
    """Scan (probe + plan + bucket) and draws that decode clips, through TrainingData: 33 frames
    at 16 fps, 256x256 pixel budget, WAN's 4k+1 frame rule."""
    from aitk.data import TrainingData

    quiet = lambda _message: None  # noqa: E731
    cfg = dataset_cfg(folder, num_frames=33, fps=16, max_pixels_per_frame=256 * 256)
    started = time.perf_counter()
    data = TrainingData([cfg], trigger_word=None, divisibility=16, batch_size=1, seed=0, log=quiet,
                        frame_rule="4k+1")
    scan = rate(N_CLIPS, time.perf_counter() - started)
    started = time.perf_counter()
    draws = 20
    for _ in range(draws):
        data.next_batch()
    return {"scan": scan, "decode": rate(draws, time.perf_counter() - started)}


def training_rate(workdir: Path) -> float:
    """Samples/s of the tiny SD 1.5 trainer at 64 px, batch 2 (cached latents)."""
    sys.path.insert(0, str(REPO / "bench"))
    from overhead import make_job, trainer_step_times

    job = make_job(workdir, "data_bench", 60)
    return 2 / statistics.median(wall for wall, _cpu in trainer_step_times(job))


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        make_images(workdir / "images", N_IMAGES)
        clips = make_clips(workdir / "clips", N_CLIPS)
        print(f"generated {N_IMAGES} images and {N_CLIPS} clips in {time.perf_counter() - started:.0f} s")
        images = bench_images(workdir / "images")
        video = bench_video(workdir / "clips")
        train = training_rate(workdir)
    print(f"scan + bucket assignment:        {images['scan']:8.0f} images/s")
    print(f"batches decoding images (256px): {images['decode']:8.0f} images/s")
    print(f"batches from the latent cache:   {images['latent']:8.0f} items/s")
    print(f"video scan (probe, plan, bucket): {video['scan']:7.1f} clips/s")
    print(f"video draws (33 frames decoded):  {video['decode']:7.1f} clips/s")
    print(f"tiny-model training:             {train:8.0f} samples/s (64 px, batch 2)")
    print(f"latent cache / training:         {images['latent'] / train:8.1f}x")
    print(f"image decoding / training:       {images['decode'] / train:8.1f}x")


if __name__ == "__main__":
    main()
