"""Latent cache: in memory and/or on disk (`<folder>/_latent_cache/<key>.safetensors`).

The key is a sha256 over everything that decides a latent: the image file's content hash, the
bucket size, the resize + crop box, the flip flags, the latent space (VAE) id and the version of the
preprocessing code. A changed file or setting gives a new key, so stale entries are never read.
Disk writes are atomic (temporary file + rename); an unreadable entry is deleted and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CACHE_DIR_NAME = "_latent_cache"
# Bump when resizing / cropping / colour conversion changes: old entries then stop matching.
PREPROCESS_VERSION = "aitk-image-v2"


def latent_key(
    content_hash: str,
    bucket: tuple[int, int],
    scaled: tuple[int, int],
    box: tuple[int, int, int, int],
    flip_x: bool,
    flip_y: bool,
    latent_space_id: str,
    frames: list[int] | None = None,
    kind: str = "latent",
) -> str:
    """`frames`: the source frame indices of a video clip (None for a still image); `kind`
    separates other tensors kept per sample (e.g. "first_frame" pixels for image-to-video)."""
    payload = {
        "file": content_hash,
        "bucket": list(bucket),
        "scaled": list(scaled),
        "crop": list(box),
        "flip_x": bool(flip_x),
        "flip_y": bool(flip_y),
        "latent_space": latent_space_id,
        "preprocess": PREPROCESS_VERSION,
    }
    if frames is not None:
        payload["frames"] = [int(i) for i in frames]
    if kind != "latent":
        payload["kind"] = kind
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class LatentCache:
    """Latents by key. `memory`: keep tensors in RAM; `disk_dir`: also persist them there."""

    def __init__(
        self, *, memory: bool, disk_dir: Path | None, log: Callable[[str], None] = print
    ) -> None:
        self.memory = bool(memory)
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self._log = log
        self._mem: dict[str, torch.Tensor] = {}
        self._disk_failed = False
        self.hits = 0  # entries found already present by `ensure`/`get`
        self.writes = 0  # entries stored by `put`

    def _path(self, key: str) -> Path:
        assert self.disk_dir is not None
        return self.disk_dir / f"{key}.safetensors"

    @property
    def uses_disk(self) -> bool:
        return self.disk_dir is not None and not self._disk_failed

    def __contains__(self, key: str) -> bool:
        return key in self._mem or (self.uses_disk and self._path(key).is_file())

    def __len__(self) -> int:
        return len(self._mem)

    def _load_disk(self, key: str) -> torch.Tensor | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["latent"]
        except Exception as exc:
            self._log(f"warning: latent cache entry {path} is unreadable ({exc}); recomputing it")
            try:
                path.unlink()
            except OSError:
                pass
            return None

    def get(self, key: str) -> torch.Tensor | None:
        latent = self._mem.get(key)
        if latent is None and self.uses_disk:
            latent = self._load_disk(key)
            if latent is not None and self.memory:
                self._mem[key] = latent
        return latent

    def ensure(self, key: str) -> bool:
        """True when the entry is usable without encoding (loads disk entries into RAM when memory is on)."""
        if key in self._mem:
            self.hits += 1
            return True
        if not self.uses_disk:
            return False
        if self.memory:
            ok = self.get(key) is not None
        else:
            path = self._path(key)
            ok = path.is_file() and path.stat().st_size > 0
        if ok:
            self.hits += 1
        return ok

    def put(self, key: str, latent: torch.Tensor) -> None:
        latent = latent.detach().to("cpu").contiguous().clone()
        self.writes += 1
        if self.uses_disk:
            try:
                self._write(key, latent)
            except OSError as exc:
                self._disk_failed = True
                self._log(
                    f"warning: cannot write the latent cache in {self.disk_dir} ({exc}); "
                    "keeping latents in memory instead"
                )
        if self.memory or not self.uses_disk:
            self._mem[key] = latent

    def _write(self, key: str, latent: torch.Tensor) -> None:
        assert self.disk_dir is not None
        self.disk_dir.mkdir(parents=True, exist_ok=True)
        final = self._path(key)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            save_file({"latent": latent}, str(tmp), metadata={"format": "pt", "key": key})
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                try:
                    tmp.unlink()
                except OSError:
                    pass
