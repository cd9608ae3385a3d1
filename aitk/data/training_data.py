"""TrainingData: what the trainer draws batches from.

Every random choice of a draw (crop offset, flips, caption dropout) comes from a generator seeded
with (seed, epoch, sample index), and the batch order from (seed, epoch); resuming therefore needs
only the sampler's {epoch, position}.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aitk.config.schema import DatasetConfig
from aitk.data.buckets import choose_bucket, crop_geometry
from aitk.data.images import (
    DatasetError,
    ImageRecord,
    crop_to_bucket,
    load_image,
    scan_folder,
    to_tensor,
)
from aitk.data.latent_cache import CACHE_DIR_NAME, LatentCache, latent_key
from aitk.data.sampler import BucketBatchSampler, seed_words

Variant = tuple[bool, bool]  # (flip_x, flip_y)


@dataclass
class Batch:
    keys: list[str]  # stable id per sample: f"{dataset_idx}:{relative path}"
    captions: list[str]  # final captions of this draw (trigger applied, dropout applied)
    pixels: torch.Tensor | None  # (B, 3, H, W) float32 in [-1, 1]; None when latents are cached
    latents: torch.Tensor | None  # (B, C, h, w) when cached, else None
    loss_multiplier: torch.Tensor  # (B,) float32

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class _Dataset:
    index: int
    cfg: DatasetConfig
    folder: Path
    cache: LatentCache | None
    variants: list[Variant] = field(default_factory=list)

    @property
    def cached(self) -> bool:
        return self.cache is not None


@dataclass
class _Item:
    dataset: int
    record: ImageRecord
    resolution: int
    bucket: tuple[int, int]  # (width, height)
    latent_keys: dict[Variant, str] | None = None

    @property
    def key(self) -> str:
        return f"{self.dataset}:{self.record.rel}"


class _SampleFailed(Exception):
    pass


class TrainingData:
    def __init__(
        self,
        datasets: list[DatasetConfig],
        *,
        trigger_word: str | None,
        divisibility: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        log: Callable[[str], None] = print,
    ) -> None:
        if not datasets:
            raise DatasetError("no datasets configured - add at least one entry under datasets:")
        self._log = log
        self._seed = seed_words(seed)
        self.batch_size = int(batch_size)
        self.divisibility = int(divisibility)
        self.summary_lines: list[str] = []
        self._datasets: list[_Dataset] = []
        self._items: list[_Item] = []
        self._entry_item: list[int] = []  # sample index -> item index (num_repeats expanded)
        self._latents_ready = False
        self._warned_once: set[str] = set()
        for index, cfg in enumerate(datasets):
            self._add_dataset(index, cfg, trigger_word)

        bucket_keys = []
        for item_index in self._entry_item:
            item = self._items[item_index]
            cached = self._datasets[item.dataset].cached
            bucket_keys.append((item.resolution, item.bucket[0], item.bucket[1], cached))
        self._sampler = BucketBatchSampler(bucket_keys, batch_size, seed, rank, world_size)
        if len(self._sampler) == 0:
            raise DatasetError(
                f"the datasets give only {self._sampler.total_batches} batch(es) per epoch, fewer than "
                f"the {world_size} processes - add images or run with fewer processes"
            )
        workers = max(cfg.num_workers for cfg in datasets)
        self._pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aitk-data") if workers else None
        )

    # ------------------------------------------------------------------ construction
    def _add_dataset(self, index: int, cfg: DatasetConfig, process_trigger: str | None) -> None:
        folder = Path(cfg.folder_path).expanduser()
        label = f"datasets[{index}]"
        trigger = cfg.trigger_word if cfg.trigger_word else process_trigger
        scan = scan_folder(
            folder,
            caption_ext=cfg.caption_ext,
            default_caption=cfg.default_caption,
            trigger_word=trigger,
            log=self._log,
            label=label,
        )
        resolutions = list(dict.fromkeys(int(r) for r in cfg.resolutions))
        for r in resolutions:
            if r < self.divisibility:
                raise DatasetError(
                    f"{label} ({folder}): resolution {r} is smaller than the model's bucket size "
                    f"multiple {self.divisibility} - use a resolution of at least {self.divisibility}"
                )
        cache = None
        if cfg.cache_latents or cfg.cache_latents_to_disk:
            disk = folder / CACHE_DIR_NAME if cfg.cache_latents_to_disk else None
            cache = LatentCache(memory=cfg.cache_latents, disk_dir=disk, log=self._log)
            if cfg.random_crop:
                self._log(
                    f"warning: {label} ({folder}): random_crop is ignored while latents are cached - "
                    "crops are fixed (centre crop)"
                )
        ds = _Dataset(index=index, cfg=cfg, folder=folder, cache=cache)
        xs = [False, True] if cfg.flip_x else [False]
        ys = [False, True] if cfg.flip_y else [False]
        ds.variants = [(fx, fy) for fy in ys for fx in xs]
        self._datasets.append(ds)

        skipped = Counter(scan.skipped)
        used = 0
        bucket_counts: Counter = Counter()
        for record in scan.records:
            buckets = [
                (r, choose_bucket(record.width, record.height, r, self.divisibility, cfg.buckets))
                for r in resolutions
            ]
            if any(b is None for _, b in buckets):
                self._log(
                    f"warning: skipping {record.path}: too small ({record.width}x{record.height}, "
                    f"each side must be at least {self.divisibility})"
                )
                skipped["too small"] += 1
                continue
            used += 1
            for r, bucket in buckets:
                assert bucket is not None
                item_index = len(self._items)
                self._items.append(_Item(dataset=index, record=record, resolution=r, bucket=bucket))
                self._entry_item.extend([item_index] * cfg.num_repeats)
                bucket_counts[(r, bucket)] += 1

        n_skipped = sum(skipped.values())
        line = f"dataset {folder}: {used} images used, {n_skipped} skipped"
        if n_skipped:
            line += " (" + ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items())) + ")"
        self.summary_lines.append(line)
        if used == 0:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items()))
            raise DatasetError(
                f"{label}: none of the {scan.num_files} image files in {folder} can be used ({reasons}) - "
                "see the warnings above; replace or remove those files"
            )
        parts = [f"{w}x{h}@{r}: {n}" for (r, (w, h)), n in sorted(bucket_counts.items())]
        self.summary_lines.append(f"  buckets: {', '.join(parts)}")

    # ------------------------------------------------------------------ public API
    @property
    def epoch(self) -> int:
        return self._sampler.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._sampler.load_state_dict({"epoch": int(value), "position": 0})

    @property
    def num_samples(self) -> int:
        """Samples per epoch over all processes (repeats and resolutions counted)."""
        return len(self._entry_item)

    def batches_per_epoch(self) -> int:
        return len(self._sampler)

    @property
    def needs_latent_cache(self) -> bool:
        return any(ds.cached for ds in self._datasets)

    def state_dict(self) -> dict:
        state = self._sampler.state_dict()
        state["batches_per_epoch"] = len(self._sampler)
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("batches_per_epoch")
        if saved is not None and int(saved) != len(self._sampler):
            self._log(
                f"warning: the datasets changed since the checkpoint ({saved} -> {len(self._sampler)} "
                "batches per epoch); resuming at the saved epoch, the batch order differs"
            )
        self._sampler.load_state_dict(state)

    def next_batch(self) -> Batch:
        epoch, entries = self._sampler.next()
        if self._pool is not None and len(entries) > 1:
            results = list(self._pool.map(lambda e: self._sample_or_none(epoch, e), entries))
        else:
            results = [self._sample_or_none(epoch, e) for e in entries]
        good = [r for r in results if r is not None]
        if not good:
            names = ", ".join(str(self._items[self._entry_item[e]].record.path) for e in entries)
            raise DatasetError(f"no sample of a batch could be loaded ({names}) - see the warnings above")
        filled = [r if r is not None else good[i % len(good)] for i, r in enumerate(results)]
        keys = [s[0] for s in filled]
        captions = [s[1] for s in filled]
        tensors = torch.stack([s[2] for s in filled])
        is_latent = filled[0][3]
        mult = torch.tensor([s[4] for s in filled], dtype=torch.float32)
        return Batch(
            keys=keys,
            captions=captions,
            pixels=None if is_latent else tensors,
            latents=tensors if is_latent else None,
            loss_multiplier=mult,
        )

    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], latent_space_id: str) -> None:
        """Encode (or find on disk) the latents of every cached dataset: one per enabled flip variant."""
        todo: dict[tuple[int, int, int], list[tuple[int, Variant, str]]] = {}
        reused = 0
        for item_index, item in enumerate(self._items):
            ds = self._datasets[item.dataset]
            if ds.cache is None:
                continue
            rec = item.record
            try:
                content = rec.content_hash()
            except OSError as exc:
                self._warn_once(
                    item.key, f"warning: cannot read {rec.path} for latent caching ({exc}); skipping it"
                )
                item.latent_keys = None
                continue
            geom = crop_geometry(rec.width, rec.height, *item.bucket)
            item.latent_keys = {
                v: latent_key(content, item.bucket, geom.scaled, geom.box, v[0], v[1], latent_space_id)
                for v in ds.variants
            }
            for variant, key in item.latent_keys.items():
                if ds.cache.ensure(key):
                    reused += 1
                else:
                    todo.setdefault((item.resolution, *item.bucket), []).append((item_index, variant, key))
        total = sum(len(v) for v in todo.values())
        encoded = 0
        with tqdm(total=total, desc="caching latents", unit="latent", disable=total == 0) as bar:
            for jobs in todo.values():
                pending: list[tuple[torch.Tensor, LatentCache, str]] = []
                for item_index, group in itertools.groupby(jobs, key=lambda j: j[0]):
                    group = list(group)
                    item = self._items[item_index]
                    ds = self._datasets[item.dataset]
                    rec = item.record
                    geom = crop_geometry(rec.width, rec.height, *item.bucket)
                    try:
                        img = self._load_checked(rec, geom.scaled)
                    except Exception as exc:
                        self._warn_once(item.key, f"warning: cannot load {rec.path} ({exc}); skipping it")
                        bar.update(len(group))
                        continue
                    for _, (fx, fy), key in group:
                        pixels = to_tensor(crop_to_bucket(img, geom.scaled, geom.box, fx, fy))
                        assert ds.cache is not None
                        pending.append((pixels, ds.cache, key))
                        if len(pending) >= self.batch_size:
                            encoded += self._flush(encode, pending)
                            bar.update(len(pending))
                            pending = []
                if pending:
                    encoded += self._flush(encode, pending)
                    bar.update(len(pending))
        self._latents_ready = True
        self._log(f"latent cache: {encoded} latents encoded, {reused} reused")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # ------------------------------------------------------------------ internals
    def _warn_once(self, tag: str, message: str) -> None:
        if tag not in self._warned_once:
            self._warned_once.add(tag)
            self._log(message)

    @staticmethod
    def _flush(encode: Callable[[torch.Tensor], torch.Tensor], pending: list) -> int:
        pixels = torch.stack([p[0] for p in pending])
        with torch.no_grad():
            latents = encode(pixels)
        if latents.shape[0] != len(pending):
            raise ValueError(f"encode returned {latents.shape[0]} latents for {len(pending)} images")
        for i, (_, cache, key) in enumerate(pending):
            cache.put(key, latents[i])
        return len(pending)

    @staticmethod
    def _load_checked(rec: ImageRecord, scaled: tuple[int, int]):
        img = load_image(rec.path, min_size=scaled)
        w, h = img.size
        # JPEG decoding may downscale by a power of two (never below `scaled`); the aspect must match.
        if w < scaled[0] or h < scaled[1] or abs(w * rec.height - h * rec.width) > 0.02 * rec.width * h:
            raise ValueError(f"the file changed since the scan (was {rec.width}x{rec.height}, now {w}x{h})")
        return img

    def _sample_or_none(self, epoch: int, entry: int):
        item = self._items[self._entry_item[entry]]
        try:
            return self._sample(epoch, entry, item)
        except Exception as exc:
            self._warn_once(
                item.key, f"warning: cannot load {item.record.path} ({exc}); using another sample instead"
            )
            return None

    def _sample(self, epoch: int, entry: int, item: _Item):
        """(key, caption, tensor, is_latent, loss_multiplier) of one draw."""
        ds = self._datasets[item.dataset]
        cfg = ds.cfg
        u = np.random.default_rng([self._seed, int(epoch), int(entry)]).random(5)
        flip_x = bool(cfg.flip_x and u[0] < 0.5)
        flip_y = bool(cfg.flip_y and u[1] < 0.5)
        caption = "" if u[2] < cfg.caption_dropout_rate else item.record.caption
        if ds.cache is not None and self._latents_ready:
            key = item.latent_keys.get((flip_x, flip_y)) if item.latent_keys else None
            latent = ds.cache.get(key) if key else None
            if latent is None:
                raise _SampleFailed("no cached latent")
            return item.key, caption, latent, True, float(cfg.loss_multiplier)
        if ds.cache is not None:
            self._warn_once(
                "__cache_not_built__",
                "warning: latent caching is on but cache_latents() was not called; encoding from pixels",
            )
        rec = item.record
        random_crop = cfg.random_crop and ds.cache is None
        geom = crop_geometry(rec.width, rec.height, *item.bucket, u=(u[3], u[4]) if random_crop else None)
        img = self._load_checked(rec, geom.scaled)
        pixels = to_tensor(crop_to_bucket(img, geom.scaled, geom.box, flip_x, flip_y))
        return item.key, caption, pixels, False, float(cfg.loss_multiplier)
