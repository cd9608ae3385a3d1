"""TrainingData: what the trainer draws batches from.

Every random choice of a draw (crop offset, flips, caption dropout, tag shuffling / dropout) comes
from a generator seeded with (seed, epoch, sample index), the batch order from (seed, epoch), and
the regularisation samples of an epoch from (seed, cycle); resuming therefore needs only the
sampler's {epoch, position}.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aitk.config.schema import DatasetConfig
from aitk.data.buckets import crop_geometry
from aitk.data.captions import process_tags
from aitk.data.dataset import DatasetScan, scan_dataset
from aitk.data.prefetch import BatchesAhead
from aitk.data.images import (
    DatasetError,
    ImageRecord,
    crop_to_bucket,
    load_image,
    load_mask_image,
    to_tensor,
)
from aitk.data.latent_cache import CACHE_DIR_NAME, LatentCache, latent_key
from aitk.data.sampler import BucketBatchSampler, seed_words
from aitk.data.reg_stream import RegStream
from aitk.data.video import ClipPlan, frame_indices, read_frames

Variant = tuple[bool, bool]  # (flip_x, flip_y)


@dataclass
class Batch:
    keys: list[str]  # stable id per sample: f"{dataset_idx}:{relative path}"
    captions: list[str]  # final captions of this draw (trigger applied, dropout applied; "" = dropped)
    pixels: torch.Tensor | None  # (B, 3, H, W) float32 in [-1, 1]; None when latents are cached
    latents: torch.Tensor | None  # (B, C, h, w) when cached, else None
    loss_multiplier: torch.Tensor  # (B,) float32
    is_reg: torch.Tensor | None = None  # (B,) bool: sample comes from an is_reg dataset
    masks: torch.Tensor | None = None  # (B, 1, H, W) float32 in [0, 1] at pixel size; None: no mask_path
    # float32 in [-1, 1]: (B, 3, H, W) for one control folder, (B, K, 3, H, W) for a list of K; None: no control_path
    controls: torch.Tensor | None = None
    # per sample (height, width) of the image file, and the crop's (top, left) in the resized image
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    crops_top_left: list[tuple[int, int]] = field(default_factory=list)
    first_frames: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1]: videos' first frames (do_i2v)
    bucket_size: tuple[int, int] | None = None  # (height, width) in pixels of every sample
    # per sample, its control image files in control_path order (() without control_path)
    control_files: list[tuple[Path, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.is_reg is None:
            self.is_reg = torch.zeros(len(self.keys), dtype=torch.bool)

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
    frames: int = 0  # video datasets: frames per draw (stills: 1); image datasets: 0
    clip: ClipPlan | None = None  # video clip sampling plan; None for a still image
    latent_keys: dict[Variant, str] | None = None
    first_frame_keys: dict[Variant, str] | None = None  # do_i2v with cached latents

    @property
    def key(self) -> str:
        return f"{self.dataset}:{self.record.rel}"


@dataclass
class _Sample:
    key: str
    caption: str
    tensor: torch.Tensor  # pixels (3, H, W) or latent (C, h, w)
    is_latent: bool
    loss_multiplier: float
    is_reg: bool
    wants_mask: bool  # its dataset has mask_path
    mask: torch.Tensor | None  # (1, H, W)
    control: torch.Tensor | None  # (3, H, W); (K, 3, H, W) for a list of K control folders
    first_frame: torch.Tensor | None  # (3, H, W): do_i2v
    size: tuple[int, int]  # bucket (width, height)
    scaled: tuple[int, int] = (0, 0)  # (width, height) the image was resized to before the crop
    original: tuple[int, int] = (0, 0)  # (width, height) of the file itself
    crop_top_left: tuple[int, int] = (0, 0)  # (top, left) of the crop in the scaled image
    control_files: tuple[Path, ...] = ()  # the files of `control`


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
        frame_rule: str | None = None,
        prefetch: bool = True,
        pin_memory: bool = False,
    ) -> None:
        if not datasets:
            raise DatasetError("no datasets configured - add at least one entry under datasets:")
        self._log = log
        self._seed = seed_words(seed)
        self.batch_size = int(batch_size)
        self.divisibility = int(divisibility)
        self.summary_lines: list[str] = []
        self.reports: list[DatasetScan] = []  # per dataset: used / skipped files / buckets / captions
        self._datasets: list[_Dataset] = []
        self._items: list[_Item] = []
        self._entry_item: list[int] = []  # sample index -> item index (non-reg, num_repeats expanded)
        self._reg_pool: list[int] = []  # item indices of is_reg datasets (num_repeats expanded)
        self._latents_ready = False
        self._warned_once: set[str] = set()
        self.frame_rule = frame_rule
        for index, cfg in enumerate(datasets):
            self._add_dataset(index, cfg, trigger_word)

        if not self._entry_item:
            raise DatasetError(
                "every dataset is a regularisation dataset (is_reg: true) - add a dataset of the images "
                "to train on (is_reg: false); regularisation images are mixed in with those"
            )
        self._reg = RegStream(self._seed, self._reg_pool, per_epoch=len(self._entry_item))
        bucket_keys = [self._bucket_key(self._items[i]) for i in self._entry_item]
        extra = self._reg_bucket_keys if self._reg_pool else None
        self._sampler = BucketBatchSampler(bucket_keys, batch_size, seed, rank, world_size, extra_keys=extra)
        if len(self._sampler) == 0:
            raise DatasetError(
                f"the datasets give only {self._sampler.total_batches} batch(es) per epoch, fewer than "
                f"the {world_size} processes - add images or run with fewer processes"
            )
        workers = max(cfg.num_workers for cfg in datasets)
        self._pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aitk-data") if workers else None
        )
        # the next batch loads while the current step runs (aitk/data/prefetch.py) when loading it
        # reads files, or copies it into pinned memory for the GPU; on the CPU, latents already in
        # memory are only stacked, and a loader thread would cost the step more (its turns at the
        # GIL) than it saves
        ahead = prefetch and (self.reads_files_per_batch or pin_memory)
        self._ahead = BatchesAhead(self._sampler, self._load_batch, pin_memory=pin_memory) if ahead else None

    # ------------------------------------------------------------------ construction
    def _add_dataset(self, index: int, cfg: DatasetConfig, process_trigger: str | None) -> None:
        scan = scan_dataset(
            index, cfg, process_trigger=process_trigger, divisibility=self.divisibility, log=self._log,
            frame_rule=self.frame_rule,
        )
        self.reports.append(scan)
        folder, label = scan.folder, scan.label
        self.summary_lines.extend(scan.summary_lines())
        if scan.used == 0:
            raise DatasetError(scan.unusable_message())
        cache = None
        if cfg.cache_latents or cfg.cache_latents_to_disk:
            disk = folder / CACHE_DIR_NAME if cfg.cache_latents_to_disk else None
            cache = LatentCache(memory=cfg.cache_latents, disk_dir=disk, log=self._log)
            if cfg.random_crop:
                self._log(
                    f"warning: {label} ({folder}): random_crop is ignored while latents are cached - "
                    "crops are fixed (centre crop)"
                )
            if cfg.num_frames > 1 and cfg.temporal_jitter > 0:
                self._log(
                    f"warning: {label} ({folder}): temporal_jitter is ignored while latents are cached - "
                    "each clip's frames are fixed (evenly spaced from its first frame)"
                )
        ds = _Dataset(index=index, cfg=cfg, folder=folder, cache=cache)
        xs = [False, True] if cfg.flip_x else [False]
        ys = [False, True] if cfg.flip_y else [False]
        ds.variants = [(fx, fy) for fy in ys for fx in xs]
        self._datasets.append(ds)
        target = self._reg_pool if cfg.is_reg else self._entry_item
        for placement in scan.placements:
            item_index = len(self._items)
            self._items.append(
                _Item(dataset=index, record=placement.record, resolution=placement.resolution,
                      bucket=placement.bucket, frames=placement.frames, clip=placement.clip)
            )
            target.extend([item_index] * cfg.num_repeats)

    def _bucket_key(self, item: _Item) -> tuple:
        ds = self._datasets[item.dataset]
        return (
            item.resolution, item.bucket[0], item.bucket[1], item.frames, ds.cached,
            bool(ds.cfg.control_path), bool(ds.cfg.do_i2v),
        )

    # ------------------------------------------------------------------ regularisation samples
    def _reg_bucket_keys(self, epoch: int) -> list[tuple]:
        return [self._bucket_key(self._items[i]) for i in self._reg.items(epoch)]

    def _item_of(self, epoch: int, entry: int) -> _Item:
        n = len(self._entry_item)
        if entry < n:
            return self._items[self._entry_item[entry]]
        return self._items[self._reg.items(epoch)[entry - n]]

    # ------------------------------------------------------------------ public API
    def _sampler_state(self) -> dict:
        """The sampler's state after the batches handed out (the sampler itself may be a batch ahead)."""
        ahead = self._ahead.consumed_state() if self._ahead is not None else None
        return ahead if ahead is not None else self._sampler.state_dict()

    @property
    def epoch(self) -> int:
        return int(self._sampler_state()["epoch"])

    @epoch.setter
    def epoch(self, value: int) -> None:
        if self._ahead is not None:
            self._ahead.reset()
        self._sampler.load_state_dict({"epoch": int(value), "position": 0})

    @property
    def num_samples(self) -> int:
        """Samples per epoch over all processes (repeats, resolutions and reg samples counted)."""
        return len(self._entry_item) * (2 if self._reg_pool else 1)

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """This process's batches in an epoch (the current one by default). With is_reg datasets
        the number can differ slightly between epochs (partial batches)."""
        return self._sampler.batches_in_epoch(self.epoch if epoch is None else int(epoch))

    @property
    def reads_files_per_batch(self) -> bool:
        """Whether a batch reads files: images or clips to decode, latents kept on disk only,
        masks or control images."""
        return any(
            ds.cache is None or not ds.cache.memory or ds.cfg.mask_path or ds.cfg.control_path
            for ds in self._datasets
        )

    @property
    def needs_latent_cache(self) -> bool:
        return any(ds.cached for ds in self._datasets)

    def all_captions(self) -> list[str] | None:
        """Every caption string a draw can produce, sorted, for pre-encoding text embeddings.

        Includes "" when any dataset has caption_dropout_rate > 0. None when a dataset shuffles or
        drops tags (shuffle_tokens / token_dropout_rate): those captions are not a fixed set.
        """
        captions: set[str] = set()
        for ds in self._datasets:
            cfg = ds.cfg
            if cfg.shuffle_tokens or cfg.token_dropout_rate > 0:
                return None
            if cfg.caption_dropout_rate > 0:
                captions.add("")
        captions.update(item.record.caption for item in self._items)
        return sorted(captions)

    def all_captions_with_controls(self) -> list[tuple[str, tuple[Path, ...]]] | None:
        """`all_captions` for models that read each caption with its sample's control image files:
        every (caption, control files) pair a draw can produce (the blank caption with each
        sample's files when captions drop out), sorted; None as for all_captions."""
        if self.all_captions() is None:
            return None
        pairs: set[tuple[str, tuple[Path, ...]]] = set()
        for item in self._items:
            pairs.add((item.record.caption, item.record.controls))
            if self._datasets[item.dataset].cfg.caption_dropout_rate > 0:
                pairs.add(("", item.record.controls))
        return sorted(pairs, key=lambda pair: (pair[0], [str(p) for p in pair[1]]))

    def state_dict(self) -> dict:
        state = self._sampler_state()
        state["batches_per_epoch"] = self._sampler.batches_in_epoch(int(state["epoch"]))
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("batches_per_epoch")
        now = self._sampler.batches_in_epoch(int(state.get("epoch", 0)))
        if saved is not None and int(saved) != now:
            self._log(
                f"warning: the datasets changed since the checkpoint ({saved} -> {now} "
                "batches per epoch); resuming at the saved epoch, the batch order differs"
            )
        if self._ahead is not None:
            self._ahead.reset()
        self._sampler.load_state_dict(state)

    def next_batch(self) -> Batch:
        if self._ahead is not None:
            return self._ahead.next()
        return self._load_batch(*self._sampler.next())

    def _load_batch(self, epoch: int, entries: list[int]) -> Batch:
        if self._pool is not None and len(entries) > 1:
            results = list(self._pool.map(lambda e: self._sample_or_none(epoch, e), entries))
        else:
            results = [self._sample_or_none(epoch, e) for e in entries]
        good = [r for r in results if r is not None]
        if not good:
            names = ", ".join(str(self._item_of(epoch, e).record.path) for e in entries)
            raise DatasetError(f"no sample of a batch could be loaded ({names}) - see the warnings above")
        # a failed sample is replaced by a good one of the same batch (same bucket)
        filled = [r if r is not None else good[i % len(good)] for i, r in enumerate(results)]
        tensors = torch.stack([s.tensor for s in filled])
        is_latent = filled[0].is_latent
        masks = None
        if any(s.wants_mask for s in filled):
            w, h = filled[0].size
            masks = torch.stack([s.mask if s.mask is not None else torch.ones(1, h, w) for s in filled])
        controls = None
        if all(s.control is not None for s in filled):
            controls = torch.stack([s.control for s in filled])
        first_frames = None
        if all(s.first_frame is not None for s in filled):
            first_frames = torch.stack([s.first_frame for s in filled])
        return Batch(
            keys=[s.key for s in filled],
            captions=[s.caption for s in filled],
            pixels=None if is_latent else tensors,
            latents=tensors if is_latent else None,
            loss_multiplier=torch.tensor([s.loss_multiplier for s in filled], dtype=torch.float32),
            is_reg=torch.tensor([s.is_reg for s in filled], dtype=torch.bool),
            masks=masks,
            controls=controls,
            first_frames=first_frames,
            original_sizes=[(s.original[1], s.original[0]) for s in filled],
            crops_top_left=[s.crop_top_left for s in filled],
            bucket_size=(filled[0].size[1], filled[0].size[0]),
            control_files=[s.control_files for s in filled],
        )

    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], latent_space_id: str) -> None:
        """Encode (or find on disk) the latents of every cached dataset: one per enabled flip variant
        (and, for do_i2v, the first frame's pixels next to each latent)."""
        todo: dict[tuple[int, ...], list[tuple[int, Variant, str]]] = {}
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
            indices = self._clip_indices(item, None)

            def key_of(v: Variant, kind: str = "latent") -> str:
                return latent_key(
                    content, item.bucket, geom.scaled, geom.box, v[0], v[1], latent_space_id,
                    frames=indices, kind=kind,
                )

            item.latent_keys = {v: key_of(v) for v in ds.variants}
            item.first_frame_keys = (
                {v: key_of(v, "first_frame") for v in ds.variants} if ds.cfg.do_i2v else None
            )
            for variant, key in item.latent_keys.items():
                first_ok = item.first_frame_keys is None or ds.cache.ensure(item.first_frame_keys[variant])
                if ds.cache.ensure(key) and first_ok:
                    reused += 1
                else:
                    todo.setdefault((item.resolution, *item.bucket, item.frames), []).append(
                        (item_index, variant, key)
                    )
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
                        media = self._load_media(item, geom.scaled, self._clip_indices(item, None))
                    except Exception as exc:
                        self._warn_once(item.key, f"warning: cannot load {rec.path} ({exc}); skipping it")
                        bar.update(len(group))
                        continue
                    for _, variant, key in group:
                        pixels = self._pixels(item, media, geom, *variant)
                        assert ds.cache is not None
                        if item.first_frame_keys is not None:
                            ds.cache.put(item.first_frame_keys[variant], self._first_frame(pixels))
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
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None
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

    def _clip_indices(self, item: _Item, rng: np.random.Generator | None) -> list[int] | None:
        """Source frames of one draw of a clip (None for a still image). Without `rng` (cached
        latents) the clip starts at its first frame and has no jitter."""
        if item.clip is None:
            return None
        cfg = self._datasets[item.dataset].cfg
        return frame_indices(
            item.record.video, item.clip, rng=rng, temporal_jitter=cfg.temporal_jitter if rng is not None else 0
        )

    def _load_media(self, item: _Item, scaled: tuple[int, int], indices: list[int] | None) -> list:
        """The decoded frames of one draw: [image] for a still, the clip's frames for a video."""
        if indices is None:
            return [self._load_checked(item.record, scaled)]
        return read_frames(item.record.path, indices)

    def _pixels(self, item: _Item, media: list, geom, flip_x: bool, flip_y: bool) -> torch.Tensor:
        """(3, H, W) for image datasets; (3, F, H, W) for video datasets (stills as one frame)."""
        frames = [to_tensor(crop_to_bucket(m, geom.scaled, geom.box, flip_x, flip_y)) for m in media]
        if item.frames == 0:
            return frames[0]
        return torch.stack(frames, dim=1)

    @staticmethod
    def _first_frame(pixels: torch.Tensor) -> torch.Tensor:
        return (pixels[:, 0] if pixels.ndim == 4 else pixels).clone()

    @staticmethod
    def _load_checked(rec: ImageRecord, scaled: tuple[int, int]):
        img = load_image(rec.path, min_size=scaled)
        w, h = img.size
        # JPEG decoding may downscale by a power of two (never below `scaled`); the aspect must match.
        if w < scaled[0] or h < scaled[1] or abs(w * rec.height - h * rec.width) > 0.02 * rec.width * h:
            raise ValueError(f"the file changed since the scan (was {rec.width}x{rec.height}, now {w}x{h})")
        return img

    def _sample_or_none(self, epoch: int, entry: int) -> _Sample | None:
        item = self._item_of(epoch, entry)
        try:
            return self._sample(epoch, entry, item)
        except Exception as exc:
            self._warn_once(
                item.key, f"warning: cannot load {item.record.path} ({exc}); using another sample instead"
            )
            return None

    def _caption(self, cfg: DatasetConfig, rec: ImageRecord, rng: np.random.Generator, u_drop: float) -> str:
        if u_drop < cfg.caption_dropout_rate:
            return ""
        if not (cfg.shuffle_tokens or cfg.token_dropout_rate > 0):
            return rec.caption
        raw = rec.raw_caption if rec.raw_caption is not None else rec.caption
        return process_tags(
            raw, rec.trigger, shuffle=cfg.shuffle_tokens, keep_tokens=cfg.keep_tokens,
            token_dropout_rate=cfg.token_dropout_rate, rng=rng,
        )

    def _sample(self, epoch: int, entry: int, item: _Item) -> _Sample:
        """One draw of one sample."""
        ds = self._datasets[item.dataset]
        cfg = ds.cfg
        rng = np.random.default_rng([self._seed, int(epoch), int(entry)])
        u = rng.random(5)
        flip_x = bool(cfg.flip_x and u[0] < 0.5)
        flip_y = bool(cfg.flip_y and u[1] < 0.5)
        caption = self._caption(cfg, item.record, rng, float(u[2]))
        rec = item.record
        use_latents = ds.cache is not None and self._latents_ready
        if ds.cache is not None and not use_latents:
            self._warn_once(
                "__cache_not_built__",
                "warning: latent caching is on but cache_latents() was not called; encoding from pixels",
            )
        random_crop = cfg.random_crop and ds.cache is None
        geom = crop_geometry(rec.width, rec.height, *item.bucket, u=(u[3], u[4]) if random_crop else None)
        first_frame = None
        if use_latents:
            key = item.latent_keys.get((flip_x, flip_y)) if item.latent_keys else None
            tensor = ds.cache.get(key) if key else None
            if tensor is None:
                raise _SampleFailed("no cached latent")
            if cfg.do_i2v:
                first_key = item.first_frame_keys.get((flip_x, flip_y)) if item.first_frame_keys else None
                first_frame = ds.cache.get(first_key) if first_key else None
                if first_frame is None:
                    raise _SampleFailed("no cached first frame")
        else:
            # a clip's start and jitter come from their own stream, so images draw as before
            frame_rng = np.random.default_rng([self._seed, int(epoch), int(entry), 1])
            media = self._load_media(item, geom.scaled, self._clip_indices(item, frame_rng))
            tensor = self._pixels(item, media, geom, flip_x, flip_y)
            if cfg.do_i2v:
                first_frame = self._first_frame(tensor)
        mask = None
        if rec.mask is not None:
            mask_img = crop_to_bucket(load_mask_image(rec.mask, geom.scaled), geom.scaled, geom.box, flip_x, flip_y)
            mask = torch.from_numpy(np.array(mask_img, dtype=np.uint8, copy=True)).float().div_(255.0)[None]
        control = None
        if rec.controls:
            # each control image gets the target's resize, crop and flips
            loaded = [
                to_tensor(crop_to_bucket(load_image(path, min_size=geom.scaled), geom.scaled, geom.box, flip_x, flip_y))
                for path in rec.controls
            ]
            control = loaded[0] if len(cfg.control_folders) == 1 else torch.stack(loaded)
        return _Sample(
            key=item.key,
            caption=caption,
            tensor=tensor,
            is_latent=use_latents,
            loss_multiplier=float(cfg.loss_multiplier),
            is_reg=bool(cfg.is_reg),
            wants_mask=bool(cfg.mask_path),
            mask=mask,
            control=control,
            first_frame=first_frame,
            size=item.bucket,
            scaled=geom.scaled,
            original=(rec.width, rec.height),
            crop_top_left=(geom.box[1], geom.box[0]),
            control_files=tuple(rec.controls),
        )
