"""Text-embedding cache: the encoder's output per caption string, in memory and optionally on disk.

Keyed by sha256(encoder_id + "\\0" + caption), so the empty caption (caption dropout) is an entry like
any other, and another text encoder never reads this one's entries. Models whose text encoder reads
the prompt with the sample's control images (Qwen-Image-Edit) give those files too: each file's
resolved path, size and modification time join the key, so an edited or replaced control image is
a new entry. Disk entries are `<folder>/<key>.safetensors`, written atomically (temporary file +
rename); an unreadable entry is deleted, reported and treated as missing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from aitk.fsutil import atomic_write_bytes

#: the control image files a prompt is read with (none for most models), in control_path order
Controls = tuple[Path, ...]
#: what `missing` takes and gives: a caption, or a caption with its control files
Entry = str | tuple[str, Controls]


def control_files_id(controls: Controls) -> str:
    """Each control file as resolved path, size and modification time (ns); "" for none."""
    parts = []
    for path in controls:
        try:
            st = Path(path).stat()
        except OSError as exc:
            raise FileNotFoundError(f"control image {path} cannot be read ({exc}): restore it or remove its "
                                    "training image") from exc
        parts.append(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return "\0".join(parts)


def text_key(encoder_id: str, caption: str, controls: Controls = ()) -> str:
    text = f"{encoder_id}\0{caption}" + (f"\0\0{control_files_id(controls)}" if controls else "")
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def split_entry(entry: Entry) -> tuple[str, Controls]:
    return (entry, ()) if isinstance(entry, str) else (entry[0], tuple(entry[1]))


class TextEmbeddingCache:
    """Tensors (a dict of named tensors: hidden states, pooled output, mask...) per caption."""

    def __init__(
        self,
        folder: Path | str | None,
        encoder_id: str,
        *,
        memory: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else None
        self.encoder_id = str(encoder_id)
        self.memory = bool(memory) or self.folder is None
        self._log = log
        self._mem: dict[str, dict[str, torch.Tensor]] = {}
        self._disk_failed = False
        self.hits = 0
        self.writes = 0

    def key(self, caption: str, controls: Controls = ()) -> str:
        return text_key(self.encoder_id, caption, controls)

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{key}.safetensors"

    @property
    def uses_disk(self) -> bool:
        return self.folder is not None and not self._disk_failed

    def __contains__(self, entry: Entry) -> bool:
        key = self.key(*split_entry(entry))
        return key in self._mem or (self.uses_disk and self._path(key).is_file())

    def __len__(self) -> int:
        """Entries held in memory."""
        return len(self._mem)

    def get(self, caption: str, controls: Controls = ()) -> dict[str, torch.Tensor] | None:
        """The stored tensors of a caption (read with `controls`) on the CPU, or None."""
        key = self.key(caption, controls)
        tensors = self._mem.get(key)
        if tensors is None and self.uses_disk:
            tensors = self._load(key)
            if tensors is not None and self.memory:
                self._mem[key] = tensors
        if tensors is not None:
            self.hits += 1
        return tensors

    def put(self, caption: str, tensors: dict[str, torch.Tensor], controls: Controls = ()) -> None:
        if not isinstance(tensors, dict) or not tensors:
            raise ValueError("put() needs a non-empty dict of named tensors")
        key = self.key(caption, controls)
        stored = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
        self.writes += 1
        if self.uses_disk:
            try:
                metadata = {"encoder_id": self.encoder_id, "caption": caption}
                if controls:
                    metadata["controls"] = "\n".join(str(path) for path in controls)
                data = save(stored, metadata=metadata)
                atomic_write_bytes(self._path(key), data)
            except OSError as exc:
                self._disk_failed = True
                self._log(
                    f"warning: cannot write the text-embedding cache in {self.folder} ({exc}); "
                    "keeping embeddings in memory instead"
                )
        if self.memory or not self.uses_disk:
            self._mem[key] = stored

    def missing(self, entries: Iterable[Entry]) -> list[Entry]:
        """The entries (captions, or (caption, control files) pairs; unique, first-seen order)
        that have no entry yet."""
        out: list[Entry] = []
        seen: set[str] = set()
        for entry in entries:
            caption, controls = split_entry(entry)
            key = self.key(caption, controls)
            if key in seen:
                continue
            seen.add(key)
            if key in self._mem:
                continue
            if self.uses_disk and self._path(key).is_file():
                if self.memory and self.get(caption, controls) is None:  # unreadable: deleted by _load
                    out.append(entry)
                continue
            out.append(entry)
        return out

    def _load(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return dict(load_file(str(path)))
        except Exception as exc:
            self._log(f"warning: text-embedding cache entry {path} is unreadable ({exc}); recomputing it")
            try:
                path.unlink()
            except OSError:
                pass
            return None
