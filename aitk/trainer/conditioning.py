"""Text conditioning for training batches: encoded once per caption, kept in an LRU in memory,
and (with cache_text_embeddings) precomputed for every caption and kept on disk.

When text-encoder networks train (train.train_text_encoder), every batch is encoded afresh with
gradients and nothing is kept: the embeddings change with every step. The trained encoders are in
train mode only while they encode (network dropout); previews and everything else see them in
eval mode.

With train.unload_text_encoder (ai-toolkit's low-memory mode) the trigger word, the blank prompt and
the preview prompts are encoded once and kept; training samples are then conditioned on the trigger
word (regularisation samples on the blank prompt) whatever their captions say.

Models whose text encoder reads the prompt with the sample's control images (`prompt_reads_controls`,
Qwen-Image-Edit) get each caption's control image files too: an embedding is then one of (caption,
control files), in memory and in the text cache alike. The fixed prompts of unload_text_encoder are
read without control images (as ai-toolkit encodes them: text only)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from aitk.data.text_cache import Entry, split_entry
from aitk.models.base import ModelAdapter, PromptEmbeds

#: a caption and the control image files it is read with (none unless the model reads them)
PromptKey = tuple[str, tuple[Path, ...]]

# Small datasets never re-encode a caption, while a large one with unique captions cannot grow
# memory without bound.
LRU_SIZE = 512
BLANK_PROMPT = ""


def _to_tensors(embeds: PromptEmbeds) -> dict[str, torch.Tensor]:
    return {"hidden_states": embeds.hidden_states, **{f"extra.{k}": v for k, v in embeds.extra.items()}}


def _from_tensors(tensors: dict[str, torch.Tensor]) -> PromptEmbeds:
    extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    return PromptEmbeds(tensors["hidden_states"], extra)


class PromptConditioner:
    """`encoding`: a context the text encoders run in (brings parked encoders to the device)."""

    def __init__(
        self,
        adapter: ModelAdapter,
        text_cache: Any | None = None,
        encoding: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> None:
        self.adapter = adapter
        self.text_cache = text_cache  # aitk.data.text_cache.TextEmbeddingCache or None
        self.encoding = encoding
        self.reads_controls = bool(adapter.prompt_reads_controls)
        self._lru: OrderedDict[PromptKey, PromptEmbeds] = OrderedDict()
        self.trained_encoders: list[torch.nn.Module] = []  # set by `train_text_encoders`
        self._kept: dict[PromptKey, PromptEmbeds] = {}  # encoded by `use_fixed_prompts`, never evicted
        self.fixed_prompt: str | None = None  # unload_text_encoder: every training sample's prompt
        self.encoders_released = False  # nothing can be encoded any more (set once they are freed)

    def train_text_encoders(self, encoders: list[torch.nn.Module]) -> None:
        """From now on encode with gradients through `encoders` (their networks train)."""
        if encoders and self.text_cache is not None:
            raise ValueError("cached text embeddings cannot train the text encoder")
        self.trained_encoders = list(encoders)
        self._lru.clear()

    def _key(self, caption: str, controls: Sequence[Path] = ()) -> PromptKey:
        return (caption, tuple(Path(c) for c in controls) if self.reads_controls else ())

    def _keys(self, captions: list[str], controls: Sequence[Sequence[Path]] | None) -> list[PromptKey]:
        if not controls or not self.reads_controls:  # none given, or the model does not read them
            return [self._key(caption) for caption in captions]
        if len(controls) != len(captions):
            raise ValueError(f"{len(controls)} control file lists for {len(captions)} captions")
        return [self._key(caption, files) for caption, files in zip(captions, controls)]

    def _encode(self, key: PromptKey) -> PromptEmbeds:
        caption, controls = key
        if self.reads_controls:
            return self.adapter.encode_prompts_with_controls([caption], [controls])
        return self.adapter.encode_prompts([caption])

    def use_fixed_prompts(self, trigger_word: str | None, keep: Sequence[Entry]) -> None:
        """unload_text_encoder: from now on `for_batch` conditions every training sample on
        `trigger_word` (on the blank prompt when there is none, and for regularisation samples).
        Those and `keep` (the preview prompts, each a text or (text, control files)) are encoded
        now, one per call as `__call__` does, and kept for good: the text encoders go after this."""
        self.fixed_prompt = trigger_word or BLANK_PROMPT
        keys = [self._key(BLANK_PROMPT), self._key(self.fixed_prompt)] + [self._key(*split_entry(e)) for e in keep]
        with self.encoding(), torch.no_grad():
            for key in dict.fromkeys(keys):
                if key not in self._kept:
                    self._kept[key] = self._encode(key)

    def for_batch(
        self,
        captions: list[str],
        is_reg: torch.Tensor | None = None,
        controls: Sequence[Sequence[Path]] | None = None,
    ) -> PromptEmbeds:
        """A training batch's conditioning: its captions' (read with each sample's control image
        files `controls` where the model reads them), or with fixed prompts (see
        `use_fixed_prompts`) the trigger word's, and the blank prompt's for `is_reg` samples."""
        if self.fixed_prompt is None:
            return self(captions, controls)
        regs = [bool(r) for r in is_reg] if is_reg is not None else [False] * len(captions)
        return self([BLANK_PROMPT if reg else self.fixed_prompt for reg in regs])

    def precompute(self, entries: Sequence[Entry], progress: Callable[[int], None] | None = None) -> int:
        """Encode every entry (a caption, or a caption with its control files) the text cache
        lacks; returns how many were encoded."""
        assert self.text_cache is not None
        keys = list(dict.fromkeys(self._key(*split_entry(e)) for e in entries))
        missing = self.text_cache.missing(keys)
        if not missing:
            return 0
        with self.encoding(), torch.no_grad():
            for entry in missing:  # one per call, exactly as __call__ encodes (see there)
                caption, controls = split_entry(entry)
                single = self._encode((caption, controls))
                self.text_cache.put(caption, {k: v.cpu() for k, v in _to_tensors(single).items()}, controls)
                if progress is not None:
                    progress(1)
        return len(missing)

    def _lookup(self, key: PromptKey) -> PromptEmbeds | None:
        if key in self._kept:
            return self._kept[key]
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        if self.text_cache is not None:
            tensors = self.text_cache.get(*key)
            if tensors is not None:
                return _from_tensors(tensors).to(self.adapter.device)
        return None

    def _encode_trained(self, keys: list[PromptKey]) -> PromptEmbeds:
        """Every caption through the training text encoders, with gradients, nothing kept."""
        for encoder in self.trained_encoders:
            encoder.train()
        try:
            with self.encoding():
                found = {key: self._encode(key) for key in dict.fromkeys(keys)}
        finally:
            for encoder in self.trained_encoders:
                encoder.eval()
        return PromptEmbeds.cat([found[key] for key in keys])

    def __call__(self, captions: list[str], controls: Sequence[Sequence[Path]] | None = None) -> PromptEmbeds:
        """The conditioning of `captions`, each read with its control files `controls[i]` where
        the model reads them (others ignore `controls`)."""
        keys = self._keys(captions, controls)
        if self.trained_encoders:
            return self._encode_trained(keys)
        with torch.no_grad():
            return self._frozen(keys)

    def _frozen(self, keys: list[PromptKey]) -> PromptEmbeds:
        found = {key: self._lookup(key) for key in dict.fromkeys(keys)}
        missing = [key for key, embeds in found.items() if embeds is None]
        # One caption per call: batched matmuls give slightly different rows for different batch
        # sizes, and which captions are uncached differs after a resume, so a resumed run would drift.
        if missing and self.encoders_released:
            raise RuntimeError(
                f"the text encoders are released, yet {missing[0][0]!r} was not encoded before they went "
                "(every prompt a step or a preview uses is encoded at set-up; this is a bug)"
            )
        if missing:
            with self.encoding():
                for key in missing:
                    found[key] = self._encode(key)
        for key, embeds in found.items():
            if key in self._kept:
                continue
            self._lru[key] = embeds
            self._lru.move_to_end(key)
        while len(self._lru) > LRU_SIZE:
            self._lru.popitem(last=False)
        return PromptEmbeds.cat([found[key] for key in keys])
